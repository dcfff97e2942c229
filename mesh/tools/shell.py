"""``shell.run``: start one allowlisted program in a workspace folder, sandboxed and bounded.

* the command is an argv list, never a shell string; ``argv[0]`` must be a bare name on the role's
  ``shell_allow`` list and is resolved on a fixed ``PATH`` (the node's interpreter folder first);
* it runs in the process's sandbox (``sandbox.py``: bubblewrap namespaces where the host allows,
  else the weaker fallback), with no network unless the role's spec allows it;
* the environment is built from nothing: no ``MESH_*``, API keys or other secrets of the node
  leak in — only ``PATH``, ``HOME``/``TMPDIR`` (outside the workspace), locale and a few Python
  switches that keep runs quiet and reproducible;
* limits: wall-clock timeout, CPU seconds, address space, largest file written, processes and open
  files (``setrlimit``, set by the ``_limited.py`` shim), captured output (head and tail kept, the
  middle dropped);
* nothing it started outlives it: the sandbox's pid namespace ends with it, and the shim — the
  run's subreaper — kills every descendant, ``setsid`` daemons included.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.errors import ToolError, ToolRefused, ToolTimeout
from mesh.tools import sandbox as sandboxes
from mesh.tools.sandbox import RunDirs, Sandbox, SandboxMode

SAFE_PATH = os.pathsep.join(dict.fromkeys([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]))
MAX_ARGS = 256
MAX_ARG_CHARS = 8192
STOP_GRACE_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class ShellLimits:
    timeout_seconds: float = 120.0
    cpu_seconds: int = 120
    memory_bytes: int = 1024 * 1024 * 1024
    file_bytes: int = 64 * 1024 * 1024  # the largest file a command may write
    output_bytes: int = 64 * 1024  # kept per stream (stdout, stderr)
    processes: int = 128  # processes (threads) the run may have at once
    open_files: int = 512  # per process


@dataclass(frozen=True, slots=True)
class ShellPolicy:
    """Which programs a role may start (``shell_allow`` of its spec), and within which limits."""

    allow: frozenset[str] = frozenset()
    limits: ShellLimits = field(default_factory=ShellLimits)
    network: bool = False  # the role's spec allows commands the network (bwrap mode; the fallback cannot deny it)
    sandbox: Sandbox | None = None  # None: this process's default (probed on first use)

    def box(self) -> Sandbox:
        return self.sandbox or sandboxes.select()

    def resolve(self, argv: Sequence[str]) -> str:
        """The absolute path of ``argv[0]``; ``ToolRefused`` unless it is an allowed bare name."""
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ToolError("argv must be a non-empty list of strings")
        if len(argv) > MAX_ARGS or any(len(a) > MAX_ARG_CHARS or "\x00" in a for a in argv):
            raise ToolError(f"argv is limited to {MAX_ARGS} arguments of {MAX_ARG_CHARS} characters, no NUL bytes")
        name = argv[0]
        if "/" in name or name not in self.allow:
            allowed = ", ".join(sorted(self.allow)) or "none"
            raise ToolRefused(f"command {name!r} is not on this role's allowlist (allowed: {allowed}); "
                              "argv[0] must be one of those bare names")
        found = shutil.which(name, path=SAFE_PATH)
        if found is None:
            raise ToolError(f"command {name!r} is allowed but not installed on this node")
        return found


@dataclass(slots=True)
class ShellResult:
    exit_code: int
    stdout: str
    stderr: str
    duration_ms: float
    sandbox: SandboxMode
    signal: str | None = None  # the signal that ended it (e.g. SIGXCPU past the CPU limit)
    truncated: bool = False
    killed: int = 0  # processes it left running, killed when it ended

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"exit_code": self.exit_code, "stdout": self.stdout, "stderr": self.stderr,
                               "duration_ms": round(self.duration_ms, 1), "sandbox": self.sandbox}
        if self.signal:
            doc["signal"] = self.signal
        if self.truncated:
            doc["truncated"] = True
        if self.killed:
            doc["killed"] = self.killed
        return doc


def sandbox_env(home: Path, tmp: Path) -> dict[str, str]:
    """The whole environment of a command: built from nothing, so no secret of the node leaks."""
    return {
        "PATH": SAFE_PATH, "HOME": str(home), "TMPDIR": str(tmp), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "NO_COLOR": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "PYTHONHASHSEED": "0",
        "PYTHONNOUSERSITE": "1",
        # pytest plugins installed beside the node are not the workspace's; a project that needs one
        # names it (-p NAME). Loading them all would change test behaviour and cost seconds a run.
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }


class _Capture:
    """Keeps the head and the tail of a stream within ``limit`` bytes; counts what was dropped."""

    def __init__(self, limit: int) -> None:
        self.half = max(limit // 2, 1)
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            room = self.half - len(self.head)
            self.head += chunk[:room]
            self.tail += chunk[room:] if room > 0 else chunk
            if len(self.tail) > self.half:
                self.dropped += len(self.tail) - self.half
                del self.tail[: len(self.tail) - self.half]

    def text(self) -> str:
        gap = f"\n[… {self.dropped} bytes of output dropped …]\n" if self.dropped else ""
        return (bytes(self.head).decode(errors="replace") + gap + bytes(self.tail).decode(errors="replace"))


async def run_command(program: str, argv: Sequence[str], *, dirs: RunDirs, sandbox: Sandbox,
                      limits: ShellLimits, network: bool = False, timeout: float | None = None) -> ShellResult:
    """Run ``program`` (resolved ``argv[0]``) with ``argv[1:]`` in ``sandbox``; ``ToolTimeout`` past the timeout."""
    timeout = min(timeout or limits.timeout_seconds, limits.timeout_seconds)
    started = time.perf_counter()
    status_r, status_w = os.pipe()
    # Sharing the node's uid (fallback), the process limit counts the node's own threads too: on top of them.
    nproc = str(limits.processes) if sandbox.mode == "bwrap" or sandbox.run_uid >= 0 else f"+{limits.processes}"
    # Network off: bwrap gives the run an empty network namespace; the fallback has none, a seccomp filter
    # refuses new sockets instead.
    nosock = "1" if sandbox.mode == "fallback" and not network else "0"
    shim_args = [str(limits.cpu_seconds), str(limits.memory_bytes), str(limits.file_bytes), nproc,
                 str(limits.open_files), str(sandbox.run_uid), nosock, str(status_w), program, *argv[1:]]
    launch = sandbox.launch(shim_args, dirs, network=network)
    try:
        async with sandboxes.gate():
            proc = await asyncio.create_subprocess_exec(
                *launch.argv, cwd=dirs.files, env=sandbox_env(launch.home, launch.tmp), pass_fds=(status_w,),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
            sandboxes.track(proc.pid)
    finally:
        os.close(status_w)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Capture(limits.output_bytes), _Capture(limits.output_bytes)
    timed_out = False
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(out.drain(proc.stdout))
            tg.create_task(err.drain(proc.stderr))
            try:
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except TimeoutError:
                timed_out = True
            finally:  # on timeout or cancellation: the shim kills the command and sweeps, then it goes too
                await _stop(proc)
        status = _read_status(status_r)
    finally:
        os.close(status_r)
        orphans = await sandboxes.untrack(proc.pid)
    if timed_out:
        raise ToolTimeout(f"{argv[0]} did not finish within {timeout:g}s and was killed; "
                          f"output tail: {(out.text() + err.text())[-500:]!r}")
    code = proc.returncode
    assert code is not None
    if "exit" in status:
        code = status["exit"]
    elif "signal" in status:
        code = -status["signal"]
    # In bwrap the namespace's own processes pass through the node as zombies when it ends: not leftovers.
    killed = int(status.get("left", 0)) + (orphans if sandbox.mode == "fallback" else 0)
    stderr = err.text()
    if killed:
        stderr += (f"\n[shell.run: the command left {killed} process(es) running; they were killed "
                   f"(limit {limits.processes} processes)]\n")
    return ShellResult(exit_code=code, stdout=out.text(), stderr=stderr, sandbox=sandbox.mode,
                       duration_ms=(time.perf_counter() - started) * 1000, signal=_signal_name(code),
                       truncated=bool(out.dropped or err.dropped), killed=killed)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM lets the shim kill and sweep the command's processes (in bwrap: ends the namespace);
    SIGKILL for the whole group if that takes too long."""
    if proc.returncode is None:
        with suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with suppress(TimeoutError):
            async with asyncio.timeout(STOP_GRACE_SECONDS):
                await proc.wait()
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


def _read_status(fd: int) -> dict[str, int]:
    """The shim's report (empty if it was killed before it could write one)."""
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 4096)
    except BlockingIOError:
        return {}
    try:
        doc = json.loads(data)
    except ValueError:
        return {}
    return {k: int(v) for k, v in doc.items() if k in ("exit", "signal", "left")} if isinstance(doc, dict) else {}


def _signal_name(code: int) -> str | None:
    if code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"
