"""Exec shim for ``shell.run``: set this process's resource limits, then become the command.

Run by path as ``python -I -S _limited.py CPU_S AS_BYTES FSIZE_BYTES PROGRAM [ARGS...]`` (stdlib
only, no site-packages). Why not ``preexec_fn``: it runs Python between fork and exec in a copy of
a multi-threaded node process, which the ``subprocess`` docs warn can deadlock; this shim sets the
limits in a fresh single-threaded process instead, before any of the command's code runs.
"""

import os
import resource
import sys


def _limit(which: int, soft: int, hard: int) -> None:
    _, current_hard = resource.getrlimit(which)
    if current_hard != resource.RLIM_INFINITY:  # a process may lower its hard limit, never raise it
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(which, (soft, hard))


def main(argv: list[str]) -> None:
    cpu, memory, fsize = (int(v) for v in argv[1:4])
    program, args = argv[4], argv[5:]
    _limit(resource.RLIMIT_CPU, cpu, cpu + 1)  # SIGXCPU at the soft limit, SIGKILL a second later
    _limit(resource.RLIMIT_AS, memory, memory)
    _limit(resource.RLIMIT_FSIZE, fsize, fsize)
    _limit(resource.RLIMIT_CORE, 0, 0)
    try:
        os.execv(program, [program, *args])
    except OSError as exc:
        print(f"shell.run: cannot execute {program}: {exc}", file=sys.stderr)
        sys.exit(127)


if __name__ == "__main__":
    main(sys.argv)
