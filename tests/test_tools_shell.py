"""The toolbox's guards, one test each: a tool the role may not call, a command not on the
allowlist, traversal, symlink escape, special files, oversize, timeout — and the limits and
scrubbed environment of shell.run. Every refusal leaves the workspace as it was."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mesh.tools.shell import ShellLimits, ShellPolicy
from mesh.tools.toolbox import ToolBox, ToolResult
from mesh.tools.workspace import MAX_FILE_BYTES, Workspace
from tests.test_workspace import Blobs

pytestmark = pytest.mark.timeout(60)

ALL_FS = ["fs.read", "fs.write", "fs.list", "fs.search", "fs.patch"]
FAST = ShellLimits(timeout_seconds=20, cpu_seconds=20, memory_bytes=512 << 20, output_bytes=4096)


@pytest.fixture
async def ws() -> Workspace:
    ws = Workspace({}, Blobs().fetch)
    ws.write("src/app.py", b"def handle(v):\n    return v.strip()\n")
    ws.write("tests/test_app.py", b"from app import handle\n\n\ndef test_strip():\n    assert handle(' x ') == 'x'\n")
    return ws


@pytest.fixture
async def tools(ws: Workspace, tmp_path: Path) -> AsyncIterator[ToolBox]:
    async with ToolBox([*ALL_FS, "shell.run"], ws, shell=ShellPolicy(frozenset({"python"}), FAST),
                       work_dir=tmp_path / "work") as box:
        yield box


def error(result: ToolResult) -> dict[str, Any]:
    assert not result.ok, result.content
    doc = json.loads(result.content)
    assert doc["ok"] is False and doc["workspace_changed"] is False
    return doc


def output(result: ToolResult) -> dict[str, Any]:
    assert result.ok, result.content
    return json.loads(result.content)


async def run(tools: ToolBox, *code: str, **kw: Any) -> ToolResult:
    return await tools.call("shell.run", {"argv": ["python", "-c", "\n".join(code)], **kw})


# --- refusals -------------------------------------------------------------------------------------


async def test_a_tool_not_allowed_for_the_role_is_refused(ws: Workspace) -> None:
    before = ws.files
    async with ToolBox(["fs.read", "fs.list"], ws) as reviewer:
        assert [name for name, _, _ in reviewer.specs()] == ["fs.list", "fs.read"]
        for name, args in (("fs.write", {"path": "x.py", "content": "x"}), ("shell.run", {"argv": ["python"]}),
                           ("rm.everything", {})):
            result = await reviewer.call(name, args)
            assert result.refused and error(result)["error"] == "ToolRefused"
            assert result.arguments == args  # what the tool.call event records
    assert ws.files == before


@pytest.mark.parametrize("argv", [["bash", "-c", "ls"], ["/usr/bin/python3"], ["./python"], ["sh"]])
async def test_a_command_not_on_the_allowlist_is_refused(tools: ToolBox, ws: Workspace, argv: list[str]) -> None:
    before = ws.files
    result = await tools.call("shell.run", {"argv": argv})
    assert result.refused and error(result)["error"] == "ToolRefused"
    assert ws.files == before


@pytest.mark.parametrize("path", ["../outside.py", "/etc/passwd", "src/../../x", "a\\..\\b"])
async def test_traversal_is_refused_for_every_fs_tool(tools: ToolBox, ws: Workspace, path: str) -> None:
    before = ws.files
    for name, args in (("fs.read", {"path": path}), ("fs.write", {"path": path, "content": "x"}),
                       ("fs.list", {"prefix": path})):
        assert error(await tools.call(name, args))["error"] == "PathRefused"
    assert ws.files == before


async def test_invalid_arguments_are_a_structured_error(tools: ToolBox) -> None:
    doc = error(await tools.call("fs.write", {"path": "a.py"}))
    assert doc["error"] == "ToolError" and "content: Field required" in doc["message"]
    assert "extra" in error(await tools.call("fs.read", {"path": "a.py", "mode": "rb"}))["message"].lower()


async def test_oversize_is_refused_from_a_write_and_from_a_command(tools: ToolBox, ws: Workspace) -> None:
    before = ws.files
    big = "x" * (MAX_FILE_BYTES + 1)
    assert "file size limit" in error(await tools.call("fs.write", {"path": "big.txt", "content": big}))["message"]
    doc = error(await run(tools, f"open('big.txt', 'wb').write(b'x' * {MAX_FILE_BYTES + 1})",
                          "open('small.txt', 'w').write('ok')"))
    assert doc["error"] == "PathRefused" and "big.txt" in doc["message"] and "file size limit" in doc["message"]
    assert ws.files == before  # not even small.txt: a refused command keeps none of its changes


async def test_a_symlink_pointing_out_of_the_workspace_is_refused(tools: ToolBox, ws: Workspace) -> None:
    before = ws.files
    doc = error(await run(tools, "import os", "os.symlink('/etc/passwd', 'leak')", "os.symlink('/etc', 'src/etc')"))
    assert doc["error"] == "PathRefused" and "'leak' escapes the workspace" in doc["message"]
    assert "'src/etc' escapes the workspace" in doc["message"]
    assert ws.files == before
    assert "no such file" in error(await tools.call("fs.read", {"path": "leak"}))["message"]
    # the folder is rebuilt from the workspace: the next command does not see the link
    assert output(await run(tools, "import os", "print(os.path.lexists('leak'))"))["stdout"] == "False\n"


async def test_special_files_are_refused(tools: ToolBox, ws: Workspace) -> None:
    before = ws.files
    doc = error(await run(tools, "import os", "os.mkfifo('pipe')"))
    assert "'pipe' is a device file, FIFO or socket" in doc["message"]
    assert ws.files == before


async def test_a_folder_the_command_made_unreadable_is_refused_not_taken_as_deleted(
        tools: ToolBox, ws: Workspace) -> None:
    before = ws.files
    result = await run(tools, "import os", "os.chmod('src', 0)")
    if os.geteuid() == 0:  # a root node reads any folder (its commands run as uid 65534): nothing is lost
        assert output(result)["changed"] == {}
    else:
        assert "folder 'src' cannot be read" in error(result)["message"]
    assert ws.files == before


async def test_a_command_past_its_timeout_is_killed_and_changes_nothing(tools: ToolBox, ws: Workspace) -> None:
    before = ws.files
    result = await run(tools, "open('half.txt', 'w').write('x')", "print('working', flush=True)",
                       "import time", "time.sleep(60)", timeout_seconds=3)
    doc = error(result)
    assert doc["error"] == "ToolTimeout" and "within 3s" in doc["message"] and "working" in doc["message"]
    assert result.duration_ms < 15_000
    assert ws.files == before


# --- what a command sees and leaves ----------------------------------------------------------------


async def test_the_workspace_tests_run_in_the_workspace_and_written_files_come_back(
        tools: ToolBox, ws: Workspace) -> None:
    out = output(await tools.call("shell.run", {"argv": ["python", "-m", "pytest", "-q", "-o", "pythonpath=src"]}))
    assert out["exit_code"] == 0 and "1 passed" in out["stdout"]
    assert out["changed"] == {}  # pytest's caches are not part of the work
    out = output(await run(tools, "import os, pathlib", "pathlib.Path('build').mkdir()",
                           "pathlib.Path('build/report.txt').write_text('ok')", "os.remove('src/app.py')",
                           "open('data.bin', 'wb').write(bytes(range(256)))"))
    assert out["changed"] == {"build/report.txt": "added", "data.bin": "added", "src/app.py": "deleted"}
    assert await ws.read("build/report.txt") == b"ok"
    assert "src/app.py" not in ws.paths
    note = (await tools.call("fs.read", {"path": "data.bin"})).content
    assert note.startswith("(binary file data.bin: 256 bytes") and "\x00" not in note
    # fs changes after a command reach the next command
    assert (await tools.call("fs.write", {"path": "later.txt", "content": "v2"})).ok
    assert output(await run(tools, "print(open('later.txt').read())"))["stdout"] == "v2\n"


async def test_the_environment_is_scrubbed(tools: ToolBox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_NATS_CREDS_SECRET", "s3cret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws")
    out = output(await run(tools, "import json, os", "print(json.dumps([os.getcwd(), dict(os.environ)]))"))
    cwd, env = json.loads(out["stdout"])
    assert not {k for k in env if k.startswith("MESH_") or "KEY" in k or "SECRET" in k}
    assert "s3cret" not in out["stdout"] and "sk-live" not in out["stdout"]
    assert not env["HOME"].startswith(cwd) and not env["TMPDIR"].startswith(cwd)  # their files do not come back


async def test_output_and_memory_are_limited(ws: Workspace, tmp_path: Path) -> None:
    limits = ShellLimits(timeout_seconds=20, cpu_seconds=1, memory_bytes=256 << 20, output_bytes=1000)
    async with ToolBox(["shell.run"], ws, shell=ShellPolicy(frozenset({"python"}), limits),
                       work_dir=tmp_path) as tools:
        out = output(await run(tools, "print('A' * 100 + 'B' * 100_000 + 'Z' * 100)"))
        assert out["truncated"] and len(out["stdout"]) < 1100
        assert out["stdout"].startswith("A" * 100) and out["stdout"].rstrip().endswith("Z" * 100)
        assert "bytes of output dropped" in out["stdout"]
        out = output(await run(tools, "x = bytearray(512 * 1024 * 1024)"))
        assert out["exit_code"] != 0 and "MemoryError" in out["stderr"]
        out = output(await run(tools, "while True: pass"))  # one CPU second, then SIGXCPU
        assert out["signal"] in ("SIGXCPU", "SIGKILL")


async def test_the_per_task_folder_is_removed_when_the_toolbox_closes(ws: Workspace, tmp_path: Path) -> None:
    async with ToolBox(["shell.run"], ws, shell=ShellPolicy(frozenset({"python"}), FAST), work_dir=tmp_path) as tools:
        assert output(await run(tools, "print('hi')"))["stdout"] == "hi\n"
        assert tools._tree is not None
        root = tools._tree.root
        os.chmod(root / "ws" / "src", 0o500)  # a command may take away permissions; cleanup still works
        assert root.is_dir()
    assert not root.exists()


# --- the sandbox ------------------------------------------------------------------------------------


async def test_a_link_planted_in_a_cache_folder_is_refused_and_never_written_through(
        tools: ToolBox, ws: Workspace, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    before = ws.files
    doc = error(await run(tools, "import os", "os.makedirs('src/__pycache__')",
                          f"os.symlink({str(outside)!r}, 'src/__pycache__/escape')"))
    assert doc["error"] == "PathRefused" and "'src/__pycache__/escape' escapes the workspace" in doc["message"]
    assert ws.files == before
    # a later sync of a file under that path goes into the rebuilt folder, never through the link
    assert (await tools.call("fs.write", {"path": "src/__pycache__/escape/pwned.txt", "content": "x"})).ok
    assert output(await run(tools, "print(open('src/__pycache__/escape/pwned.txt').read())"))["stdout"] == "x\n"
    assert list(outside.iterdir()) == []


async def test_a_link_left_in_the_folder_is_not_written_through(ws: Workspace, tmp_path: Path) -> None:
    """Defence in depth: even a link the scan never saw stops a sync rather than being followed."""
    from mesh.errors import PathRefused
    from mesh.tools.worktree import WorkTree

    outside = tmp_path / "outside"
    outside.mkdir()
    tree = WorkTree(tmp_path / "work")
    try:
        await tree.sync(ws)
        os.symlink(outside, tree.files / "cache")
        ws.write("cache/pwned.txt", b"x")
        with pytest.raises(PathRefused, match="link out of the workspace"):
            await tree.sync(ws)
        assert list(outside.iterdir()) == []
    finally:
        await tree.close()


async def test_every_run_reports_its_sandbox_and_leaves_nothing_running(tools: ToolBox) -> None:
    result = await run(tools, "import os, time", "if os.fork() == 0:", "    os.setsid(); time.sleep(60)",
                       "print(os.getpid())")
    out = output(result)
    assert result.sandbox == out["sandbox"] == tools.shell.box().mode
    assert out["killed"] == 1 and "were killed" in out["stderr"]


@pytest.mark.parametrize("network", [False, True], ids=["network-off", "spec-allows-network"])
async def test_the_network_is_there_only_when_the_role_spec_allows_it(
        ws: Workspace, tmp_path: Path, network: bool) -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, ToolBox(["shell.run"], ws, shell=ShellPolicy(frozenset({"python"}), FAST, network=network),
                               work_dir=tmp_path) as tools:
        out = output(await run(tools, "import socket", "try:",
                               f"    socket.create_connection(('127.0.0.1', {port}), timeout=5); print('connected')",
                               "except OSError as exc:", "    print('refused', exc)"))
    assert out["stdout"].startswith("connected" if network else "refused"), out


def test_an_interpreter_under_tmp_is_not_hidden_by_the_private_tmp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A clone (and its .venv) under /tmp: the run's private /tmp is mounted first, the interpreter on top
    of it — found when CI's clone in /tmp failed every tester run with `execvp …/.venv/bin/python`."""
    import subprocess
    import sys

    from mesh.tools import sandbox

    box = sandbox.select("auto")
    if box.bwrap is None:
        pytest.skip(f"bubblewrap unavailable here: {box.reason}")
    venv = Path("/tmp") / f"mesh-venv-{os.getpid()}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    try:
        monkeypatch.setattr(sys, "prefix", str(venv))
        private = tmp_path / "private-tmp"
        private.mkdir()
        argv = sandbox.bwrap_argv(box.bwrap, network=False, binds=["--bind", str(private), "/tmp"])
        out = subprocess.run([*argv, "--", str(venv / "bin" / "python"), "-I", "-S", "-c", "print('ok')"],
                             env={}, capture_output=True, text=True, timeout=30, check=False)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    finally:
        subprocess.run(["rm", "-rf", str(venv)], check=True)
