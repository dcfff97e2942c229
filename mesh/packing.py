"""Context packing: one step's prompt, built from the goal's state, within a model's window.

The prompt protocol is ``mesh.contracts.prompt`` (the sim reads it; real models read it as an ordinary
prompt): the system message is the role prompt (headed ``ROLE: <role>`` and ``OUTPUT KIND: <kind>``);
the user message has the sections ``## Pinned constraints``, ``## Goal``, ``## Step`` (instruction + acceptance),
``## Previous review`` (the feedback a revision addresses, each ``### <name>``), ``## Inputs`` (each
``### <name>``) and ``## Memory``.

Pinned constraints are always included verbatim — context endurance depends on it. When the rest
does not fit ``window - output_reserve``, inputs — the feedback inputs among them, under their own
priority — are summarised lowest priority first (each just enough to close the gap, down to a
floor), then dropped in the same order; then the memory and the brief are shortened. If even the pinned
parts do not fit, ``ContextTooLong`` is raised: the caller should have routed to a bigger window,
which ``needed_tokens`` lets it do first.

The packing decisions are written once, as a generator that yields each ``(text, max_tokens)`` it wants
shortened and receives the shorter text: ``pack`` drives it with a plain function (extractive by
default), ``apack`` with a coroutine — a model call on the edge tier — so neither copy can drift.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from mesh.backends.base import ChatMessage
from mesh.backends.tokens import estimate_tokens, messages_tokens, truncate
from mesh.contracts import prompt
from mesh.errors import ContextTooLong

# Summaries are not made smaller than a tenth of the input, between these bounds: a smaller one
# says nothing useful, and the input is dropped instead if room is still short.
MIN_SUMMARY_TOKENS = 48
SUMMARY_FLOOR_CAP = 1024

Summariser = Callable[[str, int], str]
AsyncSummariser = Callable[[str, int], Awaitable[str]]
# What the packing generator yields (a text and the tokens it must fit), is sent (the shortened
# text) and returns.
_Packing = Generator[tuple[str, int], str, "PackedContext"]
_Shortening = Generator[tuple[str, int], str, str]


@dataclass
class PackedContext:
    """The packed prompt and what had to give way for it to fit."""

    messages: list[ChatMessage]
    tokens: int
    dropped: list[str] = field(default_factory=list)
    summarised: list[str] = field(default_factory=list)
    budget: int = 0


@dataclass
class _Part:
    name: str
    text: str
    priority: int = 0
    section: str = prompt.INPUTS  # or prompt.PREVIOUS_REVIEW: feedback a revision addresses

    @property
    def tokens(self) -> int:
        return estimate_tokens(self.text)


def _parts(inputs: list[tuple[str, str, int]], feedback: list[tuple[str, str, int]]) -> list[_Part]:
    return [_Part(n, t, p) for n, t, p in inputs] + [_Part(n, t, p, prompt.PREVIOUS_REVIEW) for n, t, p in feedback]


def _render_user(
    *, constraints: list[str], brief: str, instruction: str, acceptance: list[str], inputs: list[_Part], memory: str,
) -> str:
    sections = [(prompt.CONSTRAINTS, prompt.bullets(constraints) or f"- {prompt.NONE}"), (prompt.GOAL, brief)]
    step = instruction + (f"\n\n{prompt.ACCEPTANCE}\n{prompt.bullets(acceptance)}" if acceptance else "")
    sections.append((prompt.STEP, step))
    for title in (prompt.PREVIOUS_REVIEW, prompt.INPUTS):
        if group := [(p.name, p.text) for p in inputs if p.section == title]:
            sections.append((title, prompt.nested(group)))
    if memory:
        sections.append((prompt.MEMORY, memory))
    return prompt.render(sections)


def _messages(system: str, user: str) -> list[ChatMessage]:
    return [ChatMessage(role="system", content=system), ChatMessage(role="user", content=user)]


def needed_tokens(
    *, system: str, constraints: list[str], brief: str, instruction: str, acceptance: list[str],
    inputs: list[tuple[str, str, int]], memory: str, feedback: list[tuple[str, str, int]] | None = None,
) -> int:
    """Prompt tokens with nothing cut: a tier fits when this plus its output reserve ≤ its window."""
    user = _render_user(constraints=constraints, brief=brief, instruction=instruction, acceptance=acceptance,
                        inputs=_parts(inputs, feedback or []), memory=memory)
    return messages_tokens(_messages(system, user))


def pack(
    *, system: str, constraints: list[str], brief: str, instruction: str, acceptance: list[str],
    inputs: list[tuple[str, str, int]], memory: str, window: int, output_reserve: int,
    summarise: Summariser | None = None, feedback: list[tuple[str, str, int]] | None = None,
) -> PackedContext:
    """Pack a step's context into ``window - output_reserve`` tokens.

    ``inputs`` are ``(name, text, priority)``; higher priority survives longer. ``feedback`` (same form:
    the reviews and test reports a revision addresses) is packed like the inputs, under its own
    priorities, and rendered as the ``Previous review`` section. ``summarise(text,
    max_tokens)`` shortens a text; its result is truncated if it overshoots, and the default is
    extractive truncation with a marker.
    """
    steps = _packing(system=system, constraints=constraints, brief=brief, instruction=instruction,
                     acceptance=acceptance, inputs=inputs, memory=memory, window=window,
                     output_reserve=output_reserve, feedback=feedback)
    shorten = summarise or truncate
    try:
        ask = next(steps)
        while True:
            ask = steps.send(shorten(*ask))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def apack(*, summarise: AsyncSummariser, **context: Any) -> PackedContext:
    """``pack`` with a summariser that is a coroutine (a model call); the other keywords are ``pack``'s."""
    steps = _packing(**context)
    try:
        ask = next(steps)
        while True:
            ask = steps.send(await summarise(*ask))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _packing(
    *, system: str, constraints: list[str], brief: str, instruction: str, acceptance: list[str],
    inputs: list[tuple[str, str, int]], memory: str, window: int, output_reserve: int,
    feedback: list[tuple[str, str, int]] | None = None,
) -> _Packing:
    """The packing decisions; yields ``(text, max_tokens)`` for each text to shorten (see module doc)."""
    budget = window - output_reserve
    parts = _parts(inputs, feedback or [])
    texts = {"memory": memory, "brief": brief}
    dropped: list[str] = []
    summarised: list[str] = []

    def render(inputs: list[_Part]) -> list[ChatMessage]:
        user = _render_user(constraints=constraints, brief=texts["brief"], instruction=instruction,
                            acceptance=acceptance, inputs=inputs, memory=texts["memory"])
        return _messages(system, user)

    def fit(text: str, target: int) -> _Shortening:
        out = yield text, target
        return out if estimate_tokens(out) <= target else truncate(out, target)

    # 1. Inputs, lowest priority (then largest) first: summarise each just enough to close the gap,
    #    but not below a useful floor; if that is still not enough, drop them in the same order.
    #    Each input is costed once with its heading; the estimate being subadditive, the sum of the
    #    costs bounds the real total from above, so one render at the end suffices (1M tokens of
    #    inputs pack in milliseconds, not one re-render per input).
    cost = {id(p): estimate_tokens(f"\n\n### {p.name}\n{p.text}") for p in parts}
    header = {s: estimate_tokens(f"\n\n## {s}\n") for s in {p.section for p in parts}}  # per section present
    over = messages_tokens(render([])) + sum(header.values()) + sum(cost.values()) - budget
    order = sorted(parts, key=lambda p: (p.priority, -p.tokens))
    for part in order:
        if over <= 0:
            break
        floor = max(MIN_SUMMARY_TOKENS, min(part.tokens // 10, SUMMARY_FLOOR_CAP))
        target = max(cost[id(part)] - over - estimate_tokens(f"\n\n### {part.name}\n"), floor)
        if target < part.tokens:
            part.text = yield from fit(part.text, target)
            summarised.append(part.name)
            new_cost = estimate_tokens(f"\n\n### {part.name}\n{part.text}")
            over -= cost[id(part)] - new_cost
            cost[id(part)] = new_cost
    for part in order:
        if over <= 0:
            break
        parts.remove(part)
        dropped.append(part.name)
        if part.name in summarised:
            summarised.remove(part.name)
        over -= cost[id(part)] + (header[part.section] if all(p.section != part.section for p in parts) else 0)
    messages = render(parts)
    over = messages_tokens(messages) - budget
    # 2. Shorten the memory, then the brief; never the pinned constraints.
    for key in ("memory", "brief"):
        if over <= 0:
            break
        text = texts[key]
        target = max(estimate_tokens(text) - over, 0)
        if text and target < estimate_tokens(text):
            texts[key] = yield from fit(text, target)
            summarised.append(key)
            messages = render(parts)
            over = messages_tokens(messages) - budget
    if over > 0:
        raise ContextTooLong(
            f"the pinned parts of this step's context (system prompt, constraints, instruction) need "
            f"{messages_tokens(messages)} tokens but the window leaves {budget}; route to a bigger window"
        )
    return PackedContext(
        messages=messages, tokens=messages_tokens(messages), dropped=dropped, summarised=summarised, budget=budget
    )
