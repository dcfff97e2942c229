"""``shell.run``: start one allowlisted program in a workspace folder, bounded.

* the command is an argv list, never a shell string; ``argv[0]`` must be a bare name on the role's
  ``shell_allow`` list and is resolved on a fixed ``PATH`` (the node's interpreter folder first);
* the environment is built from nothing: no ``MESH_*``, API keys or other secrets of the node
  leak in — only ``PATH``, ``HOME``/``TMPDIR`` (outside the workspace), locale and a few Python
  switches that keep runs quiet and reproducible;
* limits: wall-clock timeout (the whole process group is killed), CPU seconds, address space and
  largest file written (``setrlimit``, set by the ``_limited.py`` exec shim), captured output
  (head and tail kept, the middle dropped);
* processes the command leaves behind are killed when it exits.

The allowlist is least privilege, not a jail: an allowed interpreter can run any code the
workspace holds. The process limits bound what a run can cost; isolation from the host is the
container's job (non-root, read-only root filesystem, NetworkPolicy) in a deployment.
"""

from __future__ import annotations

import asyncio
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

SHIM = Path(__file__).with_name("_limited.py")
SAFE_PATH = os.pathsep.join(dict.fromkeys([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]))
MAX_ARGS = 256
MAX_ARG_CHARS = 8192


@dataclass(frozen=True, slots=True)
class ShellLimits:
    timeout_seconds: float = 120.0
    cpu_seconds: int = 120
    memory_bytes: int = 1024 * 1024 * 1024
    file_bytes: int = 64 * 1024 * 1024  # the largest file a command may write
    output_bytes: int = 64 * 1024  # kept per stream (stdout, stderr)


@dataclass(frozen=True, slots=True)
class ShellPolicy:
    """Which programs a role may start (``shell_allow`` of its spec), and within which limits."""

    allow: frozenset[str] = frozenset()
    limits: ShellLimits = field(default_factory=ShellLimits)

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
    signal: str | None = None  # the signal that ended it (e.g. SIGXCPU past the CPU limit)
    truncated: bool = False

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"exit_code": self.exit_code, "stdout": self.stdout, "stderr": self.stderr,
                               "duration_ms": round(self.duration_ms, 1)}
        if self.signal:
            doc["signal"] = self.signal
        if self.truncated:
            doc["truncated"] = True
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


async def run_command(program: str, argv: Sequence[str], *, cwd: Path, env: dict[str, str],
                      limits: ShellLimits, timeout: float | None = None) -> ShellResult:
    """Run ``program`` (resolved ``argv[0]``) with ``argv[1:]``; ``ToolTimeout`` past the timeout."""
    timeout = min(timeout or limits.timeout_seconds, limits.timeout_seconds)
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", str(SHIM), str(limits.cpu_seconds), str(limits.memory_bytes),
        str(limits.file_bytes), program, *argv[1:],
        cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,  # its own process group, killed as one
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Capture(limits.output_bytes), _Capture(limits.output_bytes)
    timed_out = False
    async with asyncio.TaskGroup() as tg:
        tg.create_task(out.drain(proc.stdout))
        tg.create_task(err.drain(proc.stderr))
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except TimeoutError:
            timed_out = True
        finally:  # on exit, timeout or cancellation: nothing it started may outlive it
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    if timed_out:
        raise ToolTimeout(f"{argv[0]} did not finish within {timeout:g}s and was killed; "
                          f"output tail: {(out.text() + err.text())[-500:]!r}")
    code = proc.returncode
    assert code is not None
    return ShellResult(exit_code=code, stdout=out.text(), stderr=err.text(),
                       duration_ms=(time.perf_counter() - started) * 1000,
                       signal=_signal_name(code), truncated=bool(out.dropped or err.dropped))


def _signal_name(code: int) -> str | None:
    if code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"
