"""The dev overlay, run on loopback: the exact commands and environment its containers would get.

A user overlay on top of ``k8s/overlays/dev`` (as an operator would write one) points the
long-context tier at a loopback sim-server with a fake API key from Secret ``mesh-api-keys``. The
Secrets are what ``mesh security gen`` writes; nats-server runs the overlay's own configuration with
the generated authorization. Every mesh workload's container is started as a process: its
``command``/``args``, its ``envFrom``/``env`` resolved from the rendered ConfigMaps and the Secrets,
its volumes as folders. Only the NATS URL, the health port and address (loopback, free ports) and
the sim's latency are overridden. Then a goal is submitted and must complete, every node on its own
role's credentials, and no secret may appear in the logs, the event stream or the ledger.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import duckdb
import nats
import pytest

from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.contracts import SYSTEM_GOAL_ID, BackendCall, EventBase, Goal, GoalCompleted, GoalFailed, NodeUp
from mesh.embedded import EmbeddedNats
from mesh.embedded.local import sim_server_env
from mesh.embedded.natsserver import free_port
from mesh.roles.ledger_service import LedgerClient
from tests.k8s_manifests import K8S, Pod, nats_config, one, render, secrets_from, workloads

OVERRIDDEN = {"MESH_NATS_URL", "MESH_HEALTH_PORT", "MESH_HEALTH_HOST", "MESH_SIM_LATENCY_SCALE"}
ROLES = {"planner", "researcher", "coder", "reviewer", "tester", "synthesizer", "ledger"}
TIMEOUT = 240.0


@dataclass
class Container:
    """One started container, restarted when it exits (the pod's restartPolicy: Always)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path
    ready_url: str  # the container's readinessProbe, on the port it got here; "" for a Job
    restarts: int = 0
    stopping: bool = False
    proc: subprocess.Popen[bytes] = field(init=False)

    def spawn(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    async def supervise(self) -> None:
        """A container that exits is started again after a back-off, like the kubelet does (a node
        exits when it cannot reach the mesh in time on a loaded machine; the pod then restarts)."""
        while True:
            await asyncio.to_thread(self.proc.wait)
            if self.stopping:
                return
            self.restarts += 1
            await asyncio.sleep(min(10.0, 2.0 ** self.restarts))  # restart back-off, not synchronisation
            self.spawn()

    async def stop(self) -> int:
        self.stopping = True
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 45)
        except TimeoutError:
            self.proc.kill()
            return await asyncio.to_thread(self.proc.wait)


@dataclass
class Run:
    events: list[EventBase] = field(default_factory=list)
    raw_events: list[bytes] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)
    server_log: str = ""
    ledger_text: str = ""
    ledger_events: int = 0
    users: dict[str, str] = field(default_factory=dict)  # connection name → authenticated user
    secrets: dict[str, str] = field(default_factory=dict)  # what → secret value
    sim_url: str = ""
    overrides: dict[str, set[str]] = field(default_factory=dict)
    exit_codes: dict[str, int] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)


