"""Run a mesh process as root or as an unprivileged user, whatever user the suite runs as.

CI runs the suite as root, so "as an unprivileged user" is uid 65534 through ``setpriv``. Where the
interpreter lives in a folder that user cannot enter (pyenv under a 0700 ``/root``, as on the CI
machine), the process runs in a private mount namespace where that one folder is mounted on a 0755
tmpfs: the interpreter becomes reachable as it is in the image (``/usr/local``), nothing else changes.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import sys
from pathlib import Path

import pytest

UNPRIVILEGED = 65534
USERS = ("root", "unprivileged")


def skip_reason(user: str) -> str | None:
    """Why this machine cannot run a process as ``user`` (None: it can)."""
    if user == "root" and os.geteuid() != 0:
        return "running as root needs the suite to run as root (it does in CI)"
    if user == "unprivileged" and os.geteuid() == 0 and not shutil.which("setpriv"):
        return "setpriv (util-linux) is not installed"
    if os.geteuid() == 0 and _blocked() is not None and not shutil.which("unshare"):
        return "the interpreter is not reachable for other users and unshare (util-linux) is missing"
    return None


def as_user(user: str, argv: list[str]) -> list[str]:
    """``argv`` run as ``user`` ("root" or "unprivileged"), the interpreter reachable for either."""
    reason = skip_reason(user)
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0:
        return argv  # already unprivileged
    if user == "unprivileged":
        argv = ["setpriv", f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}", "--clear-groups",
                "--inh-caps=-all", *argv]
    blocked = _blocked()
    if blocked is None:
        return argv
    closed, inner = blocked
    script = (f"set -e; keep=$(mktemp -d); mount --bind {shlex.quote(inner)} \"$keep\"; "
              f"mount -t tmpfs -o mode=0755 mesh-test {shlex.quote(closed)}; mkdir -p {shlex.quote(inner)}; "
              f"mount --bind \"$keep\" {shlex.quote(inner)}; exec {shlex.join(argv)}")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]


def _blocked() -> tuple[str, str] | None:
    """(the first folder on the interpreter's path others cannot enter, its child on that path)."""
    target = Path(os.path.realpath(sys.base_prefix))
    for folder in [*reversed(target.parents), target]:
        if folder != Path("/") and not os.stat(folder).st_mode & stat.S_IXOTH:
            inner = target.parts[: len(folder.parts) + 1]
            return str(folder), str(Path(*inner))
    return None


def give(path: Path, user: str) -> None:
    """Make ``path`` (a tree) belong to ``user``, as the folders of a node running as that user would."""
    if os.geteuid() != 0 or user == "root":
        return
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, UNPRIVILEGED, UNPRIVILEGED)
