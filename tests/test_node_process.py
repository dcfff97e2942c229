"""Role nodes as real OS processes: health endpoints, SIGTERM drain, kill -9 mid-step."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
from collections import Counter
from contextlib import aclosing
from pathlib import Path

import aiohttp
import pytest

from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.contracts import Goal, GoalCompleted, NodeDown, NodeUp, StepCompleted, StepStarted
from mesh.embedded.natsserver import free_port
from tests.meshkit import TERMINAL, NodeProcess, in_process_mesh, node_env, role_specs

pytestmark = pytest.mark.timeout(240)


async def _first(bus: Bus, goal_id: str | None, kind: type, role: str | None = None) -> object:
    async with aclosing(bus.watch_events(goal_id)) as events:
        async for event in events:
            if isinstance(event, kind) and (role is None or getattr(event, "role", None) == role):
                return event
    raise AssertionError("event stream ended")


async def test_health_ready_and_metrics_endpoints(fast: MeshSettings, bus: Bus, tmp_path: Path) -> None:
    port = free_port()
    node = NodeProcess("researcher", node_env(fast, MESH_HEALTH_PORT=str(port)), tmp_path).start()
    try:
        await asyncio.wait_for(_first(bus, "_system", NodeUp, "researcher"), 30)
        async with aiohttp.ClientSession() as http:
            for _ in range(100):  # readiness follows node.up by one provisioning round trip
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.05)
            assert resp.status == 200, await resp.text()
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
            assert "mesh_tasks_total" in text and "mesh_backend_tokens_total" in text
        node.signal(signal.SIGTERM)
        assert await node.wait() == 0
    finally:
        node.stop()


async def test_a_busy_health_port_outside_kubernetes_falls_back_to_a_free_one(
        fast: MeshSettings, bus: Bus, tmp_path: Path) -> None:
    """Two nodes on one machine with the default port 8080: the second must not die of it. Inside
    Kubernetes (KUBERNETES_SERVICE_HOST set) the probes expect the configured port: a clear error."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        env = node_env(fast, MESH_HEALTH_PORT=str(busy))
        node = NodeProcess("ledger", env, tmp_path).start()
        try:
            await asyncio.wait_for(_first(bus, "_system", NodeUp, "ledger"), 60)
            assert f"port {busy} is in use" in node.log()
            port = int(re.findall(r"health endpoint on http://127\.0\.0\.1:(\d+)", node.log())[-1])
            assert port != busy
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
            node.signal(signal.SIGTERM)
            assert await node.wait() == 0
        finally:
            node.stop()
        in_k8s = NodeProcess("ledger", env | {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, tmp_path).start()
        try:
            assert await in_k8s.wait(60) != 0
            assert f"cannot serve /healthz on 127.0.0.1:{busy}" in in_k8s.log()
        finally:
            in_k8s.stop()


@pytest.mark.parametrize("drain_seconds", [60.0, 0.3], ids=["finishes-in-flight", "hands-back"])
async def test_sigterm_mid_step_loses_nothing(fast: MeshSettings, bus: Bus, tmp_path: Path,
                                              drain_seconds: float) -> None:
    """SIGTERM to a coder mid-step: it finishes the step, or hands it back to another replica."""
    others = {r: 1 for r in role_specs() if r != "coder"}
    slow_coder = NodeProcess("coder", node_env(fast, MESH_SIM_LATENCY_SCALE="1.0",
                                               MESH_DRAIN_SECONDS=str(drain_seconds)), tmp_path).start()
    goal = Goal(brief="Build me a login system")
    try:
        async with in_process_mesh(fast, others):
            started = asyncio.create_task(_first(bus, goal.goal_id, StepStarted, "coder"))
            await bus.submit_goal(goal)
            await asyncio.wait_for(started, 60)
            slow_coder.signal(signal.SIGTERM)
            assert await slow_coder.wait(90) == 0, slow_coder.log()[-2000:]
            down = await asyncio.wait_for(_first(bus, "_system", NodeDown, "coder"), 10)
            assert "drain timeout" in down.reason if drain_seconds < 1 else down.reason == "shutdown"  # type: ignore[attr-defined]
            replacement = NodeProcess("coder", node_env(fast), tmp_path).start()
            try:
                events = []
                async with aclosing(bus.watch_events(goal.goal_id)) as stream:
                    async for event in stream:
                        events.append(event)
                        if isinstance(event, TERMINAL):
                            break
            finally:
                replacement.stop()
    finally:
        slow_coder.stop()
    assert isinstance(events[-1], GoalCompleted), events[-1]
    completed = Counter(e.step_id for e in events if isinstance(e, StepCompleted))
    assert max(completed.values()) == 1, completed


async def test_kill_9_of_a_worker_mid_step_is_redelivered_and_completed(fast: MeshSettings, bus: Bus,
                                                                         tmp_path: Path) -> None:
    others = {r: 1 for r in role_specs() if r != "reviewer"}
    doomed = NodeProcess("reviewer", node_env(fast, MESH_SIM_LATENCY_SCALE="1.0"), tmp_path).start()
    goal = Goal(brief="Build me a login system")
    try:
        async with in_process_mesh(fast, others):
            started = asyncio.create_task(_first(bus, goal.goal_id, StepStarted, "reviewer"))
            done = asyncio.create_task(_first(bus, goal.goal_id, GoalCompleted))
            await bus.submit_goal(goal)
            await asyncio.wait_for(started, 60)
            doomed.signal(signal.SIGKILL)
            await doomed.wait()
            survivor = NodeProcess("reviewer", node_env(fast), tmp_path).start()
            try:
                await asyncio.wait_for(done, 120)
            finally:
                survivor.stop()
    finally:
        doomed.stop()
