"""A server child process of the embedded mesh (nats-server, the edge model server): how it is started,
stopped and read, the same for each.

Its output goes to a log file (a file, not a pipe, so a chatty server never blocks on a full pipe),
headed by the command line. It runs in its own session, so a Ctrl-C aimed at ``mesh up`` reaches it
only through ``terminate()``, after the nodes have drained; on Linux it also gets
``PR_SET_PDEATHSIG=SIGTERM``, so a parent killed with -9 leaves no orphan holding a port.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mesh.errors import EmbeddedServerError

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec hook asking Linux to SIGTERM the child when the spawning thread dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None

    def hook() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return hook


def spawn_logged(cmd: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with its output appended to ``log_path`` (see the module docstring)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        logf.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
        logf.flush()
        try:
            return subprocess.Popen(
                list(cmd), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                start_new_session=True, preexec_fn=_die_with_parent(),  # noqa: PLW1509 (tiny, async-signal-safe)
            )
        except OSError as exc:
            raise EmbeddedServerError(f"cannot run {cmd[0]}: {exc}") from exc


async def terminate(proc: subprocess.Popen[bytes] | None, timeout: float, what: str) -> None:
    """SIGTERM (the server finishes and exits), SIGKILL if it is still alive after ``timeout``; reaped."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)  # a child's exit has no event to await here
    if proc.poll() is None:
        log.warning("%s pid %s ignored SIGTERM for %.0fs; killing it", what, proc.pid, timeout)
        kill_now(proc)


def kill_now(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL now and reap it (the crash of the fault tests)."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def log_tail(log_path: Path, lines: int = 8) -> str:
    """The last ``lines`` of a server log, indented for an error message."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])