def user_overlay(dest: Path, sim_url: str) -> Path:
    """What an operator adds on top of dev: a real endpoint for one tier, its key from the Secret."""
    prefix = "MESH_TIER_LONG_CONTEXT_"
    tier = {k: v for k, v in sim_server_env(sim_url).items() if k.startswith(prefix)}
    tier[prefix + "API_KEY_ENV"] = "DEEPSEEK_API_KEY"
    dest.mkdir(parents=True)
    literals = "".join(f"      - {k}={v}\n" for k, v in sorted(tier.items()))
    (dest / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(K8S / 'overlays' / 'dev', dest)}\n"
        "configMapGenerator:\n  - name: mesh-config\n    behavior: merge\n    literals:\n" + literals)
    return dest


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("k8s-dev")
    result = Run()
    sim_port = free_port()
    sim = subprocess.Popen([sys.executable, "-m", "mesh", "sim-server", "--host", "127.0.0.1", "--port", str(sim_port),
                            "--latency-scale", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        result.sim_url = f"http://127.0.0.1:{sim_port}"
        asyncio.run(asyncio.wait_for(_run(tmp, result), TIMEOUT))
    finally:
        sim.terminate()
        sim.wait(10)
    yield result


async def _run(tmp: Path, result: Run) -> None:
    await _wait_http(f"{result.sim_url}/healthz")
    docs = render(user_overlay(tmp / "overlay", result.sim_url))

    # Secrets: exactly what `mesh security gen` writes, and the API-key template filled in.
    gen = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "mesh", "security", "gen", "--out",
                                  str(tmp / "sec")], check=False, capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    given = secrets_from(tmp / "sec" / "secrets.yaml")
    api_keys = secrets_from(K8S / "secrets" / "api-keys.template.yaml")["mesh-api-keys"]
    api_keys["DEEPSEEK_API_KEY"] = result.secrets["api key"] = f"sk-mesh-test-{secrets.token_hex(16)}"
    given["mesh-api-keys"] = api_keys
    given["mesh-gateway-tokens"] = {"tokens.toml": _gateway_tokens()}
    result.secrets |= {f"{name} password": data["MESH_NATS_PASSWORD"] for name, data in given.items()
                       if "MESH_NATS_PASSWORD" in data}

    # NATS: the overlay's own configuration (+ the generated auth.conf), on loopback.
    nats_pod = Pod(docs, one(docs, "StatefulSet", "nats"), tmp / "pods" / "nats")
    assert nats_pod.argv(nats_pod.container()) == ["--config", "/etc/nats/nats.conf"]
    conf = nats_config(docs, tmp / "pods" / "nats" / "etc-nats", given["nats-auth"]["auth.conf"],
                       ports={7422: free_port()})
    os.environ["POD_NAME"] = nats_pod.name  # the config reads it (downward API in the pod)
    try:
        server = EmbeddedNats(tmp / "pods" / "nats" / "data", extra_args=["-c", str(conf)])
        await server.start()
    finally:
        os.environ.pop("POD_NAME", None)
    try:
        containers = _containers(docs, given, server.url, tmp, result)
        for job in (c for c in containers if not c.ready_url):  # the provisioning Job, before the nodes
            job.spawn()
            code = await asyncio.to_thread(job.proc.wait)
            assert code == 0, job.log.read_text(errors="replace")
            result.logs[job.name] = job.log.read_text(errors="replace")
        pods = [c for c in containers if c.ready_url]
        async with asyncio.TaskGroup() as tg:
            for p in pods:
                p.spawn()
                tg.create_task(p.supervise())
            try:
                await _drive(server, given, pods, result)
            finally:
                codes = await asyncio.gather(*(p.stop() for p in pods))
        for p, code in zip(pods, codes, strict=True):
            result.exit_codes[p.name] = code
            result.restarts[p.name] = p.restarts
            result.logs[p.name] = p.log.read_text(errors="replace")
        result.raw_events = await _raw_events(server.url, given["mesh-nats-admin"])
    finally:
        await server.stop()
    result.server_log = server.log_path.read_text(errors="replace")
    ledger = one(docs, "StatefulSet", "mesh-ledger")["metadata"]["name"]
    result.ledger_text = _dump_ledger(tmp / "pods" / ledger / "data" / "ledger.duckdb")


def _containers(docs: list[dict], given: dict[str, dict[str, str]], nats_url: str, tmp: Path,
                result: Run) -> list[Container]:
    scripts = Path(sysconfig.get_path("scripts"))
    containers = []
    for w in workloads(docs):
        if w["metadata"]["name"] == "nats":
            continue
        pod = Pod(docs, w, tmp / "pods" / w["metadata"]["name"], secrets=given)
        container = pod.container("provision" if w["kind"] == "Job" else "node")
        mounts = pod.mount(container)
        env = pod.env(container)
        port = free_port()
        overrides = {"MESH_NATS_URL": nats_url, "MESH_HEALTH_PORT": str(port), "MESH_HEALTH_HOST": "127.0.0.1",
                     "MESH_SIM_LATENCY_SCALE": "0"}
        result.overrides[pod.name] = {k for k in overrides if env.get(k) != overrides[k]}
        image_env = {"PATH": f"{scripts}:/usr/bin:/bin", "HOME": str(mounts["/tmp"]), "TMPDIR": str(mounts["/tmp"]),
                     "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}  # the Dockerfile's ENV
        argv = _on_loopback(pod.argv(container), port)
        assert argv[0] == "mesh"
        (tmp / "logs").mkdir(exist_ok=True)
        probe = container.get("readinessProbe")  # none on a Job's container: it runs to completion
        ready = f"http://127.0.0.1:{port}{probe['httpGet']['path']}" if probe else ""
        containers.append(Container(pod.name, [str(scripts / "mesh"), *argv[1:]], {**image_env, **env, **overrides},
                                    pod.root, tmp / "logs" / f"{pod.name}.log", ready))
    return containers


def _on_loopback(argv: list[str], port: int) -> list[str]:
    """A server's bind address in its args (the gateway's ``--host 0.0.0.0 --port 8080``) moved to loopback and
    the pod's free port, like the health address in its environment."""
    out = list(argv)
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(port))):
        if flag in out:
            out[out.index(flag) + 1] = value
    return out


def _gateway_tokens() -> str:
    """The gateway Secret's tokens.toml with one real token, as `mesh gateway token` prints its entry."""
    token = secrets.token_urlsafe(24)
    return f'[[token]]\nname = "smoke"\nsha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'


