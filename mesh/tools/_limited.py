"""Exec shim for ``shell.run``: bound this process, start the command, and when it ends kill every
process it left behind — then report how it ended.

Run as ``python -I -S -c <this source> CPU_S AS_BYTES FSIZE_BYTES NPROC NOFILE UID FD PROGRAM [ARGS...]``
(stdlib only, no site-packages; passed as source so no file of the mesh has to be visible inside a
sandbox). ``NPROC`` prefixed with ``+`` counts on top of the processes the real uid already has (the
fallback mode, where the run shares the node's uid); ``UID`` >= 0 is the uid to drop to (a root node).
The result goes to fd ``FD`` as one JSON object: ``{"exit": N}`` or ``{"signal": N}``, and ``"left"``:
how many processes the command left running (killed here).

Why a shim and not ``preexec_fn``: ``preexec_fn`` runs Python between fork and exec in a copy of a
multi-threaded node process, which the ``subprocess`` docs warn can deadlock; the shim sets the
limits in a fresh single-threaded process before any of the command's code runs. Why it stays as a
parent instead of exec'ing the command: it is the run's child subreaper, so a ``setsid`` or
double-forked daemon is re-parented to it and killed here rather than outliving the step.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
SWEEP_SECONDS = 10.0


def _limit(which: int, value: int) -> None:
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:  # a process may lower its hard limit, never raise it
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def _tasks_of(uid: int) -> int:
    """Threads the real uid runs now: what RLIMIT_NPROC counts."""
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status", "rb") as f:
                    fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
            except OSError:
                continue
            if int(fields[b"Uid"].split()[0]) == uid:
                count += int(fields[b"Threads"])
    return count


def _descendants(root: int) -> dict[int, bytes]:
    """pid -> state letter of every process below ``root``."""
    children: dict[int, list[tuple[int, bytes]]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            children.setdefault(int(fields[1]), []).append((int(name), fields[0]))
    found: dict[int, bytes] = {}
    stack = [root]
    while stack:
        for pid, state in children.get(stack.pop(), ()):
            found[pid] = state
            stack.append(pid)
    return found


def _sweep() -> int:
    """Kill every descendant until none is left (each killed one's children come to this subreaper)."""
    killed: set[int] = set()
    deadline = time.monotonic() + SWEEP_SECONDS
    while time.monotonic() < deadline:
        pids = _descendants(os.getpid())
        for pid, state in pids.items():
            try:
                os.kill(pid, signal.SIGKILL)
                if state != b"Z":  # a zombie was not running, only not yet reaped
                    killed.add(pid)
            except ProcessLookupError:
                pass
        while True:  # reap whatever died
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if not pids:
            return len(killed)
    return len(killed)


def main(argv: list[str]) -> None:
    cpu, memory, fsize = (int(v) for v in argv[1:4])
    nproc, nofile, uid, status_fd = argv[4], int(argv[5]), int(argv[6]), int(argv[7])
    program, args = argv[8], argv[9:]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # setuid binaries do not raise the run's privileges
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    if uid >= 0 and os.geteuid() == 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    procs = int(nproc) + (_tasks_of(os.getuid()) if nproc.startswith("+") else 0)
    _limit(resource.RLIMIT_CPU, cpu)  # the command gets SIGXCPU at it (the shim itself only waits)
    _limit(resource.RLIMIT_AS, memory)
    _limit(resource.RLIMIT_FSIZE, fsize)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NPROC, procs)
    _limit(resource.RLIMIT_NOFILE, nofile)
    report = os.fdopen(status_fd, "w")
    os.set_inheritable(status_fd, False)
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(program, [program, *args])
        except OSError as exc:
            print(f"shell.run: cannot execute {program}: {exc}", file=sys.stderr)
        os._exit(127)
    def stop(*_: object) -> None:  # the node's timeout or cancellation: end the run now (then sweep)
        os.kill(pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    left = _sweep()
    code = os.waitstatus_to_exitcode(status)
    json.dump({**({"signal": -code} if code < 0 else {"exit": code}), "left": left}, report)
    report.close()
    os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main(sys.argv)
