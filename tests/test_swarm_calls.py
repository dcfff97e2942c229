"""A swarm fan-out goes through the ``ModelCaller`` like every other model call: the goal's budget is
checked before any sub-agent spends, and its cancellation between sub-agents (real nats-server, the
goal state in KV, the worker's own cancellation check)."""

from __future__ import annotations

import asyncio
import time

import pytest

from mesh.backends.base import ChatMessage, ChatRequest
from mesh.backends.tiers import TierConfig, load_tiers
from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.contracts import Budget, Goal, RouteDecision, prompt
from mesh.errors import BudgetExceeded, GoalCancelled
from mesh.metrics import Metrics
from mesh.roles.calls import ModelCaller
from mesh.roles.goalstate import GoalState
from mesh.roles.goalstore import GoalStore
from mesh.roles.spec import feedback_kinds
from mesh.roles.worker import CANCEL_RECHECK_SECONDS, Worker
from mesh.router.policy import RulePolicy
from tests.meshkit import role_specs

pytestmark = pytest.mark.timeout(60)
SWARM = RouteDecision(tier="swarm")
PARTS = ["auth", "storage", "api", "docs"]


def _request() -> ChatRequest:
    return ChatRequest(max_tokens=1024, messages=[
        ChatMessage(role="system", content=prompt.system("researcher", "note", "You research.")),
        ChatMessage(role="user", content=prompt.render([(prompt.GOAL, "Build a login system"),
                                                        (prompt.STEP, "Research the options")]))])


def _tiers(settings: MeshSettings, swarm_slots: int) -> dict[str, TierConfig]:
    tiers = load_tiers(settings)
    tiers["swarm"] = tiers["swarm"].model_copy(update={"max_concurrency": swarm_slots})
    return tiers


async def _goal(bus: Bus) -> tuple[GoalStore, str]:
    store = GoalStore(bus)
    state = GoalState(goal=Goal(brief="Build a login system"), status="running")
    await store.create(state)
    return store, state.goal.goal_id


async def test_a_goal_cancelled_during_a_swarm_step_stops_its_remaining_sub_agents(settings: MeshSettings) -> None:
    # Sub-agents take turns on one swarm slot, each call longer than the worker's cancellation re-check.
    slow = settings.model_copy(update={"sim_latency_ms": 1000 * (CANCEL_RECHECK_SECONDS + 0.5)})
    async with await Bus.connect(slow, name="test", role="researcher") as bus:
        store, gid = await _goal(bus)
        caller = ModelCaller(bus, _tiers(slow, swarm_slots=1), RulePolicy(), "test-node", Metrics("researcher"))
        specs = role_specs()
        worker = Worker(bus, specs["researcher"], caller, store, "test-node", feedback_kinds=feedback_kinds(specs))
        scope = caller.scope(gid, "research-1", "researcher", 1)
        check = worker._cancel_check(gid, time.monotonic())  # as a task's handler makes it, right after reading the goal state
        swarm = asyncio.create_task(caller.swarm(_request(), PARTS, SWARM, Budget(), check))
        # `mesh cancel` while the first sub-agent's call is in flight
        await store.mutate(gid, lambda s: (s.finish("cancelled"), True)[1])
        with pytest.raises(GoalCancelled):
            await swarm
        await caller.gateway.aclose()
    # the first sub-agent's call had started; the other three and the composition never called
    assert scope.usage.calls == 1


async def test_a_swarm_step_the_budget_cannot_afford_is_refused_before_it_spends(settings: MeshSettings) -> None:
    async with await Bus.connect(settings.model_copy(update={"sim_latency_scale": 0.0}), name="test",
                                 role="researcher") as bus:
        _, gid = await _goal(bus)
        caller = ModelCaller(bus, _tiers(settings, swarm_slots=8), RulePolicy(), "test-node", Metrics("researcher"))
        scope = caller.scope(gid, "research-1", "researcher", 1)
        req = _request()
        # enough for two calls at their worst case, not for four sub-agents and a composition
        _, one_call = caller.gateway.worst_case("swarm", 200, req.max_tokens)
        budget = Budget(max_cost_usd=2 * one_call)
        with pytest.raises(BudgetExceeded, match="swarm of 4 sub-agents"):
            await caller.swarm(req, PARTS, SWARM, budget, _no_check)
        assert scope.usage.calls == 0
        single = await caller.chat(req, SWARM, budget, _no_check)  # one call alone is affordable
        assert single.usage.calls == 1 and scope.usage.calls == 1
        await caller.gateway.aclose()


async def _no_check() -> None:
    return None
