"""Structured outputs from real models: parse leniently, validate strictly, re-ask with the exact error.

Real providers and small local models answer JSON with raw control characters inside strings, in a
fenced block, with prose around it, with trailing commas — or cut off at ``max_tokens``
(``finish_reason=length``). ``extract_json`` accepts all of that except a cut-off object (a repaired
truncated plan would silently lose steps); the caller's ``validate`` is strict (pydantic, ``Plan.check``).
``ask_structured`` runs the bounded conversation: a truncated answer is asked again with more room up
to what the tier may write, and past that with the truncation quoted so the model answers shorter; an
invalid answer is re-asked quoting the exact error. Layer 3: no bus, the call is passed in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from mesh.backends.base import ChatMessage, ChatRequest, ChatResponse
from mesh.errors import MeshError, OutputInvalid

T = TypeVar("T")
_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\r?\n(.*?)(?:```|\Z)", re.DOTALL)
# How much of an invalid answer goes back into the conversation (a small model's window is 8k tokens).
ECHO_CHARS = 2000


def extract_json(text: str) -> Any:
    """The first JSON object (or array) in ``text``, read leniently; ``OutputInvalid`` with the exact
    reason (``truncated`` when an object opens and never closes)."""
    if not text.strip():
        raise OutputInvalid("the answer is empty")
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    first_error: OutputInvalid | None = None
    for candidate in candidates:
        for start in (i for i, c in enumerate(candidate) if c in "{["):
            try:
                return _load(candidate, start)
            except OutputInvalid as exc:
                first_error = first_error or exc
            if candidate[start] == "{":
                break  # the first object decides: an inner "{" of a broken object is not the answer
    raise first_error or OutputInvalid(f"no JSON object in the answer: {text[:120]!r}")


def _load(text: str, start: int) -> Any:
    end = _balanced_end(text, start)
    if end is None:
        raise OutputInvalid(f"the JSON {'object' if text[start] == '{' else 'array'} opened at char {start} never "
                            f"closes: the answer is truncated or unbalanced")
    body = _drop_trailing_commas(text[start:end + 1])
    try:
        return json.loads(body, strict=False)  # strict=False: raw control characters inside strings
    except json.JSONDecodeError as exc:
        raise OutputInvalid(f"not valid JSON: {exc}") from exc


def _balanced_end(text: str, start: int) -> int | None:
    """Index of the bracket closing the one at ``start`` (brackets inside strings do not count)."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i
    return None


def _drop_trailing_commas(text: str) -> str:
    out: list[str] = []
    in_string, escaped = False, False
    for c in text:
        if in_string:
            escaped = not escaped and c == "\\"
            if c == '"' and not escaped:
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "}]":
            while out and out[-1].isspace():
                out.pop()
            if out and out[-1] == ",":
                out.pop()
        out.append(c)
    return "".join(out)


@dataclass(slots=True)
class Asked(Generic[T]):
    """What ``ask_structured`` got: the value, the last response, and how the conversation went."""

    value: T
    response: ChatResponse
    attempts: int
    truncated: int = 0
    errors: list[str] = field(default_factory=list)


class StructuredFailed(OutputInvalid):
    """No valid answer within the attempts; ``errors`` holds each attempt's reason."""

    def __init__(self, what: str, errors: list[str], truncated: int) -> None:
        super().__init__(f"no valid {what} after {len(errors)} attempt(s): {errors[-1]}")
        self.errors = errors
        self.truncated = truncated


async def ask_structured(call: Callable[[ChatRequest], Awaitable[ChatResponse]], request: ChatRequest,
                         validate: Callable[[Any], T], *, attempts: int, room: Callable[[ChatResponse], int],
                         what: str = "answer") -> Asked[T]:
    """Ask until ``validate(extract_json(answer))`` passes, at most ``attempts`` times.

    ``room(response)`` is the most the answering tier may write: a truncated answer is asked again with
    twice the ``max_tokens`` up to it, then told it was truncated and to answer shorter. ``validate`` raises
    a ``MeshError`` or ``ValueError`` whose message is fit to quote back to the model."""
    errors: list[str] = []
    truncated = 0
    req = request
    for attempt in range(1, attempts + 1):
        response = await call(req)
        cut = response.finish_reason == "length"
        try:
            value = validate(extract_json(response.text))
        except (MeshError, ValueError, TypeError, LookupError) as exc:  # pydantic's ValidationError is a ValueError
            error = _reason(exc)
        else:
            return Asked(value, response, attempt, truncated, errors)
        if cut:
            truncated += 1
            limit = min(req.max_tokens, room(response))
            error = (f"the answer was truncated: it reached the output limit of {limit} tokens "
                     f"(finish_reason=length) — {error}")
            errors.append(error)
            if req.max_tokens < room(response):  # the same question with room to answer it whole
                req = req.model_copy(update={"max_tokens": min(req.max_tokens * 2, room(response))})
                continue
            note = (f"Your {what} was truncated at the output limit of {limit} tokens. Answer again, complete "
                    f"and shorter: it must fit in {limit} tokens.")
        else:
            errors.append(error)
            note = f"That {what} is invalid: {error}. Answer with a corrected {what}: JSON only."
        req = req.model_copy(update={"messages": [
            *request.messages, ChatMessage(role="assistant", content=response.text[:ECHO_CHARS]),
            ChatMessage(role="user", content=note)]})
    raise StructuredFailed(what, errors, truncated)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if type(exc).__name__ == "ValidationError":  # pydantic: the first error, compactly
        errs = exc.errors()  # type: ignore[attr-defined]
        first = errs[0] if errs else {}
        loc = ".".join(str(p) for p in first.get("loc", ()))
        text = f"{len(errs)} validation error(s); first: {loc}: {first.get('msg', text)}"
    return text[:500]
