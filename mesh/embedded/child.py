"""Every child process of the embedded mesh (nats-server, the edge model server, the sim-server, one
``mesh node <role>`` per role) is a ``ChildProcess``: started, awaited and stopped the same way.

Its output goes to a log file (a file, not a pipe, so a chatty child never blocks on a full pipe),
headed by the command line. It runs in its own session, so a Ctrl-C aimed at ``mesh up`` reaches it
only through ``stop()``, in order (nodes drain first, then the servers go); on Linux it also gets
``PR_SET_PDEATHSIG=SIGTERM``, so a parent killed with -9 leaves no orphan holding a port or
reconnecting forever. Its exit is awaited through a pidfd where the kernel has them (no thread, no
polling), so stopping never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from mesh.errors import EmbeddedServerError

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
_POLL = 0.02  # only where there is no pidfd to wait on


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


class ChildProcess:
    """One child process; ``what`` names it in logs and errors."""

    def __init__(self, cmd: Sequence[str], log_path: Path, *, what: str, env: Mapping[str, str] | None = None) -> None:
        self.cmd = list(cmd)
        self.log_path = log_path
        self.what = what
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def start(self) -> None:
        """Spawn it (again, after it exited), output appended to the log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(self.cmd)}\n".encode())
            logf.flush()
            try:
                self.proc = subprocess.Popen(
                    self.cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=self.env,
                    start_new_session=True, preexec_fn=_die_with_parent(),  # noqa: PLW1509 (tiny, async-signal-safe)
                )
            except OSError as exc:
                raise EmbeddedServerError(f"cannot run {self.cmd[0]} ({self.what}): {exc}") from exc

    async def wait(self) -> int:
        """Its exit code, once it has exited (reaped)."""
        proc = self.proc
        assert proc is not None, "start() first"
        if proc.poll() is None:
            await _exited(proc)
        return proc.wait()

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)

    async def stop(self, timeout: float) -> None:
        """SIGTERM (it finishes and exits), SIGKILL if it is still alive after ``timeout``; reaped."""
        if not self.running:
            return
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.wait(), timeout)
        except TimeoutError:
            log.warning("%s pid %s ignored SIGTERM for %.0fs; killing it", self.what, self.pid, timeout)
            self.kill()

    def kill(self) -> None:
        """SIGKILL now and reap it (the crash of the fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 8) -> str:
        return log_tail(self.log_path, lines)


async def _exited(proc: subprocess.Popen[bytes]) -> None:
    """Return once ``proc`` has exited (not reaped): woken by its pidfd, else by polling."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux ≥ 5.3
        while proc.poll() is None:
            await asyncio.sleep(_POLL)
        return
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    try:
        await readable.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def log_tail(log_path: Path, lines: int = 8) -> str:
    """The last ``lines`` of a child's log, indented for an error message."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])
