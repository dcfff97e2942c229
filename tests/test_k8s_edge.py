"""An edge site on loopback, from the manifests: a hub nats-server with the dev overlay's NATS
configuration and a leaf nats-server with the edge overlay's (its own JetStream domain, the remote
to the hub), each with its own generated users; the site's planner and workers run against the leaf.
A goal completes at the site; while the leaf's link is cut (a TCP proxy we control) the site keeps
working, and the site's events reach the hub's copy when the link returns."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, contextmanager, suppress
from pathlib import Path

import pytest

from mesh.bus import Bus
from mesh.bus.topology import Topology
from mesh.config import MeshSettings
from mesh.contracts import Event, Goal, GoalCompleted, GoalFailed, GoalPlanned
from mesh.embedded import EmbeddedNats
from mesh.embedded.local import RoleProcess
from mesh.embedded.natsserver import free_port
from mesh.roles.spec import load_specs
from mesh.security import Generated, PermissionSet, generate
from mesh.security.permissions import leaf_user
from tests.k8s_manifests import nats_config, one, render

EDGE = render("edge")
DOMAIN = re.search(r"domain: ([a-z0-9-]+)", one(EDGE, "ConfigMap", "nats-config")["data"]["topology.conf"])[1]  # type: ignore[index]


@contextmanager
def pod_env(**env: str) -> Iterator[None]:
    """The NATS container's environment (downward API, Secret) while its server starts."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class LinkProxy:
    """A TCP hop between the leaf and the hub that can be cut and restored (same port)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        await self._server.wait_closed()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(pump(reader, up_writer))
            tg.create_task(pump(up_reader, writer))
        self._writers -= {writer, up_writer}


def creds(gen: Generated, user: str) -> dict[str, str]:
    return next(c for c in gen.credentials if c.user == user).env()


def settings(url: str, gen: Generated, user: str, **kw: object) -> MeshSettings:
    env = creds(gen, user)
    return MeshSettings(nats_url=url, nats_user=env["MESH_NATS_USER"], nats_password=env["MESH_NATS_PASSWORD"],
                        nats_inbox_prefix=env["MESH_NATS_INBOX_PREFIX"], **kw)  # type: ignore[arg-type]


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedNats, Generated, int]]:
    specs = load_specs()
    hub_topology = Topology(edge_domains=(DOMAIN,))
    gen = generate(tmp_path / "hub-sec", PermissionSet(hub_topology, specs).users([DOMAIN]), cost=4)
    leaf_port = free_port()
    conf = nats_config(render("dev"), tmp_path / "hub" / "etc-nats", gen.auth_conf.read_text(), ports={7422: leaf_port})
    server = EmbeddedNats(tmp_path / "hub" / "data", extra_args=["-c", str(conf)])
    with pod_env(POD_NAME="nats-0"):
        await server.start()
    try:
        # the hub's `mesh provision` with MESH_EDGE_DOMAINS set: the hub's copy of the site's events
        async with await Bus.connect(settings(server.url, gen, "admin", edge_domains=DOMAIN), check=False) as admin:
            await admin.provision()
        yield server, gen, leaf_port
    finally:
        await server.stop()


@pytest.mark.timeout(240)
async def test_edge_site_works_through_a_link_outage_and_catches_the_hub_up(
        tmp_path: Path, hub: tuple[EmbeddedNats, Generated, int]) -> None:
    hub_server, hub_gen, hub_leaf_port = hub
    link = LinkProxy(hub_leaf_port)
    await link.start()
    leaf_password = creds(hub_gen, leaf_user(DOMAIN))["MESH_NATS_PASSWORD"]

    specs = load_specs()
    edge_gen = generate(tmp_path / "edge-sec", PermissionSet(Topology(), specs).users(), cost=4)
    site = tmp_path / "edge"
    conf = nats_config(EDGE, site / "etc-nats", edge_gen.auth_conf.read_text())
    leaf = EmbeddedNats(site / "data", extra_args=["-c", str(conf)])
    hub_url = f"nats-leaf://{leaf_user(DOMAIN)}:{leaf_password}@127.0.0.1:{link.port}"  # Secret nats-leaf-remote
    with pod_env(POD_NAME="nats-0", HUB_LEAF_URL=hub_url):
        await leaf.start()
    roles = [r for r, s in specs.items() if s.kind != "recorder"]
    try:
        # the site's `mesh provision --domain`, as its admin, before its nodes start
        async with await Bus.connect(settings(leaf.url, edge_gen, "admin"), check=False, domain=DOMAIN) as admin:
            await admin.provision()
        base_env = {**os.environ, "MESH_NATS_URL": leaf.url, "MESH_HEALTH_PORT": "0", "MESH_HEALTH_HOST": "127.0.0.1",
                    "MESH_SIM_LATENCY_SCALE": "0", "MESH_DATA_DIR": str(site / "mesh")}
        procs = [RoleProcess(r, {**base_env, **creds(edge_gen, r)}, site) for r in roles]
        for p in procs:
            p.spawn()
        try:
            async with await Bus.connect(settings(leaf.url, edge_gen, "operator")) as edge, \
                       await Bus.connect(settings(hub_server.url, hub_gen, "operator")) as hub_bus:
                goal = Goal(brief="Build me a login system")
                await edge.submit_goal(goal)
                async with aclosing(edge.watch_events(goal.goal_id)) as events:
                    await _until(events, GoalPlanned)
                    await link.cut()  # the site is on its own from here
                    done = await _until(events, GoalCompleted, GoalFailed)
                assert isinstance(done, GoalCompleted), done
                stream = hub_bus.topology.edge_events_stream(DOMAIN)
                completed = hub_bus.topology.event_subject(goal.goal_id, "planner", "goal.completed")
                assert await _count(hub_bus, stream, completed) == 0  # nothing crossed while cut

                await link.start()
                for _ in range(600):
                    if await _count(hub_bus, stream, completed) == 1:
                        break
                    await asyncio.sleep(0.1)  # sourcing has no event to await from the outside
                assert await _count(hub_bus, stream, completed) == 1
                at_hub = await _count(hub_bus, stream, f"mesh.event.{goal.goal_id}.>")
                at_edge = await _count(edge, edge.topology.events_stream, f"mesh.event.{goal.goal_id}.>")
                assert at_hub == at_edge  # every event of the goal, not just the last one
                # the hub's own streams saw none of it: only the sourced copy did
                assert await _count(hub_bus, hub_bus.topology.events_stream, f"mesh.event.{goal.goal_id}.>") == 0
                assert await _count(hub_bus, hub_bus.topology.tasks_stream, "mesh.task.>") == 0
        finally:
            for p in procs:
                p.terminate()
            await asyncio.gather(*(p.wait(40) for p in procs))
            await link.cut()
    finally:
        await leaf.stop()


async def _until(events: AsyncIterator[Event], *types: type) -> Event:
    async def first() -> Event:
        async for event in events:
            if isinstance(event, types):
                return event
        raise AssertionError("event stream ended")

    return await asyncio.wait_for(first(), 120)


async def _count(bus: Bus, stream: str, subject: str) -> int:
    """Messages on ``subject`` in ``stream`` (the stream's per-subject totals)."""
    info = await bus._js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())
