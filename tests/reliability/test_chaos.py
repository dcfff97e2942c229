"""Chaos: every role (planner and ledger included) runs as a real process; while goals run, one of
them is killed -9 every few seconds and started again. Every goal completes, no step is applied
twice, nothing planned is lost, and the ledger ends with exactly the stream's messages.

Default variant: 8 goals, a kill every 1.5–3 s, one more goal per kill until every role has died
once. ``MESH_LONG=1``: 20 goals."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import pytest

from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.contracts import Goal, GoalCompleted, StepStarted
from mesh.roles.ledger_service import LedgerClient
from tests.ledgerkit import Eventually, caught_up, stream_messages
from tests.meshkit import node_env, role_specs
from tests.reliability.kit import (
    LONG,
    Activity,
    Fleet,
    chaos,
    check_applied_once,
    stream_events,
    wait_terminal,
)

pytestmark = pytest.mark.timeout(900 if LONG else 300)

GOALS = 20 if LONG else 8


async def test_kill_9_of_any_node_loses_nothing_and_applies_nothing_twice(
        bus: Bus, settings: MeshSettings, eventually: Eventually, tmp_path: Path) -> None:
    roles = list(role_specs(with_ledger=True))
    # 200 ms per model call: goals last long enough for every role to die mid-work at least once.
    env = node_env(settings, MESH_SIM_LATENCY_MS="200", MESH_DRAIN_SECONDS="2")
    fleet = Fleet(roles, env, tmp_path / "logs").start()
    goals = [Goal(brief=f"Chaos goal {i}: build me a login system") for i in range(GOALS)]
    goal_ids = [g.goal_id for g in goals]
    stop = asyncio.Event()
    started = time.monotonic()
    try:
        async with asyncio.TaskGroup() as tg:
            activity = Activity(r for r, s in role_specs().items() if s.kind == "worker")
            follower = tg.create_task(activity.follow(bus))
            seed = int(os.environ.get("MESH_CHAOS_SEED", "9"))
            killer = tg.create_task(chaos(fleet, stop, every=(1.5, 3.0), seed=seed, activity=activity))
            for goal in goals:
                await bus.submit_goal(goal)
            # On a fast machine the goals can all end before every role has died once: one more goal
            # after each kill keeps work in flight until the schedule has been round every role.
            while set(fleet.kills) != set(roles):
                await fleet.next_kill(len(fleet.kills))
                extra = Goal(brief=f"Chaos goal {len(goals)}: build me a login system")
                goals.append(extra)
                goal_ids.append(extra.goal_id)
                await bus.submit_goal(extra)
            try:
                ends = await wait_terminal(bus, goal_ids, timeout=600 if LONG else 240)
            finally:
                stop.set()
            await killer
            follower.cancel()
        elapsed = time.monotonic() - started
        failed = {gid: e for gid, e in ends.items() if not isinstance(e, GoalCompleted)}
        assert not failed, failed
        assert set(fleet.kills) == set(roles), fleet.kills  # every role died at least once, planner and ledger too

        # Stop everyone but the ledger (SIGTERM: drained, node.down), so the stream stands still.
        await fleet.started()
        exits = await fleet.terminate([r for r in roles if r != "ledger"])
        assert set(exits.values()) == {0}, exits
        client = LedgerClient(bus, timeout=10)
        await caught_up(eventually, client, bus, timeout=60)
        total = await stream_messages(bus)
        counts = await client.sql("SELECT count(*), count(DISTINCT seq) FROM events")
        assert counts.rows == [(total, total)], (counts.rows, total)

        assert (await fleet.terminate(["ledger"])) == {"ledger": 0}
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.stop()
    events = await stream_events(bus)
    check_applied_once(events, goal_ids)
    # The kills landed mid-work: steps whose task was delivered again after its worker died.
    rerun = {(e.goal_id, e.step_id) for e in events if isinstance(e, StepStarted) and e.goal_id in goal_ids
             and not e.event_id.endswith(".started.1")}
    assert rerun, "no kill interrupted a step"
    print(f"figure: chaos: {len(goals)} goals completed in {elapsed:.0f} s while a node was killed -9 and restarted "
          f"{len(fleet.kills)} times ({', '.join(f'{r} {n}' for r, n in Counter(fleet.kills).most_common())}); "
          f"{len(rerun)} interrupted steps ran again; each step completed once; ledger rows = stream messages "
          f"= {total}")
