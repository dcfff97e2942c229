"""Where a role meets the model backends: route a request, call it through the gateway, and put
every decision and call on the event stream. Shared by the orchestrator and the workers."""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from mesh import tracing
from mesh.backends.base import ChatRequest, ChatResponse
from mesh.backends.gateway import BudgetGuard, CallRecord, ModelGateway
from mesh.backends.sim.world import SimWorld
from mesh.backends.tiers import TierConfig
from mesh.bus.client import Bus
from mesh.bus.outbox import Outbox
from mesh.contracts import (
    TIERS,
    BackendCall,
    Budget,
    DagPosition,
    EventBase,
    RouteDecided,
    RouteDecision,
    Usage,
)
from mesh.contracts.models import utcnow
from mesh.metrics import Metrics
from mesh.roles import spans
from mesh.roles.spec import RoleSpec
from mesh.router.features import RouteContext, call_costs, deadline_pressure
from mesh.router.policy import RoutePolicy


@dataclass(slots=True)
class CallScope:
    """Which goal and step the current model calls belong to (for backend.call events), and the
    outbox their events go through (None: each is published and its ack awaited on the spot)."""

    goal_id: str
    step_id: str
    role: str
    attempt: int
    usage: Usage
    outbox: Outbox | None = None
    simulated: bool = False  # some call of the scope was answered (or would be) by a simulator
    decision: RouteDecision | None = None  # the scope's latest routing decision (its calls' spans show it)


_scope: contextvars.ContextVar[CallScope | None] = contextvars.ContextVar("mesh_call_scope", default=None)


class ModelCaller:
    """One per node: owns the gateway callbacks that turn each backend attempt into an event."""

    def __init__(self, bus: Bus, tiers: Mapping[str, TierConfig], policy: RoutePolicy, node_id: str,
                 metrics: Metrics) -> None:
        self.bus = bus
        self.gateway = ModelGateway(tiers, on_call=self._on_call, world=SimWorld.from_settings(bus.settings),
                                    allow_sim=bus.settings.allow_sim)
        self.policy = policy
        self.node_id = node_id
        self.metrics = metrics

    async def _on_call(self, rec: CallRecord) -> None:
        scope = _scope.get()
        self.metrics.backend_call(rec.tier, rec.outcome, rec.usage, rec.latency_ms)
        if tracing.on():  # reported once the call is over: the span ends now and began latency_ms ago
            end = time.time_ns()
            tracing.record(f"chat {rec.model}", kind="client", start_ns=end - int(rec.latency_ms * 1e6), end_ns=end,
                           attributes=spans.chat(rec, self.gateway.tiers.get(rec.tier),
                                                 scope.decision if scope else None,
                                                 (scope.goal_id, scope.step_id) if scope else None),
                           error=rec.error)
        if scope is None:
            return
        if rec.outcome == "ok":
            scope.usage = scope.usage + rec.usage
        scope.simulated = scope.simulated or rec.simulated
        await self._emit(BackendCall(
            goal_id=scope.goal_id, step_id=scope.step_id, node=self.node_id, tier=rec.tier, model=rec.model,
            endpoint=rec.endpoint, usage=rec.usage, latency_ms=rec.latency_ms, outcome=rec.outcome,
            attempt=rec.attempt, thinking=rec.thinking, simulated=rec.simulated,
        ))

    def scope(self, goal_id: str, step_id: str, role: str, attempt: int, outbox: Outbox | None = None) -> CallScope:
        scope = CallScope(goal_id, step_id, role, attempt, Usage(), outbox)
        _scope.set(scope)
        return scope

    async def _emit(self, event: EventBase) -> None:
        scope = _scope.get()
        if scope is not None and scope.outbox is not None:
            await scope.outbox.emit(event)
        else:
            await self.bus.emit(event)

    @staticmethod
    def current_usage() -> Usage:
        scope = _scope.get()
        return scope.usage if scope else Usage()

    @staticmethod
    def current_simulated() -> bool:
        scope = _scope.get()
        return scope.simulated if scope else False

    async def route(self, spec: RoleSpec, *, goal_id: str, step_id: str, needed_tokens: int, difficulty: float,
                    position: DagPosition, attempt: int, prior_failures: int, budget_fraction_left: float,
                    event_id: str, instruction: str = "", remaining: Budget | None = None,
                    deadline: datetime | None = None) -> RouteDecision:
        """Decide the tier (and thinking) of one step attempt and put the decision on the event stream.
        ``remaining`` (what the goal may still spend) and ``deadline`` feed the budget constraint and
        the deadline-pressure feature."""
        tiers = self.gateway.tiers
        left = [s for s in ((deadline - utcnow()).total_seconds() if deadline else None,
                            remaining.max_wall_seconds if remaining else None) if s is not None]
        ctx = RouteContext(
            role=spec.role, output_kind=spec.output_kind, needed_tokens=needed_tokens,
            windows={t: self.gateway.window(t) for t in TIERS},
            available={t: self.gateway.available(t) for t in TIERS},
            preferred=spec.router.preferred, difficulty=difficulty, position=position, attempt=attempt,
            prior_failures=prior_failures, budget_fraction_left=budget_fraction_left,
            thinking=spec.router.thinking, swarm_capable=spec.router.swarm_fan_out > 0, tools=len(spec.tools),
            deadline_pressure=deadline_pressure(min(left, default=None)), instruction=instruction,
            costs=call_costs(tiers, needed_tokens, spec.limits.max_output_tokens),
            remaining_usd=remaining.max_cost_usd if remaining else None,
        )
        decision = self.policy.decide(ctx)
        self.metrics.route(spec.role, decision.tier)
        if (scope := _scope.get()) is not None:
            scope.decision = decision
        if tracing.on():
            tracing.active().update(spans.route(decision, tiers.get(decision.tier)))
        await self._emit(RouteDecided(event_id=event_id, goal_id=goal_id, step_id=step_id, role=spec.role,
                                      attempt=attempt, node=self.node_id, decision=decision))
        return decision

    async def chat(self, req: ChatRequest, decision: RouteDecision, remaining: Budget,
                   check: Callable[[], Awaitable[None]]) -> ChatResponse:
        """One routed call; ``check`` (cancellation) runs before each attempt and may raise."""
        await check()
        guard = BudgetGuard(remaining, spent=self.current_usage())
        return await self.gateway.chat(req, decision.tier, budget=guard, before_call=check)

    async def swarm(self, req: ChatRequest, subtasks: list[str], decision: RouteDecision, remaining: Budget,
                    check: Callable[[], Awaitable[None]]) -> ChatResponse:
        """A routed swarm fan-out under the same guards as ``chat``: refused before it spends when the
        goal cannot afford its sub-agents and their composition, ``check`` before every sub-agent call
        (a cancellation stops the sub-agents still running and the composition)."""
        await check()
        guard = BudgetGuard(remaining, spent=self.current_usage())
        return await self.gateway.swarm(req, subtasks, tier=decision.tier, budget=guard, before_call=check)
