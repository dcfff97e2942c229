"""The attacks through a real tester step: the attack code is the goal's initial workspace (a pytest
file the tester's `python -m pytest` collects), the tester is a real node process whose environment
holds a planted secret, the rest of the mesh runs in-process on a real nats-server. The attack writes
what it found into the workspace, which comes back as the goal's final workspace.

Two deployments: the node as root with bubblewrap (CI), and as an unprivileged user with the fallback
(a Kubernetes pod under RuntimeDefault). The fork bomb and the planted link are covered through
`mesh tools run` (tests/test_sandbox.py): a run that hits its timeout or a refused read-back keeps no
results file to inspect."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from mesh.backends.sim import SimServer, SimWorld
from mesh.bus import Bus
from mesh.client import MeshClient
from mesh.config import MeshSettings
from mesh.contracts import Goal, GoalCompleted, ToolCall
from tests.meshkit import in_process_mesh, node_env, role_specs
from tests.sandboxkit import as_user, give
from tests.test_sandbox import PLANTED, _mode_skip, running_with

pytestmark = pytest.mark.timeout(300)

ATTACK = '''
import glob, json, os, socket, time

def test_attack():
    found = {"environ": [], "network": {}, "token": TOKEN}
    for path in [f"/proc/{os.getppid()}/environ", "/proc/1/environ", *glob.glob("/proc/*/environ")]:
        try:
            if PLANTED.encode() in open(path, "rb").read():
                found["environ"].append(path)
        except OSError:
            pass
    if PLANTED in repr(dict(os.environ)):
        found["environ"].append("os.environ")
    for port in PORTS:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=3).close()
            found["network"][port] = "connected"
        except OSError as exc:
            found["network"][port] = f"refused: {exc}"
    files = []
    try:
        for _ in range(10_000):
            files.append(open(__file__))
    except OSError as exc:
        found["open_files"] = [len(files), exc.errno]
    for f in files:
        f.close()
    if os.fork() == 0:  # a setsid daemon, double-forked, that would sleep for a minute
        os.setsid()
        if os.fork() == 0:
            os.execv("/bin/sleep", ["sleep", "60", TOKEN])
        os._exit(0)
    with open("attack-results.json", "w") as out:
        json.dump(found, out)
'''


@pytest.mark.parametrize(("user", "mode"), [("root", "bwrap"), ("unprivileged", "fallback")],
                         ids=["root-bwrap", "unprivileged-fallback"])
async def test_a_real_tester_step_cannot_reach_secrets_bus_or_network_and_leaves_nothing(
        user: str, mode: str, settings: MeshSettings, bus: Bus, place: Path) -> None:
    if reason := _mode_skip(mode):
        pytest.skip(reason)
    token = uuid.uuid4().hex
    fast = settings.model_copy(update={"sim_latency_scale": 0.0, "drain_seconds": 5.0})
    async with SimServer(SimWorld(seed=1, latency_scale=0)) as sim:
        nats_port = int((settings.nats_url or "").rsplit(":", 1)[1])
        ports = [nats_port, sim.port]
        start = place / "start"
        start.mkdir()
        (start / "test_attack.py").write_text(
            f"PLANTED = {PLANTED!r}\nTOKEN = {token!r}\nPORTS = {ports!r}\n" + textwrap.dedent(ATTACK))
        data = place / "data"
        data.mkdir()
        give(place, user)
        env = node_env(fast, MESH_SANDBOX=mode, MESH_DATA_DIR=str(data), HOME=str(place), OPENAI_API_KEY=PLANTED,
                       ANTHROPIC_API_KEY=PLANTED)
        with (place / "tester.log").open("ab") as log:
            tester = await asyncio.create_subprocess_exec(
                *as_user(user, [sys.executable, "-m", "mesh", "node", "tester"]), env=env, stdout=log,
                stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL)
        try:
            others = {role: 1 for role in role_specs() if role != "tester"}
            client = MeshClient(bus)
            goal = Goal(brief="Build me a login system")
            async with in_process_mesh(fast, replicas=others):
                await client.submit(goal, workspace=start)
                events = [event async for _, event in client.watch(goal.goal_id, until_final=True)]
            results = await client.results(goal.goal_id)
        finally:
            tester.kill()
            await tester.wait()
    log_text = (place / "tester.log").read_text(errors="replace")
    assert isinstance(events[-1], GoalCompleted), (events[-1], log_text[-3000:])
    runs = [e for e in events if isinstance(e, ToolCall) and e.tool == "shell.run"]
    assert runs and {e.sandbox for e in runs} == {mode}
    found = json.loads(results.workspace["attack-results.json"])
    assert found["token"] == token
    assert found["environ"] == [], found  # nothing held the planted secret: not the node, not the run
    assert all(v.startswith("refused") for v in found["network"].values()) and len(found["network"]) == 2, found
    assert found["open_files"][0] < 512 and found["open_files"][1] == 24, found  # EMFILE
    assert running_with(token) == []  # the daemon did not outlive the step
    assert PLANTED not in json.dumps([e.model_dump(mode="json") for e in events])  # nor reached an event
