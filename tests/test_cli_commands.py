"""The operator commands against a running mesh: submit, watch, goals, show, status, cancel."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from contextlib import aclosing
from pathlib import Path

import pytest

from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.contracts import GoalCancelled, GoalCompleted, StepStarted
from tests.meshkit import in_process_mesh

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(240)


async def mesh_cli(settings: MeshSettings, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(MESH_NATS_URL=settings.nats_url or "", PYTHONPATH=str(ROOT))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "mesh", *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def fast(settings: MeshSettings) -> MeshSettings:
    return settings.model_copy(update={"sim_latency_scale": 0.0, "drain_seconds": 5.0, "health_port": 0,
                                       "health_host": "127.0.0.1"})


async def test_submit_watch_goals_show_status(fast: MeshSettings, bus: Bus) -> None:
    async with in_process_mesh(fast):
        code, out, err = await mesh_cli(fast, "submit", "Build me a login system", "-c", "Python only")
        assert code == 0, err
        goal_id = out.strip()
        code, out, err = await mesh_cli(fast, "watch", goal_id)  # returns when the goal ends
        assert code == 0, err
        assert "goal completed" in out and "plan v1" in out

        code, out, _ = await mesh_cli(fast, "goals", "--json")
        goals = json.loads(out)
        assert [g["status"] for g in goals if g["goal_id"] == goal_id] == ["completed"]
        code, out, _ = await mesh_cli(fast, "show", goal_id)
        assert code == 0 and "pinned: Python only" in out and "synthesize" in out
        code, out, _ = await mesh_cli(fast, "status", "--json")
        status = json.loads(out)
        assert {n["role"] for n in status["nodes"]} >= {"planner", "coder", "researcher"}
        assert status["consumers"]["role-coder"]["pending"] == 0


async def test_cancel_stops_workers_before_their_next_call(fast: MeshSettings, bus: Bus) -> None:
    slow = fast.model_copy(update={"sim_latency_scale": 1.0})
    async with in_process_mesh(slow):
        async with aclosing(bus.watch_events()) as events:
            code, out, err = await mesh_cli(fast, "submit", "Build me a login system")
            goal_id = out.strip()
            async for event in events:
                if isinstance(event, StepStarted) and event.goal_id == goal_id:
                    break
            code, out, err = await mesh_cli(fast, "cancel", goal_id)
            assert code == 0 and "cancelled" in out, err
            async for event in events:
                if event.goal_id == goal_id and isinstance(event, GoalCancelled | GoalCompleted):
                    assert isinstance(event, GoalCancelled)
                    break
        code, out, _ = await mesh_cli(fast, "show", goal_id, "--json")
        state = json.loads(out)
        assert state["status"] == "cancelled"
        statuses = [st["status"] for st in state["steps"].values()]
        assert statuses.count("completed") < len(statuses), "the goal stopped before running to its end"
    code, _, err = await mesh_cli(fast, "cancel", "no-such-goal")
    assert code == 1 and "no goal 'no-such-goal'" in err
