"""``ModelGateway``: every model call of a node goes through here — budget check, per-tier
concurrency, retries with backoff honouring Retry-After, a circuit breaker per endpoint, a
per-call timeout, and the fallback order across tiers — and every attempt is reported through
``on_call`` so the caller can publish it (``backend.call`` events).

Error policy:
* retryable errors (429, 5xx, overload, timeout, cut stream, garbage, unreachable) are retried on the
  same tier with backoff, until the attempts run out or the endpoint's circuit opens; then the
  next tier in the fallback order is tried;
* ``BadRequest`` is the request's fault: raised at once, no retry, no fallback;
* other permanent errors (auth, balance, context too long) are not retried but fall back — another
  tier has another key, account or window (``ContextTooLong`` skips tiers whose window is no bigger);
* a call the budget cannot afford is refused before it is made (``BudgetExceeded``); a cheaper tier
  is tried next, and if none fits the refusal is raised;
* when every tier failed: ``AllTiersFailed`` with each tier's last error — ``AllTiersUnavailable``
  (retryable: trying again later may work) when any of them was retryable.

Simulation (one rule): a call is simulated when its tier's config says sim or its answer says it came
from a sim-server; a tier that answered so once counts as simulated from then on. Unless ``allow_sim``
(``MESH_ALLOW_SIM=1``), a simulated answer raises ``SimulationNotAllowed`` — a configuration error, not
retried, not fallen back from. A real tier never falls back into a simulated one.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from mesh.aio import together
from mesh.backends.base import Backend, ChatMessage, ChatRequest, ChatResponse, ToolCallRequest
from mesh.backends.resilience import BreakerPolicy, CircuitBreaker, RetryPolicy
from mesh.backends.sim import SimBackend, SimWorld
from mesh.backends.tiers import TierConfig
from mesh.backends.tokens import estimate_tokens, messages_tokens
from mesh.config import get_settings
from mesh.contracts import Budget, Usage, prompt
from mesh.errors import (
    AllTiersFailed,
    BackendError,
    BackendTimeout,
    BadRequest,
    BudgetExceeded,
    CircuitOpen,
    ConfigError,
    ContextTooLong,
    PermanentBackendError,
    SimulationNotAllowed,
)


@dataclass(frozen=True)
class CallRecord:
    """One attempt, as the ``backend.call`` event reports it."""

    tier: str
    model: str
    endpoint: str
    usage: Usage
    latency_ms: float
    outcome: str  # "ok" or the error class name
    attempt: int
    thinking: bool
    simulated: bool
    error: str | None = None
    response_model: str = ""  # the model the answer names (a provider may serve another than asked for)
    requester: str = ""  # who asked, from the request's metadata "role" (a role, or "summariser")
    finish_reason: str = ""


OnCall = Callable[[CallRecord], Awaitable[None] | None]
RunTool = Callable[[ToolCallRequest], Awaitable[str]]
# Awaited right before each attempt is sent (inside the tier's concurrency slot); it may raise to stop
# the call — the caller's cancellation check (``GoalCancelled``).
BeforeCall = Callable[[], Awaitable[None]]


class BudgetGuard:
    """What a goal may still spend: its ``Budget`` minus ``spent``, minus calls in flight."""

    def __init__(self, budget: Budget, spent: Usage | None = None) -> None:
        self.budget = budget
        self.spent = spent or Usage()
        self._held_tokens = 0
        self._held_cost = 0.0

    @property
    def remaining_tokens(self) -> int | None:
        if self.budget.max_tokens is None:
            return None
        return self.budget.max_tokens - self.spent.total_tokens - self._held_tokens

    @property
    def remaining_cost(self) -> float | None:
        if self.budget.max_cost_usd is None:
            return None
        return self.budget.max_cost_usd - self.spent.cost_usd - self._held_cost

    def check(self, tokens: int, cost: float, *, what: str) -> None:
        """Raise ``BudgetExceeded`` if a call needing up to ``tokens`` / ``cost`` would overspend."""
        tokens_left, cost_left = self.remaining_tokens, self.remaining_cost
        if tokens_left is not None and tokens > tokens_left:
            raise BudgetExceeded(f"{what} could use up to {tokens} tokens but the goal has {max(tokens_left, 0)} "
                                 f"of its {self.budget.max_tokens} left")
        if cost_left is not None and cost > cost_left:
            raise BudgetExceeded(f"{what} could cost up to ${cost:.4f} but the goal has ${max(cost_left, 0):.4f} "
                                 f"of its ${self.budget.max_cost_usd:.2f} left")

    @contextmanager
    def hold(self, tokens: int, cost: float, *, what: str) -> Iterator[None]:
        """Check, then reserve the worst case while the call is in flight (parallel calls see it)."""
        self.check(tokens, cost, what=what)
        self._held_tokens += tokens
        self._held_cost += cost
        try:
            yield
        finally:
            self._held_tokens -= tokens
            self._held_cost -= cost

    def charge(self, usage: Usage) -> None:
        self.spent = self.spent + usage


def make_backend(tier: TierConfig, world: SimWorld) -> Backend:
    """The adapter for a tier's kind; sim tiers share one ``world``.

    The SDK adapters are imported here, not at module level: importing the anthropic and openai
    SDKs costs seconds of CPU, which every node would pay at start even when no tier uses them."""
    if tier.kind == "openai":
        from mesh.backends.openai_compat import OpenAIBackend

        return OpenAIBackend(tier)
    if tier.kind == "anthropic":
        from mesh.backends.anthropic_compat import AnthropicBackend

        return AnthropicBackend(tier)
    return SimBackend(tier, world)


class ModelGateway:
    def __init__(
        self,
        tiers: Mapping[str, TierConfig],
        *,
        fallback_order: Sequence[str] = ("long_context", "swarm", "edge"),
        on_call: OnCall | None = None,
        seed: int | None = None,
        retry: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
        world: SimWorld | None = None,
        backends: Mapping[str, Backend] | None = None,
        clock: Callable[[], float] = time.monotonic,
        allow_sim: bool | None = None,
    ) -> None:
        unknown = [t for t in fallback_order if t not in tiers]
        if unknown:
            raise ConfigError(f"fallback order names unknown tiers {unknown}; configured: {sorted(tiers)}")
        self.tiers = dict(tiers)
        self.fallback_order = tuple(fallback_order)
        self.retry = retry or RetryPolicy()
        self.allow_sim = get_settings().allow_sim if allow_sim is None else allow_sim
        self._answered_sim: set[str] = set()  # tiers configured as real whose answers came from a sim-server
        self._on_call = on_call
        self._rng = random.Random(seed)
        # Sim tiers share one world (MESH_SIM_* settings unless given): one fault plan, one cache.
        self.world = world or SimWorld.from_settings(get_settings())
        self._backends: dict[str, Backend] = dict(backends or {})
        for name, cfg in self.tiers.items():
            self._backends.setdefault(name, make_backend(cfg, self.world))
        policy = breaker or BreakerPolicy()
        self._breakers = {cfg.endpoint: CircuitBreaker(policy, clock) for cfg in self.tiers.values()}
        self._slots = {name: asyncio.Semaphore(cfg.max_concurrency) for name, cfg in self.tiers.items()}

    # --- what the router asks -------------------------------------------------------------------

    def available(self, tier: str) -> bool:
        """The tier's circuit lets calls through (a router hard constraint)."""
        return self._breakers[self.tiers[tier].endpoint].available()

    def breakers(self) -> dict[str, str]:
        """Each tier's circuit state (closed, half_open, open), for the node's heartbeat."""
        return {name: self._breakers[cfg.endpoint].state.value for name, cfg in self.tiers.items()}

    def window(self, tier: str) -> int:
        return self.tiers[tier].context_window

    def simulated(self, tier: str) -> bool:
        """The tier is a simulator: its config says so, or it has answered as one."""
        return self.tiers[tier].simulated or tier in self._answered_sim

    def native_tools(self, tier: str) -> bool:
        """Whether the tier's server does function calling (else the worker uses the text protocol)."""
        cfg = self.tiers[tier]
        if cfg.tools is not None:
            return cfg.tools
        dialect = getattr(self._backends[tier], "dialect", None)  # OpenAI-compatible adapters know theirs
        return getattr(dialect, "name", None) != "llamacpp"

    def room(self, tier: str, prompt_tokens: int) -> int:
        """The most one answer on ``tier`` may write: its output reserve, within what the window leaves
        after the prompt (a local server refuses prompt + max_tokens beyond its context)."""
        cfg = self.tiers[tier]
        return max(1, min(cfg.output_reserve, cfg.context_window - prompt_tokens))

    # --- calls ----------------------------------------------------------------------------------

    def worst_case(self, tier: str, prompt_tokens: int, max_tokens: int) -> tuple[int, float]:
        """Tokens and USD a call on ``tier`` may use at most: what the budget guard holds for it."""
        cfg = self.tiers[tier]
        out = min(max_tokens, cfg.output_reserve)
        return prompt_tokens + out, cfg.prices.cost(prompt_tokens=prompt_tokens, cached_tokens=0, completion_tokens=out)

    async def chat(
        self, req: ChatRequest, tier: str, *, budget: BudgetGuard | None = None, fallback: bool = True,
        timeout: float | None = None, before_call: BeforeCall | None = None,
    ) -> ChatResponse:
        """Answer ``req`` on ``tier``, retrying and falling back as the module docstring says."""
        if tier not in self.tiers:
            raise ConfigError(f"unknown tier {tier!r}; configured: {sorted(self.tiers)}")
        order = [tier] + ([t for t in self.fallback_order if t != tier] if fallback else [])
        real = not self.simulated(tier)
        prompt_tokens = messages_tokens(req.messages) + sum(estimate_tokens(str(t.parameters)) for t in req.tools)
        errors: dict[str, BackendError] = {}
        too_long_at = 0  # the largest window that was already too small
        for name in order:
            cfg = self.tiers[name]
            if real and name != tier and self.simulated(name):
                errors[name] = _no_sim_fallback(cfg)
                continue
            if cfg.context_window <= too_long_at or prompt_tokens > cfg.context_window:
                errors[name] = ContextTooLong(
                    f"the prompt (~{prompt_tokens} tokens) does not fit {name}'s window of {cfg.context_window}",
                    tier=name, endpoint=cfg.endpoint)
                too_long_at = max(too_long_at, cfg.context_window)
                continue
            try:
                resp = await self._on_tier(req, cfg, prompt_tokens, budget, timeout or cfg.timeout, before_call)
            except BadRequest:
                raise
            except BackendError as exc:
                errors[name] = exc
                if isinstance(exc, ContextTooLong):
                    too_long_at = max(too_long_at, cfg.context_window)
                continue
            if real and name != tier and resp.simulated:  # configured as real, but a sim-server answered
                errors[name] = _no_sim_fallback(cfg)
                continue
            return resp
        if all(isinstance(e, BudgetExceeded) for e in errors.values()):
            raise next(iter(errors.values()))
        summary = "; ".join(f"{t}: {type(e).__name__}: {e}" for t, e in errors.items())
        raise AllTiersFailed.of(f"every tier failed — {summary}", errors)

    async def _on_tier(
        self, req: ChatRequest, cfg: TierConfig, prompt_tokens: int, budget: BudgetGuard | None, timeout: float,
        before_call: BeforeCall | None,
    ) -> ChatResponse:
        breaker = self._breakers[cfg.endpoint]
        backend = self._backends[cfg.name]
        if req.max_tokens > (room := self.room(cfg.name, prompt_tokens)):
            # A tier writes at most its output reserve: a small local model asked for 8k tokens would
            # ramble to the end of its window while every other request queues behind it.
            req = req.model_copy(update={"max_tokens": room})
        worst_case, cost = self.worst_case(cfg.name, prompt_tokens, req.max_tokens)
        attempt = 0
        while True:
            attempt += 1
            if not breaker.acquire():
                error: BackendError = CircuitOpen(f"the circuit for {cfg.endpoint} is open", tier=cfg.name,
                                                  endpoint=cfg.endpoint)
                await self._report(cfg, req, attempt, Usage(), 0.0, error, self.simulated(cfg.name))
                raise error
            start = time.perf_counter()
            try:
                with budget.hold(worst_case, cost, what=f"a call on {cfg.name}") if budget else nullcontext():
                    async with self._slots[cfg.name]:
                        if before_call is not None:
                            await before_call()
                        try:
                            async with asyncio.timeout(timeout):
                                resp = await backend.chat(req, timeout=timeout)
                        except TimeoutError as exc:
                            raise BackendTimeout(f"no answer within {timeout:g}s", tier=cfg.name,
                                                 endpoint=cfg.endpoint) from exc
            except BudgetExceeded as exc:
                breaker.release()
                exc.tier, exc.endpoint = cfg.name, cfg.endpoint
                raise
            except BackendError as exc:
                exc.tier, exc.endpoint = exc.tier or cfg.name, exc.endpoint or cfg.endpoint
                if exc.retryable:
                    breaker.record_failure()
                else:
                    breaker.release()
                await self._report(cfg, req, attempt, Usage(), (time.perf_counter() - start) * 1000, exc,
                                   self.simulated(cfg.name))
                delay = self.retry.delay(attempt, exc, self._rng)
                if delay is None or not breaker.available():
                    raise
                await asyncio.sleep(delay)
                continue
            except BaseException:
                breaker.release()  # cancelled or a bug: no verdict on the endpoint
                raise
            breaker.record_success()
            if budget is not None:
                budget.charge(resp.usage)
            if resp.simulated and not cfg.simulated:
                self._answered_sim.add(cfg.name)
            simulated = cfg.simulated or resp.simulated
            await self._report(cfg, req, attempt, resp.usage, resp.latency_ms, None, simulated, resp)
            if simulated and not self.allow_sim:
                raise SimulationNotAllowed(cfg.name, "configured as a simulator" if cfg.simulated
                                           else f"{cfg.endpoint} answered as the mesh sim-server")
            return resp if resp.simulated == simulated else resp.model_copy(update={"simulated": simulated})

    async def _report(self, cfg: TierConfig, req: ChatRequest, attempt: int, usage: Usage, latency_ms: float,
                      error: BackendError | None, simulated: bool, resp: ChatResponse | None = None) -> None:
        if self._on_call is None:
            return
        record = CallRecord(tier=cfg.name, model=cfg.model, endpoint=cfg.endpoint, usage=usage, latency_ms=latency_ms,
                            outcome="ok" if error is None else type(error).__name__, attempt=attempt,
                            thinking=req.thinking, simulated=simulated, error=None if error is None else str(error),
                            response_model=resp.model if resp else "", finish_reason=resp.finish_reason if resp else "",
                            requester=str(req.metadata.get("role", "")))
        result = self._on_call(record)
        if inspect.isawaitable(result):
            await result

    # --- swarm mode -----------------------------------------------------------------------------

    async def swarm(
        self, req: ChatRequest, subtasks: Sequence[str], *, budget: BudgetGuard | None = None,
        run_tool: RunTool | None = None, tier: str = "swarm", max_rounds: int = 8,
        before_call: BeforeCall | None = None,
    ) -> ChatResponse:
        """Fan one step out into bounded parallel sub-agents on the swarm tier, then compose.

        At most ``max_sub_agents`` sub-agents run (extra subtasks are dealt round-robin among them);
        with ``run_tool`` each runs its own tool loop (≤ ``max_rounds`` turns) and all of them share
        ``max_tool_calls`` — past it, tool calls are answered with a refusal. A failed sub-agent's
        slot says so in the composition; if all fail, the first error is raised. Usage is summed
        over every call, the composing one included. With a ``budget``, a swarm whose first round and
        composition could not all be afforded is refused (``BudgetExceeded``) before any call is made;
        ``before_call`` runs before every call (an error it raises stops every sub-agent).
        """
        if not subtasks:
            return await self.chat(req, tier, budget=budget, before_call=before_call)
        bounds = self.tiers[tier].swarm
        n = min(len(subtasks), bounds.max_sub_agents)
        groups = [list(subtasks[i::n]) for i in range(n)]
        if budget is not None:
            self._afford_swarm(req, groups, tier, budget)
        tool_calls_left = bounds.max_tool_calls
        spent = Usage()

        async def tool(call: ToolCallRequest) -> str:
            nonlocal tool_calls_left
            if run_tool is None or tool_calls_left <= 0:
                return f"refused: the swarm's budget of {bounds.max_tool_calls} tool calls is spent"
            tool_calls_left -= 1
            return await run_tool(call)

        async def sub_agent(i: int) -> str | BackendError:
            nonlocal spent
            messages = [*req.messages, ChatMessage(role="user", content=prompt.section(prompt.sub_task(i, n),
                                                                                       prompt.bullets(groups[i])))]
            sub = req.model_copy(update={"json_schema": None, "tools": req.tools if run_tool else []})
            try:
                for _ in range(max_rounds):
                    resp = await self.chat(sub.model_copy(update={"messages": messages}), tier, budget=budget,
                                           before_call=before_call)
                    spent = spent + resp.usage
                    if not resp.tool_calls:
                        return resp.text
                    messages = [*messages, resp.as_message()]
                    for call in resp.tool_calls:
                        messages.append(ChatMessage(role="tool", tool_call_id=call.id, content=await tool(call)))
                return resp.text or f"(stopped after {max_rounds} tool rounds)"
            except BackendError as exc:
                return exc

        results = await together(*(sub_agent(i) for i in range(n)))
        failures = [r for r in results if isinstance(r, BackendError)]
        if len(failures) == n:
            raise failures[0]
        body = prompt.nested(
            (f"Sub-agent {i + 1}: {'; '.join(groups[i])[:200]}",
             f"(failed: {type(r).__name__}: {r})" if isinstance(r, BackendError) else r)
            for i, r in enumerate(results)
        )
        compose = req.model_copy(update={"tools": [], "messages": [
            *req.messages, ChatMessage(role="user", content=prompt.section(prompt.SUB_RESULTS, body)
                                       + "\n\nCompose the step's answer from these results.")]})
        final = await self.chat(compose, tier, budget=budget, before_call=before_call)
        return final.model_copy(update={"usage": spent + final.usage})

    def _afford_swarm(self, req: ChatRequest, groups: list[list[str]], tier: str, budget: BudgetGuard) -> None:
        """``BudgetExceeded`` unless the budget covers every sub-agent's first call and the composition
        (which reads every sub-agent's answer) at their worst case."""
        base = messages_tokens(req.messages) + sum(estimate_tokens(str(t.parameters)) for t in req.tools)
        out = min(req.max_tokens, self.tiers[tier].output_reserve)
        calls = [self.worst_case(tier, base + estimate_tokens(prompt.bullets(g)) + 16, req.max_tokens) for g in groups]
        calls.append(self.worst_case(tier, base + len(groups) * out, req.max_tokens))
        budget.check(sum(t for t, _ in calls), sum(c for _, c in calls),
                     what=f"a swarm of {len(groups)} sub-agents and its composition on {tier}")

    async def aclose(self) -> None:
        for backend in self._backends.values():
            await backend.aclose()


def _no_sim_fallback(cfg: TierConfig) -> BackendError:
    return PermanentBackendError(f"{cfg.name} is simulated: a real tier does not fall back into a sim tier",
                                 tier=cfg.name, endpoint=cfg.endpoint)
