"""Where a ``shell.run`` command runs: a bubblewrap sandbox where the host allows one, else the
weaker fallback — chosen once per process and reported with every run (docs/TOOLS.md, threat model).

* **bwrap**: own pid, ipc, uts, mount (and, unprivileged, user) namespaces, and a network namespace
  with nothing in it unless the role's spec allows the network; a root of its own holding only the
  system folders and the interpreter and virtual environment read-only, the workspace read-write at
  ``/workspace``, a private ``/tmp`` and ``HOME``; a ``/proc`` of its own pid namespace (no host
  process is visible); ``--die-with-parent``. When the run's first process ends, the namespace's
  init ends and the kernel kills everything left in it.
* **fallback** (no user namespaces, e.g. most Kubernetes pods under the RuntimeDefault seccomp
  profile): the run shares the node's uid and view of the host; the node makes itself non-dumpable
  (same-uid processes cannot read its ``/proc`` files) and the subreaper of whatever a run leaves
  behind; the shim kills every descendant when the command ends; with the network off a seccomp
  filter refuses new sockets. Files the node can read stay readable to the run — the warning says so.

A root node never runs commands as root: they drop to ``SANDBOX_UID`` (``RLIMIT_NPROC`` does not bind
root), and the per-task folder is handed to that uid.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mesh.errors import ConfigError

log = logging.getLogger(__name__)

SandboxMode = Literal["bwrap", "fallback"]
SandboxRequest = Literal["auto", "bwrap", "fallback"]
SANDBOX_UID = 65534  # nobody: what a root node's commands run as
SHIM_SOURCE = Path(__file__).with_name("_limited.py").read_text()
# Inside a bwrap sandbox: where the workspace, HOME and TMPDIR are.
WORKSPACE, HOME, TMP = Path("/workspace"), Path("/home/sandbox"), Path("/tmp")
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What programs need of /etc (loader cache, users, locale, certificates) — not the whole folder.
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/localtime",
             "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/hosts", "/etc/resolv.conf", "/etc/ssl",
             "/etc/ca-certificates", "/etc/mime.types")
PROBE_SECONDS = 20.0

PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36

_hardened = False
_running: set[int] = set()  # pids of the shims/sandboxes this process runs now
# In a hardened process: held while a run is spawned and tracked, and while orphans are swept, so a sweep
# never takes a run that is started but not yet tracked for an orphan. One event loop for the process's
# life (a node, `mesh tools run`), so one lock.
_gate: asyncio.Lock | None = None


@dataclass(frozen=True, slots=True)
class RunDirs:
    """The per-task folder's parts as the node sees them."""

    files: Path
    home: Path
    tmp: Path


@dataclass(frozen=True, slots=True)
class Launch:
    """One command, ready for ``create_subprocess_exec``: argv, working folder and the paths the run sees."""

    argv: list[str]
    cwd: Path
    home: Path
    tmp: Path


@dataclass(frozen=True, slots=True)
class Sandbox:
    mode: SandboxMode
    reason: str = ""  # why the fallback is in use
    bwrap: str | None = None

    @property
    def run_uid(self) -> int:
        """The uid commands drop to (a root node), else -1: the node's own."""
        return SANDBOX_UID if os.geteuid() == 0 else -1

    @property
    def warning(self) -> str | None:
        if self.mode == "bwrap":
            return None
        return (f"shell.run runs in the fallback sandbox ({self.reason}): commands share the node's uid and view "
                "of the host, so they can read every file the node can; bubblewrap with user namespaces gives "
                "them none of that (docs/TOOLS.md)")

    def describe(self) -> dict[str, str]:
        """For /readyz and `mesh tools run`."""
        return {"mode": self.mode, **({"warning": w} if (w := self.warning) else {})}

    def launch(self, shim_args: list[str], dirs: RunDirs, *, network: bool) -> Launch:
        shim = [sys.executable, "-I", "-S", "-c", SHIM_SOURCE, *shim_args]
        if self.mode == "fallback":
            return Launch(shim, dirs.files, dirs.home, dirs.tmp)
        assert self.bwrap is not None
        binds = ["--bind", str(dirs.files), str(WORKSPACE), "--bind", str(dirs.home), str(HOME),
                 "--bind", str(dirs.tmp), str(TMP)]
        argv = bwrap_argv(self.bwrap, network=network, binds=binds)
        return Launch([*argv, "--chdir", str(WORKSPACE), "--", *shim], WORKSPACE, HOME, TMP)

    def hand_over(self, dirs: RunDirs, root: Path) -> None:
        """A root node's runs are another uid: give them the folder (links are changed, never followed)."""
        uid = self.run_uid
        if uid < 0:
            return
        os.chmod(root, 0o711)  # traversable, not theirs: the run cannot swap ws/ for a link
        for top in (dirs.files, dirs.home, dirs.tmp):
            os.lchown(top, uid, uid)
            for dirpath, dirnames, filenames in os.walk(top):
                for name in dirnames + filenames:
                    os.lchown(os.path.join(dirpath, name), uid, uid)


