"""Test helpers that run real role nodes: in-process (fast, one event loop) or as subprocesses
(`python -m mesh node <role>`, for kill -9 and SIGTERM tests). Both talk to a real nats-server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from aiohttp import web

from mesh.backends.sim import SimWorld
from mesh.backends.sim.server import SimServer
from mesh.bus import Bus
from mesh.client import MeshClient
from mesh.config import MeshSettings
from mesh.contracts import EventBase, Goal, GoalCancelled, GoalCompleted, GoalFailed
from mesh.embedded import EmbeddedNats
from mesh.embedded.local import sim_server_env
from mesh.node.runtime import Node
from mesh.roles.spec import RoleSpec, default_nodes_dir, load_specs

TERMINAL = (GoalCompleted, GoalFailed, GoalCancelled)
E = TypeVar("E", bound=EventBase)
ROOT = Path(__file__).resolve().parent.parent


def fast(settings: MeshSettings, **update: object) -> MeshSettings:
    """Settings for a whole local mesh in a test: no sim latency, short drains, health on free ports; ``update``
    changes more (conftest's ``fast`` fixture is this with none)."""
    return settings.model_copy(update={"sim_latency_scale": 0.0, "drain_seconds": 5.0, "health_port": 0,
                                       "health_host": "127.0.0.1", **update})


def role_specs(*, with_ledger: bool = False) -> dict[str, RoleSpec]:
    specs = load_specs(default_nodes_dir())
    return {r: s for r, s in specs.items() if with_ledger or s.kind != "recorder"}


@asynccontextmanager
async def provisioned_nats(store: Path) -> AsyncIterator[EmbeddedNats]:
    """A fresh nats-server with the topology provisioned (what the benchmarks start their meshes on)."""
    async with EmbeddedNats(store) as server:
        await provision_topology(MeshSettings(nats_url=server.url))
        yield server


async def provision_topology(settings: MeshSettings) -> None:
    """What the admin's `mesh provision` does before nodes start (here without role consumers: a test may
    read a role's task subject with a consumer of its own, which a work-queue stream allows only once)."""
    async with await Bus.connect(settings, name="test-admin", check=False) as admin:
        await admin.provision()


@asynccontextmanager
async def in_process_mesh(settings: MeshSettings, replicas: dict[str, int] | None = None,
                          specs: dict[str, RoleSpec] | None = None) -> AsyncIterator[list[Node]]:
    """Every role (or the given replica counts) as in-process nodes, the topology provisioned for
    ``settings`` first; stopped and drained on exit."""
    await provision_topology(settings)
    specs = specs or role_specs()
    counts = replicas or {role: 1 for role in specs}
    nodes = [Node(specs[role], specs, settings) for role, n in counts.items() for _ in range(n)]
    async with asyncio.TaskGroup() as tg:
        for node in nodes:
            tg.create_task(node.run(), name=node.node_id)
        try:
            yield nodes
        finally:
            for node in nodes:
                node.stop.set()


async def run_goal(bus: Bus, goal: Goal, timeout: float = 120.0) -> list[EventBase]:
    """Submit a goal and collect its events until it ends (through ``MeshClient``, as every client does)."""
    client = MeshClient(bus)

    async def collect() -> list[EventBase]:
        return [event async for _, event in client.watch(goal.goal_id, until_final=True)]

    await client.submit(goal)
    return await asyncio.wait_for(collect(), timeout)


class EventLog:
    """A goal's events as they arrive (``follow`` runs in a task the caller owns), and waits for the first
    one that matches, without polling."""

    def __init__(self, client: MeshClient, goal_id: str) -> None:
        self.client, self.goal_id = client, goal_id
        self.events: list[tuple[int, EventBase]] = []
        self._arrived = asyncio.Condition()

    async def follow(self) -> None:
        async for seq, event in self.client.watch(self.goal_id, 0):
            async with self._arrived:
                self.events.append((seq, event))
                self._arrived.notify_all()

    async def wait(self, match: Callable[[EventBase], bool], timeout: float = 60.0, *, after: int = 0) -> EventBase:
        """The first event after stream sequence ``after`` that ``match``es."""
        def found() -> EventBase | None:
            return next((e for seq, e in self.events if seq > after and match(e)), None)

        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: found() is not None), timeout)
        event = found()
        assert event is not None
        return event

    async def position(self, event: EventBase) -> int:
        """The stream sequence of ``event``, once it has arrived here."""
        await self.wait(lambda e: e.event_id == event.event_id)
        return self.seq(event)

    def seq(self, event: EventBase) -> int:
        """The stream sequence of ``event`` (by its id: it may be a copy read elsewhere), once it arrived."""
        return next(seq for seq, e in self.events if e.event_id == event.event_id)

    def of(self, kind: type[E]) -> list[E]:
        return [e for _, e in self.events if isinstance(e, kind)]


def node_env(settings: MeshSettings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(MESH_NATS_URL=settings.nats_url or "", MESH_HEALTH_PORT="0", MESH_HEALTH_HOST="127.0.0.1",
               MESH_ACK_WAIT=str(settings.ack_wait), MESH_NAK_DELAY=str(settings.nak_delay),
               MESH_DATA_DIR=str(settings.data_dir), MESH_SIM_LATENCY_SCALE=str(settings.sim_latency_scale),
               MESH_DRAIN_SECONDS=str(settings.drain_seconds), MESH_ALLOW_SIM="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


class NodeProcess:
    """`python -m mesh node <role>` as a real child process."""

    def __init__(self, role: str, env: dict[str, str], log_dir: Path) -> None:
        self.role = role
        self.env = env
        self.log_path = log_dir / f"{role}-{id(self):x}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NodeProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "mesh", "node", self.role], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@asynccontextmanager
async def http_receiver(path: str, handle: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    """A loopback HTTP server taking POSTs on ``path`` (e.g. an OTLP/HTTP receiver); yields its base URL."""
    app = web.Application()
    app.router.add_post(path, handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def sim_tiers(monkeypatch: pytest.MonkeyPatch, seed: int) -> AsyncIterator[SimServer]:
    """A sim-server (no latency) that every tier calls over HTTP: its ``MESH_TIER_*`` set for this test."""
    async with SimServer(SimWorld(seed=seed, latency_scale=0.0)) as server:
        for key, value in sim_server_env(server.url).items():
            monkeypatch.setenv(key, value)
        yield server
