"""Attacks from inside a run, through `mesh tools run tester` (a real process, as a node runs commands),
against a node whose environment and credentials file hold a planted secret — in each sandbox mode,
with the node running as root (CI) and as an unprivileged user. What the fallback does not claim to
stop (files of the node's own uid) is skipped there, with the reason."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
import uuid
from contextlib import aclosing
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mesh.backends.sim import SimServer, SimWorld
from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.contracts import NodeUp
from mesh.embedded import EmbeddedNats
from mesh.embedded.natsserver import free_port
from mesh.tools import sandbox
from tests.meshkit import NodeProcess, node_env
from tests.sandboxkit import USERS, as_user, give

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
PLANTED = "planted-" + uuid.uuid4().hex
MODES = ("bwrap", "fallback")


def _mode_skip(mode: str) -> str | None:
    if mode == "bwrap" and sandbox.select("auto").mode != "bwrap":
        return f"bubblewrap cannot run here: {sandbox.select('auto').reason}"
    return None


@pytest.fixture(params=[(u, m) for m in MODES for u in USERS], ids=lambda p: f"{p[1]}-{p[0]}")
def node(request: pytest.FixtureRequest) -> tuple[str, str]:
    user, mode = request.param
    if reason := _mode_skip(mode):
        pytest.skip(reason)
    return user, mode


async def attack(node: tuple[str, str], place: Path, code: str, *args: str, timeout: int = 60) -> dict[str, Any]:
    """Run ``code`` (attack.py) as the tester's shell.run would, from a node holding the planted secret."""
    user, mode = node
    ws = place / "ws"
    ws.mkdir(exist_ok=True)
    (ws / "attack.py").write_text(textwrap.dedent(code))
    creds = place / "nats.creds"
    creds.write_text(f"-----BEGIN NATS USER JWT-----\n{PLANTED}\n")
    creds.chmod(0o600)
    give(place, user)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(ROOT),
           "HOME": str(place), "MESH_NODES_DIR": str(ROOT / "nodes"), "MESH_DATA_DIR": str(place / "data"),
           "MESH_SANDBOX": mode, "MESH_NATS_CREDS": str(creds), "MESH_NATS_PASSWORD": PLANTED,
           "OPENAI_API_KEY": PLANTED}
    argv = as_user(user, [sys.executable, "-m", "mesh", "tools", "run", "tester", "--workspace", str(ws),
                          "--timeout", str(timeout), "--json", "--", "python", "attack.py", *args])
    proc = await asyncio.create_subprocess_exec(*argv, env=env, cwd=place, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert out, f"mesh tools run printed nothing (exit {proc.returncode}): {err.decode()[-2000:]}"
    doc: dict[str, Any] = json.loads(out)
    assert doc["sandbox"]["mode"] == mode
    return doc


def running_with(token: str) -> list[str]:
    """Command lines of processes on the host that carry ``token``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            if token.encode() in cmdline:
                found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


async def test_the_node_environment_and_credentials_cannot_be_read(node: tuple[str, str], place: Path) -> None:
    doc = await attack(node, place, """
        import glob, os, sys
        paths = [f"/proc/{os.getppid()}/environ", "/proc/1/environ", *glob.glob("/proc/*/environ"),
                 *glob.glob("/proc/*/task/*/environ"), sys.argv[1]]
        for path in paths:
            try:
                print(path, open(path, "rb").read())
            except OSError as exc:
                print(path, "refused:", exc)
        print("os.environ", dict(os.environ))
        print("checked", len(paths))
        """, str(place / "nats.creds"))
    result = doc["result"]
    assert result["exit_code"] == 0 and "checked" in result["stdout"], result
    user, mode = node
    if mode == "fallback" and user == "unprivileged":  # same uid as the node: its files are the run's
        lines = [line for line in result["stdout"].splitlines() if PLANTED in line]
        assert all(line.startswith(str(place / "nats.creds")) for line in lines), lines
        pytest.skip("fallback with one uid for node and run: the node's files (the credentials file) stay "
                    "readable, as docs/TOOLS.md says; its environment was not")
    assert PLANTED not in result["stdout"], [line for line in result["stdout"].splitlines() if PLANTED in line]


async def test_the_bus_and_loopback_services_cannot_be_reached(node: tuple[str, str], place: Path) -> None:
    async with EmbeddedNats(place / "nats") as nats, SimServer(SimWorld(seed=1, latency_scale=0)) as sim:
        ports = [str(nats.port), str(sim.port)]
        for port in ports:  # reachable from here: the refusal below is the sandbox's
            _, writer = await asyncio.open_connection("127.0.0.1", int(port))
            writer.close()
        doc = await attack(node, place, """
            import socket, sys
            for port in sys.argv[1:]:
                try:
                    socket.create_connection(("127.0.0.1", int(port)), timeout=3)
                    print(port, "connected")
                except OSError as exc:
                    print(port, "refused:", exc)
            """, *ports)
    out = doc["result"]["stdout"]
    assert all(f"{port} refused" in out for port in ports) and "connected" not in out, out


async def test_a_setsid_daemon_does_not_outlive_the_step(node: tuple[str, str], place: Path) -> None:
    token = uuid.uuid4().hex
    doc = await attack(node, place, """
        import os, sys, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:  # double fork: re-parented away from the command
                time.sleep(60)
            os._exit(0)
        time.sleep(0.5)
        print("daemon started")
        """, token)
    assert doc["result"]["exit_code"] == 0 and doc["result"]["stdout"] == "daemon started\n"
    assert doc["result"]["killed"] >= 1
    assert running_with(token) == []


async def test_a_fork_bomb_is_bounded_and_fails_the_run(node: tuple[str, str], place: Path) -> None:
    token = uuid.uuid4().hex
    doc = await attack(node, place, """
        import os
        while True:
            try:
                os.fork()
            except OSError:  # at the process limit: keep every process alive and trying
                pass
        """, token, timeout=5)
    assert not doc["ok"] and doc["result"]["error"] == "ToolTimeout", doc  # the node answered: it is fine
    assert "did not finish within 5s and was killed" in doc["result"]["message"]
    assert running_with(token) == []


async def test_open_files_are_bounded(node: tuple[str, str], place: Path) -> None:
    doc = await attack(node, place, """
        files = []
        try:
            for _ in range(10_000):
                files.append(open("attack.py"))
        except OSError as exc:
            print(len(files), exc.errno)
        """)
    count, errno = doc["result"]["stdout"].split()
    assert int(count) < 512 and errno == "24", doc["result"]  # EMFILE


async def test_a_symlink_planted_in_a_cache_folder_is_refused(node: tuple[str, str], place: Path) -> None:
    (place / "outside").mkdir()
    doc = await attack(node, place, """
        import os, sys
        os.makedirs("src/__pycache__")
        os.symlink(sys.argv[1], "src/__pycache__/escape")
        """, str(place / "outside"))
    assert not doc["ok"] and doc["result"]["error"] == "PathRefused", doc
    assert "'src/__pycache__/escape' escapes the workspace" in doc["result"]["message"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_tester_node_reports_its_sandbox_and_warns_of_the_fallback(
        mode: str, settings: MeshSettings, bus: Bus, tmp_path: Path) -> None:
    if reason := _mode_skip(mode):
        pytest.skip(reason)
    port = free_port()
    node = NodeProcess("tester", node_env(settings, MESH_HEALTH_PORT=str(port), MESH_SANDBOX=mode), tmp_path).start()
    try:
        async with aclosing(bus.watch_events("_system")) as events:
            async for event in events:
                if isinstance(event, NodeUp) and event.role == "tester":
                    break
        async with aiohttp.ClientSession() as http:
            for _ in range(100):  # readiness follows node.up by one provisioning round trip
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    doc = await resp.json()
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.05)
        assert doc["ready"] and doc["sandbox"]["mode"] == mode
        if mode == "fallback":
            assert "fallback sandbox" in doc["sandbox"]["warning"]
            assert "shell.run runs in the fallback sandbox (MESH_SANDBOX=fallback)" in node.log()
        else:
            assert "warning" not in doc["sandbox"] and "fallback" not in node.log()
    finally:
        node.stop()


async def test_mesh_tools_run_prints_the_result_and_refuses_what_the_role_may_not(place: Path) -> None:
    ws = place / "ws"
    ws.mkdir()
    (ws / "hello.py").write_text("print('hello')\nopen('out.txt', 'w').write('x')\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), "HOME": str(place),
           "MESH_NODES_DIR": str(ROOT / "nodes")}

    async def mesh(*argv: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "mesh", *argv, env=env, cwd=place,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    code, out = await mesh("tools", "run", "tester", "--workspace", str(ws), "--", "python", "hello.py")
    assert code == 0, out
    assert out.startswith(f"sandbox: {sandbox.select('auto').mode}\n")
    assert "exit code: 0" in out and '"out.txt": "added"' in out and "hello" in out
    assert not (ws / "out.txt").exists()  # the folder is copied in, never changed
    code, out = await mesh("tools", "run", "tester", "--workspace", str(ws), "--", "bash", "-c", "id")
    assert code == 1 and "ToolRefused: command 'bash' is not on this role's allowlist" in out
    code, out = await mesh("tools", "run", "coder", "--workspace", str(ws), "--", "python", "hello.py")
    assert code == 1 and "role 'coder' may not call shell.run" in out
    code, out = await mesh("tools", "run", "tester", "--workspace", str(ws))
    assert code == 1 and "give the command after --" in out