def bwrap_argv(bwrap: str, *, network: bool, binds: list[str]) -> list[str]:
    """bwrap and its options, the per-task ``binds`` (workspace, HOME, private /tmp) mounted before the
    interpreter: an interpreter or venv under /tmp or /home (a clone in /tmp) would else be hidden by them."""
    argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-ipc", "--unshare-pid", "--unshare-uts",
            "--unshare-cgroup-try"]
    if os.geteuid() != 0:
        argv.append("--unshare-user")  # root keeps the init namespace so its shim can drop to SANDBOX_UID
    if not network:
        argv.append("--unshare-net")
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    for f in ETC_FILES:
        argv += ["--ro-bind-try", f, f]
    argv += binds
    python = _python_dirs()
    for parent in sorted({str(p) for d in [*python, str(HOME)] for p in Path(d).parents if str(p) != "/"}):
        argv += ["--perms", "0755", "--dir", parent]  # made by bwrap, else 0700: a root node's runs could not pass
    for d in python:
        argv += ["--ro-bind", d, d]
    return [*argv, "--proc", "/proc", "--dev", "/dev"]


def _python_dirs() -> list[str]:
    """The interpreter's installation and the virtual environment, wherever they live — only those
    folders, never what holds them (a venv inside the repository does not bring the repository)."""
    exe = os.path.realpath(sys.executable)
    candidates = [os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix), os.path.dirname(exe)]
    dirs: list[str] = []
    for d in candidates:
        covered = [*SYSTEM_DIRS, *dirs]
        if os.path.isdir(d) and not any(d == c or d.startswith(c.rstrip("/") + "/") for c in covered):
            dirs.append(d)
    return dirs


@functools.cache
def select(requested: SandboxRequest = "auto") -> Sandbox:
    """The sandbox this process uses (probed once): bwrap when it works here, else the fallback —
    unless ``bwrap`` was required, then ``ConfigError``."""
    if requested == "fallback":
        return Sandbox("fallback", reason="MESH_SANDBOX=fallback")
    found = shutil.which("bwrap")
    problem = "bubblewrap (bwrap) is not installed" if found is None else _probe(found)
    if problem is None:
        return Sandbox("bwrap", bwrap=found)
    if requested == "bwrap":
        raise ConfigError(f"MESH_SANDBOX=bwrap but the sandbox cannot run here: {problem}")
    return Sandbox("fallback", reason=problem)


def _probe(bwrap: str) -> str | None:
    """None when a sandboxed interpreter starts; else bwrap's reason (no user namespaces, no /proc mount…)."""
    with tempfile.TemporaryDirectory(prefix="mesh-probe-") as tmp:
        ws, private_tmp = os.path.join(tmp, "ws"), os.path.join(tmp, "tmp")
        os.mkdir(ws)
        os.mkdir(private_tmp)
        binds = ["--bind", ws, str(WORKSPACE), "--bind", private_tmp, str(TMP)]
        argv = [*bwrap_argv(bwrap, network=False, binds=binds), "--chdir", str(WORKSPACE),
                "--", sys.executable, "-I", "-S", "-c", "pass"]
        try:
            out = subprocess.run(argv, env={}, capture_output=True, text=True, timeout=PROBE_SECONDS, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"bwrap did not start: {exc}"
    if out.returncode != 0:
        return f"bwrap failed: {out.stderr.strip()[-300:] or f'exit status {out.returncode}'}"
    return None


def make_undumpable() -> None:
    """A same-uid process (a fallback run) can no longer read this process's ``/proc`` files — environ,
    memory, fds — nor ptrace it. Every ``mesh`` command does this: `mesh up`/`run` hold the same
    secrets as their nodes."""
    _prctl(PR_SET_DUMPABLE, 0)


def harden_process() -> None:
    """For node processes: undumpable, and the subreaper of what a run leaves once its shim is gone
    (swept after each run). Only where this process starts no children of its own besides runs."""
    global _hardened, _gate
    make_undumpable()
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _hardened, _gate = True, asyncio.Lock()


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise ConfigError(f"prctl({option}, {value}) failed: {os.strerror(ctypes.get_errno())}")


def gate() -> AbstractAsyncContextManager[object]:
    """Hold it around spawning a run and ``track``-ing its pid (nothing to hold where nothing is swept)."""
    return _gate if _gate is not None else nullcontext()


def track(pid: int) -> None:
    _running.add(pid)


async def untrack(pid: int) -> int:
    """The run is over: forget it and, in a hardened process, kill what runs left behind; returns how many."""
    _running.discard(pid)
    if _gate is None:
        return 0
    async with _gate:
        return await asyncio.to_thread(sweep_orphans, set(_running))


def sweep_orphans(keep: Iterable[int]) -> int:
    """Kill (and reap) every child of this process but ``keep``, with its whole subtree; returns how many
    were still running (a sandbox's own processes end as zombies re-parented here: reaped, not counted)."""
    keep = set(keep)
    killed = 0
    for _ in range(100):  # each pass kills the orphans found; their children come here next
        orphans = {pid: state for pid, (ppid, state) in _processes().items() if ppid == os.getpid() and pid not in keep}
        if not orphans:
            break
        for pid, state in orphans.items():
            try:
                os.kill(pid, signal.SIGKILL)
                killed += state != "Z"
            except ProcessLookupError:
                pass
        for pid in orphans:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    return killed


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process visible here."""
    found: dict[int, tuple[int, str]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()
                found[int(name)] = (int(fields[1]), fields[0].decode())
            except (OSError, IndexError, ValueError):
                continue
    return found
