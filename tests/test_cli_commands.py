"""The operator commands against a running mesh: submit, watch, goals, show, status, cancel."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from contextlib import aclosing
from pathlib import Path

import pytest

from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.contracts import GoalCancelled, GoalCompleted, NodeUp, StepStarted
from tests.meshkit import NodeProcess, in_process_mesh, node_env

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


async def test_status_stops_listing_a_killed_node_within_seconds(fast: MeshSettings, bus: Bus, tmp_path: Path) -> None:
    """A node killed -9 says no goodbye: its heartbeat entry stays until the bucket's 15 s TTL, but
    `mesh status` stops listing it once its beats are overdue (3 missed 2 s beats)."""
    node = NodeProcess("ledger", node_env(fast), tmp_path).start()
    try:
        async with aclosing(bus.watch_events("_system")) as events:
            async for event in events:
                if isinstance(event, NodeUp) and event.role == "ledger":
                    break
        _, out, _ = await mesh_cli(fast, "status", "--json")
        assert [n["role"] for n in json.loads(out)["nodes"]] == ["ledger"]
        node.signal(signal.SIGKILL)
        await node.wait()
        killed = time.monotonic()
        while True:
            _, out, _ = await mesh_cli(fast, "status", "--json")
            status = json.loads(out)
            if not status["nodes"]:
                break
            assert time.monotonic() - killed < 12, status
        gone = time.monotonic() - killed
        assert [n["role"] for n in status["overdue"]] == ["ledger"]  # the entry is still there: the TTL has not run out
        _, text, _ = await mesh_cli(fast, "status")
        assert "no heartbeat lately (stopped or killed): ledger-" in text
        print(f"figure: a killed node left `mesh status` {gone:.1f} s after kill -9")
    finally:
        node.stop()
