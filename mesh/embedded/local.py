"""The embedded local mesh behind ``mesh up`` and ``mesh run``: a nats-server (unless MESH_NATS_URL
points elsewhere), a sim-server when no model endpoint is configured, a real edge model server when
the ``edge`` extra is installed (``mesh.embedded.edge``; it takes the edge tier over from the sim),
and one OS process per role, each restarted with backoff if it dies. ``stop()`` sends SIGTERM (nodes
drain) and then SIGKILL, then stops the servers. Every child is a ``mesh.embedded.child.ChildProcess``:
in its own session, and dying with this process even when it is killed -9.

The running mesh writes ``<data_dir>/local.json`` (NATS URL, pids) so ``mesh submit``/``watch``/
``status`` in another terminal find it; its own nats-server wants the token of ``<data_dir>/nats-token``
(``mesh.embedded.localauth``), which those commands read and the nodes get in their environment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Iterable, Sequence
from contextlib import suppress
from pathlib import Path

from pydantic import SecretStr

from mesh.config import MeshSettings
from mesh.embedded.child import ChildProcess
from mesh.embedded.edge import EdgeModelServer
from mesh.embedded.localauth import LOCAL_FILE, new_token, token_path
from mesh.embedded.natsserver import EmbeddedNats, free_port
from mesh.embedded.readiness import wait_http

log = logging.getLogger(__name__)
MAX_BACKOFF = 30.0


class RoleProcess:
    """One ``mesh node <role>`` child process, restarted with exponential backoff when it dies."""

    def __init__(self, role: str, env: dict[str, str], log_dir: Path) -> None:
        self.role = role
        self.child = ChildProcess([sys.executable, "-m", "mesh", "node", role], log_dir / f"{role}.log",
                                  what=f"node {role}", env=env)
        self.restarts = 0
        self.stopping = False

    @property
    def log_path(self) -> Path:
        return self.child.log_path

    @property
    def pid(self) -> int | None:
        return self.child.pid

    def spawn(self) -> None:
        self.child.start()

    async def supervise(self) -> None:
        backoff = 1.0
        while not self.stopping:
            code = await self.child.wait()
            if self.stopping:
                return
            self.restarts += 1
            log.warning("node %s exited with %s; restarting in %.0fs (see %s)", self.role, code, backoff, self.log_path)
            await asyncio.sleep(backoff)  # restart backoff, not synchronisation
            backoff = min(MAX_BACKOFF, backoff * 2)
            if not self.stopping:
                self.spawn()

    def terminate(self) -> None:
        """SIGTERM: the node drains (``wait`` awaits it)."""
        self.stopping = True
        self.child.signal(signal.SIGTERM)

    async def wait(self, timeout: float) -> None:
        """Until the node has exited; SIGKILL after ``timeout``."""
        if self.child.proc is None:
            return
        try:
            await asyncio.wait_for(self.child.wait(), timeout)
        except TimeoutError:
            log.warning("node %s pid %s did not drain in %.0fs; killing it", self.role, self.pid, timeout)
            self.child.kill()


class LocalMesh:
    def __init__(self, settings: MeshSettings, roles: list[str], *, sim_tiers: Sequence[str] = (),
                 edge_model: Path | None = None, model_tiers: Sequence[str] = ("edge",)) -> None:
        """``sim_tiers``: the tiers a local sim-server serves (none: no sim-server); ``edge_model``: a GGUF
        file served locally, for ``model_tiers`` (the edge tier; every tier with ``MESH_TIERS=local``)."""
        self.settings = settings
        self.roles = roles
        self.data_dir = settings.data_dir.resolve()
        self.nats: EmbeddedNats | None = None
        self.sim: ChildProcess | None = None
        self.sim_url: str | None = None
        self.sim_tiers = tuple(sim_tiers)
        self.edge = EdgeModelServer(edge_model, self.data_dir / "logs" / "edge-model.log") if edge_model else None
        self.model_tiers = tuple(model_tiers)
        self.procs: list[RoleProcess] = []
        self.url = settings.nats_url or ""
        self.token: SecretStr | None = None  # of our own nats-server

    @property
    def client_settings(self) -> MeshSettings:
        """Settings that reach this mesh (its URL, and its token when it runs its own server)."""
        update: dict[str, object] = {"nats_url": self.url}
        if self.token is not None:
            update["nats_token"] = self.token
        return self.settings.model_copy(update=update)

    async def start(self) -> None:
        """Servers, then nodes; when a part fails to come up, the parts already up are stopped again."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        if not self.url:
            self.token = new_token(self.data_dir)
            self.nats = EmbeddedNats(self.data_dir / "nats", http_port=None, token=self.token)
            await self.nats.start()
            self.url = self.nats.url
        # MESH_ALLOW_SIM: the embedded default is where simulation is allowed (and said so on screen).
        env = {**os.environ, "MESH_NATS_URL": self.url, "MESH_HEALTH_PORT": "0", "MESH_HEALTH_HOST": "127.0.0.1",
               "MESH_DATA_DIR": str(self.data_dir), "MESH_ALLOW_SIM": "1"}
        if self.token is not None:
            env["MESH_NATS_TOKEN"] = self.token.get_secret_value()
        if self.sim_tiers:  # started first: it imports and binds while the topology is provisioned
            env.update(self._spawn_sim_server())
        await self._provision()
        if self.edge is not None:  # after the sim's env: the real model takes the edge tier over
            await self.edge.start()
            env.update(self.edge.tier_env(self.model_tiers))
        self.procs = [RoleProcess(role, env, self.data_dir / "logs") for role in self.roles]
        for p in self.procs:
            p.spawn()
        if self.sim is not None:  # awaited after the nodes are spawned: they need it only at their first call
            await wait_http(f"{self.sim_url}/healthz", self.sim)
        (self.data_dir / LOCAL_FILE).write_text(json.dumps(
            {"nats_url": self.url, "sim_url": self.sim_url, "edge_url": self.edge.base_url if self.edge else None,
             "pid": os.getpid(),
             "nodes": {p.role: p.pid for p in self.procs if p.pid}}))

    async def _provision(self) -> None:
        """The topology, provisioned once before any node starts, so every node's own provisioning is a
        no-op; on our own server as its admin: consumers an older release left behind are pruned (on a
        server given by MESH_NATS_URL that is its operator's act — role users may not delete)."""
        from mesh.bus.client import Bus

        async with await Bus.connect(self.client_settings, name="mesh-up", check=False) as bus:
            await bus.provision(self.roles, prune=self.nats is not None)

    def _spawn_sim_server(self) -> dict[str, str]:
        """A sim-server process on loopback (not yet answering), and the environment pointing every tier
        at it over HTTP."""
        port = free_port()
        self.sim_url = f"http://127.0.0.1:{port}"
        self.sim = ChildProcess([sys.executable, "-m", "mesh", "sim-server", "--host", "127.0.0.1", "--port", str(port)],
                                self.data_dir / "logs" / "sim-server.log", what="sim-server")
        self.sim.start()
        return sim_server_env(self.sim_url, self.sim_tiers)

    async def supervise(self) -> None:
        """Restart dead nodes until ``stop()``; returns when every supervisor has returned."""
        async with asyncio.TaskGroup() as tg:
            for p in self.procs:
                tg.create_task(p.supervise())

    async def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        grace = self.settings.drain_seconds + 5
        async with asyncio.TaskGroup() as tg:
            for p in self.procs:
                tg.create_task(p.wait(grace))
        if self.sim is not None:
            await self.sim.stop(5)
        if self.edge is not None:
            await self.edge.stop()
        if self.nats is not None:
            await self.nats.stop()
        for done in (self.data_dir / LOCAL_FILE, token_path(self.data_dir), self.nats.auth_conf if self.nats else None):
            if done is not None:
                with suppress(FileNotFoundError):
                    done.unlink()


