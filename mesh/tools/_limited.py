"""Exec shim for ``shell.run``: bound this process, start the command, and when it ends kill every
process it left behind — then report how it ended.

Run as ``python -I -S -c <this source> CPU_S AS_BYTES FSIZE_BYTES NPROC NOFILE UID NOSOCK FD PROGRAM [ARGS...]``
(stdlib only, no site-packages; passed as source so no file of the mesh has to be visible inside a
sandbox). ``NPROC`` prefixed with ``+`` counts on top of the processes the real uid already has (the
fallback mode, where the run shares the node's uid); ``UID`` >= 0 is the uid to drop to (a root node);
``NOSOCK`` = 1 installs a seccomp filter that refuses new sockets (the fallback's network off: there is
no network namespace to take it away).
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

PR_SET_SECCOMP = 22
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
SWEEP_SECONDS = 10.0
# machine -> (seccomp audit arch, socket(2) number, io_uring_setup(2) number)
SYSCALLS = {"x86_64": (0xC000003E, 41, 425), "aarch64": (0xC00000B7, 198, 425)}
AF_NETLINK = 16  # kernel-local (interfaces, routes): not a way out
EACCES = 13


def _refuse_sockets(libc: ctypes.CDLL) -> None:
    """seccomp: socket(2) fails with EACCES for every family but netlink (socketpair(2), which asyncio
    needs, stays); so does io_uring (it can open sockets too) and the x32 ABI. Other machines: refused."""
    machine = os.uname().machine
    if machine not in SYSCALLS:
        raise OSError(f"no socket filter for {machine}: the fallback cannot take the network away here")
    arch, socket_nr, uring_nr = SYSCALLS[machine]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | EACCES
    program = [  # (code, jump if true, jump if false, k); jumps count instructions after the next one
        (ld, 0, 0, 4),                   # 0: arch
        (jeq, 0, 6, arch),               # 1: another ABI: allow (8)
        (ld, 0, 0, 0),                   # 2: syscall number
        (jge, 5, 0, 0x40000000),         # 3: x32: deny (9)
        (jeq, 4, 0, uring_nr),           # 4: io_uring_setup: deny
        (jeq, 0, 2, socket_nr),          # 5: not socket(): allow
        (ld, 0, 0, 16),                  # 6: its first argument, the family
        (jeq, 0, 1, AF_NETLINK),         # 7: netlink: allow, else deny
        (ret, 0, 0, allow),              # 8
        (ret, 0, 0, deny),               # 9
    ]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(program))(*(Filter(*op) for op in program))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(Program(len(program), filters)), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter refused")


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
    nproc, nofile, uid, nosock, status_fd = argv[4], int(argv[5]), int(argv[6]), argv[7] == "1", int(argv[8])
    program, args = argv[9], argv[10:]
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
            if nosock:
                _refuse_sockets(libc)
            os.execv(program, [program, *args])
        except OSError as exc:
            hint = f" (the run's uid {uid} cannot reach it)" if uid >= 0 and exc.errno == EACCES else ""
            print(f"shell.run: cannot start {program}: {exc}{hint}", file=sys.stderr)
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