async def _drive(server: EmbeddedNats, given: dict[str, dict[str, str]], pods: list[Container],
                 result: Run) -> None:
    for p in pods:  # the readiness probes, as the kubelet would poll them
        await _wait_http(p.ready_url)
    operator = given["mesh-nats-operator"]
    settings = MeshSettings(nats_url=server.url, nats_user=operator["MESH_NATS_USER"],
                            nats_password=operator["MESH_NATS_PASSWORD"],
                            nats_inbox_prefix=operator["MESH_NATS_INBOX_PREFIX"])
    async with await Bus.connect(settings, name="operator") as bus:
        goal = Goal(brief="Build me a login system", constraints=["Python 3.11"])
        async with aclosing(bus.watch_events(goal.goal_id)) as stream:
            await bus.submit_goal(goal)
            async for event in stream:
                result.events.append(event)
                if isinstance(event, GoalCompleted | GoalFailed):
                    break
        nodes = sum(1 for p in pods if p.argv[1] == "node")  # the gateway is a pod but not a node
        async with aclosing(bus.watch_events(SYSTEM_GOAL_ID)) as system:  # node.up of every node
            async for event in system:
                result.events.append(event)
                if sum(isinstance(e, NodeUp) for e in result.events) >= nodes:
                    break
        result.users = await _connection_users(server)
        ledger = LedgerClient(bus)  # the operator may ask the ledger; wait until it has the goal
        for _ in range(200):
            rows = (await ledger.sql(f"SELECT count(*) FROM events WHERE goal_id = '{goal.goal_id}'")).rows
            result.ledger_events = int(rows[0][0])
            if result.ledger_events >= sum(1 for e in result.events if e.goal_id == goal.goal_id):
                break
            await asyncio.sleep(0.1)  # ingest is batched; there is no event for "caught up" to await


async def _connection_users(server: EmbeddedNats) -> dict[str, str]:
    async with aiohttp.ClientSession() as s, s.get(f"{server.monitor_url}/connz?auth=true&limit=1024") as r:
        conns = (await r.json())["connections"]
    return {c.get("name", ""): c.get("authorized_user", "") for c in conns}


async def _raw_events(url: str, admin: dict[str, str]) -> list[bytes]:
    nc = await nats.connect(url, user=admin["MESH_NATS_USER"], password=admin["MESH_NATS_PASSWORD"])
    try:
        js = nc.jetstream()
        info = await js.stream_info("MESH_EVENTS")
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg("MESH_EVENTS", seq)
            out.append((msg.data or b"") + json.dumps(msg.headers or {}).encode())
        return out
    finally:
        await nc.close()


def _dump_ledger(path: Path) -> str:
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        return "\n".join(repr(con.execute(f'SELECT * FROM "{t}"').fetchall()) for t in tables)
    finally:
        con.close()


async def _wait_http(url: str, timeout: float = 120.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            with suppress(aiohttp.ClientError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            assert asyncio.get_running_loop().time() < deadline, f"{url} not ready within {timeout}s"
            await asyncio.sleep(0.1)  # polling a readiness endpoint, as the kubelet does


# --- the run's findings ----------------------------------------------------------------------------


def test_the_dev_overlay_completes_a_goal(run: Run) -> None:
    assert isinstance(next(e for e in run.events if isinstance(e, GoalCompleted | GoalFailed)), GoalCompleted)
    assert {e.role for e in run.events if isinstance(e, NodeUp)} == ROLES
    assert all(code == 0 for code in run.exit_codes.values()), run.exit_codes  # SIGTERM drains and exits 0


def test_only_the_loopback_addresses_were_overridden(run: Run) -> None:
    for pod, keys in run.overrides.items():
        assert keys <= OVERRIDDEN, pod


def test_every_node_connected_as_its_own_role(run: Run) -> None:
    nodes = {name: user for name, user in run.users.items() if name.split("-")[0] in ROLES}
    assert {name.split("-")[0] for name in nodes} == ROLES, run.users
    for name, user in nodes.items():
        assert user == name.split("-")[0], (name, user)
    assert "Permissions Violation" not in run.server_log


def test_the_api_key_was_used_on_the_real_http_path(run: Run) -> None:
    calls = [e for e in run.events if isinstance(e, BackendCall) and e.tier == "long_context"]
    assert calls and all(run.sim_url in c.endpoint for c in calls)


def test_secrets_never_appear_in_events_logs_or_the_ledger(run: Run) -> None:
    assert run.ledger_events > 0 and run.ledger_text  # the ledger did record the goal
    assert len(run.raw_events) >= len(run.events)
    haystacks = {"event stream": b"\n".join(run.raw_events).decode(errors="replace"), "ledger": run.ledger_text,
                 "nats-server log": run.server_log, **{f"log of {k}": v for k, v in run.logs.items()}}
    assert len(run.secrets) >= 8  # the API key and every role's NATS password
    for what, secret in run.secrets.items():
        for where, text in haystacks.items():
            assert secret not in text, f"the {what} appears in the {where}"