def sim_server_env(url: str, tiers: Iterable[str] | None = None) -> dict[str, str]:
    """Point ``tiers`` (default: every tier) at a sim-server through the real OpenAI SDK path, keeping the
    sim profiles (window, prices) so routing and cost accounting look like the real tiers."""
    from mesh.backends.tiers import load_tiers

    env: dict[str, str] = {}
    wanted = None if tiers is None else set(tiers)
    for name, cfg in load_tiers(environ={}).items():
        if wanted is not None and name not in wanted:
            continue
        prefix = f"MESH_TIER_{name.upper()}_"
        env |= {prefix + "KIND": "openai", prefix + "BASE_URL": f"{url}/v1", prefix + "MODEL": cfg.model,
                prefix + "CONTEXT_WINDOW": str(cfg.context_window), prefix + "OUTPUT_RESERVE": str(cfg.output_reserve),
                prefix + "THINKING": str(cfg.thinking).lower(), prefix + "API_KEY_ENV": "MESH_SIM_API_KEY",
                prefix + "SEND_HINTS": "true", prefix + "SIM": "true"}
        env |= {f"{prefix}PRICE_{p.upper()}": str(v) for p, v in cfg.prices.model_dump().items()}
    env["MESH_SIM_API_KEY"] = "sim-local"  # the SDKs insist on a key; the sim ignores it
    return env
