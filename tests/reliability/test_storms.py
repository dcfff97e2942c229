"""Backend storms, every model call over real HTTP to the sim-server (OpenAI SDK path):

* 30% of calls fail with 429 / 5xx / timeouts: every goal completes;
* one tier fully down: its circuit opens, the router stops choosing it and calls fall back;
* every tier down: goals fail cleanly, with a reason, well within their wall-time budget (no hang)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import aiohttp
import pytest

from mesh.backends.resilience import BreakerPolicy
from mesh.backends.sim.server import SimServer
from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.contracts import (
    TIERS,
    BackendCall,
    Budget,
    Goal,
    GoalCompleted,
    GoalFailed,
    RouteDecided,
    StepCompleted,
)
from tests.meshkit import in_process_mesh, sim_tiers
from tests.reliability.kit import LONG, steps_completed, stream_events, wait_terminal

pytestmark = pytest.mark.timeout(240)

CALL_TIMEOUT = 1.0  # each tier's per-attempt timeout: a "timeout" fault costs this much
WALL_SECONDS = 120.0  # the doomed goals' wall-time budget
GOALS = 6 if LONG else 3


@pytest.fixture
async def sim(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SimServer]:
    async with sim_tiers(monkeypatch, seed=11) as server:
        for tier in TIERS:
            monkeypatch.setenv(f"MESH_TIER_{tier.upper()}_TIMEOUT", str(CALL_TIMEOUT))
        yield server


@pytest.fixture
def fast(settings: MeshSettings) -> MeshSettings:
    return settings.model_copy(update={"health_port": 0, "health_host": "127.0.0.1", "drain_seconds": 5.0})


async def _faults(server: SimServer, faults: str, tier: str | None = None) -> None:
    body = {"faults": faults} | ({"tier": tier} if tier else {})
    async with aiohttp.ClientSession() as http, http.post(f"{server.url}/_sim/faults", json=body) as resp:
        assert resp.status == 200, await resp.text()


async def _all_complete(bus: Bus, settings: MeshSettings) -> None:
    """GOALS goals through an in-process mesh; every one must complete."""
    goals = [Goal(brief=f"Storm goal {i}: build me a login system") for i in range(GOALS)]
    async with in_process_mesh(settings):
        for goal in goals:
            await bus.submit_goal(goal)
        ends = await wait_terminal(bus, [g.goal_id for g in goals], timeout=180)
    assert all(isinstance(e, GoalCompleted) for e in ends.values()), ends


async def _stats(server: SimServer) -> dict[str, int]:
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/_sim/stats") as resp:
        return dict(await resp.json())


async def test_a_30_percent_storm_of_429_5xx_and_timeouts(bus: Bus, fast: MeshSettings, sim: SimServer) -> None:
    await _faults(sim, "429:0.1,503:0.05,500:0.05,timeout:0.1,retry_after:0.2")
    await _all_complete(bus, fast)
    stats = await _stats(sim)
    requests = sum(v for k, v in stats.items() if k.startswith("requests.") and k.split(".")[1] in TIERS)
    faults: Counter[str] = Counter()
    for key, count in stats.items():
        if key.startswith("faults."):
            faults[key.rsplit(".", 1)[1]] += count
    assert {"429", "503", "500", "timeout"} <= set(faults), faults
    assert 0.2 < sum(faults.values()) / requests < 0.4, (faults, requests)  # the storm was real
    outcomes = Counter(e.outcome for e in await stream_events(bus) if isinstance(e, BackendCall))
    assert {"RateLimited", "Overloaded", "ServerError", "BackendTimeout"} <= set(outcomes), outcomes
    print(f"figure: backend storm: {sum(faults.values())} of {requests} HTTP calls failed "
          f"({', '.join(f'{k} {n}' for k, n in faults.most_common())}): {GOALS} goals completed")


async def test_one_tier_down_opens_its_circuit_and_work_falls_back(bus: Bus, fast: MeshSettings,
                                                                   sim: SimServer) -> None:
    down = "long_context"  # the tier the router prefers for most roles
    await _faults(sim, "503:1", tier=down)
    await _all_complete(bus, fast)
    events = await stream_events(bus)
    calls = [e for e in events if isinstance(e, BackendCall)]
    on_down = Counter(e.outcome for e in calls if e.tier == down)
    assert on_down and "ok" not in on_down, on_down
    assert on_down["CircuitOpen"] or any(  # a call refused by the open circuit, or the router steering clear
        isinstance(e, RouteDecided) and e.decision.overridden_by == "circuit" for e in events), on_down
    # Fallback: steps whose call on the down tier failed were answered by another tier.
    failed_steps = {(e.goal_id, e.step_id) for e in calls if e.tier == down}
    rescued = {(e.goal_id, e.step_id) for e in calls if e.tier != down and e.outcome == "ok"} & failed_steps
    assert rescued, "no step fell back to another tier"
    done = {(e.goal_id, e.step_id) for e in events if isinstance(e, StepCompleted)}
    assert {s for s in failed_steps if s[1] not in ("plan", "memory")} <= done  # and those steps completed
    # Once a node's circuit for the tier is open (its breaker's threshold of consecutive failures), that
    # node's router stops choosing the tier until the breaker's reset time allows a probe.
    breaker = BreakerPolicy()
    failures: Counter[str | None] = Counter()
    opened: dict[str | None, datetime] = {}
    # In the order the calls were made: a step's events are sent in batches, so the stream interleaves
    # the steps of one node by up to the outbox's linger, while the breaker counts failures as they happen.
    for e in sorted(calls, key=lambda e: e.at):
        if e.tier == down:
            failures[e.node] += 1
            if failures[e.node] >= breaker.failure_threshold:
                opened.setdefault(e.node, e.at)
    steered = [e for e in events if isinstance(e, RouteDecided) and e.node in opened
               and timedelta(0) < e.at - opened[e.node] < timedelta(seconds=breaker.reset_after)]
    assert steered, f"no routing decision after a circuit opened (opened on {sorted(map(str, opened))})"
    assert all(e.decision.tier != down for e in steered), Counter(e.decision.tier for e in steered)
    print(f"figure: {down} down: its {sum(on_down.values())} calls failed ({dict(on_down)}), its circuit opened on "
          f"{len(opened)} node(s), {len(rescued)} steps fell back to another tier, {len(steered)} later routing "
          f"decisions avoided it; {GOALS} goals completed")


async def test_every_tier_down_fails_goals_cleanly_and_fast(bus: Bus, fast: MeshSettings, sim: SimServer) -> None:
    budget = Budget(max_wall_seconds=WALL_SECONDS)
    before = Goal(brief="Doomed from the start: build me a login system", budget=budget)
    during = Goal(brief="Doomed mid-run: build me a login system", budget=budget)
    async with in_process_mesh(fast):
        await bus.submit_goal(during)
        await asyncio.wait_for(steps_completed(bus, 1, during.goal_id), 60)
        await _faults(sim, "503:1")
        started = time.monotonic()
        await bus.submit_goal(before)
        ends = await wait_terminal(bus, [before.goal_id, during.goal_id], timeout=WALL_SECONDS)
        elapsed = time.monotonic() - started
    for goal in (before, during):
        end = ends[goal.goal_id]
        assert isinstance(end, GoalFailed), end
        assert "every tier failed" in end.reason and ("Overloaded" in end.reason or "CircuitOpen" in end.reason), end.reason
    print(f"figure: every tier down: 2 goals (one mid-run, one new) failed cleanly {elapsed:.1f} s later "
          f"(wall budget {WALL_SECONDS:.0f} s), reason: {ends[before.goal_id].reason[:90]}…")
    assert elapsed < WALL_SECONDS / 2  # no hang: failing takes retries, not the whole budget
