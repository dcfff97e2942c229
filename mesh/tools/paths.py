"""Paths and bytes on the way into and out of a workspace: canonical relative paths, atomic file
writes, and telling text from binary.

A workspace path is always the canonical relative POSIX form (``src/app.py``): no ``..``, no
absolute paths, no backslashes or NUL bytes, no empty or ``.`` parts. Checking the *string* is
enough for the in-memory workspace, which has no symlinks; the on-disk copy that ``shell.run``
uses is checked entry by entry when it is read back (``mesh.tools.worktree``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path, PurePosixPath

from mesh.errors import PathRefused

TEMP_PREFIX = ".mesh-tmp-"
_SNIFF_BYTES = 8192


def canonical_path(raw: object) -> str:
    """The canonical relative form of a workspace path, or ``PathRefused`` saying why not."""
    if not isinstance(raw, str) or not raw.strip():
        raise PathRefused("path must be a non-empty string")
    if "\x00" in raw or "\\" in raw:
        raise PathRefused(f"path {raw!r} contains a NUL byte or a backslash")
    path = PurePosixPath(raw)
    if path.is_absolute():
        raise PathRefused(f"absolute path {raw!r} refused: paths are relative to the workspace")
    parts = [p for p in path.parts if p not in ("", ".")]
    if ".." in parts:
        raise PathRefused(f"path {raw!r} escapes the workspace ('..')")
    if not parts:
        raise PathRefused(f"path {raw!r} names the workspace itself, not a file")
    return "/".join(parts)


def is_binary(data: bytes) -> bool:
    """True for bytes that are not UTF-8 text (or hold a NUL byte, which text files do not)."""
    head = data[:_SNIFF_BYTES]
    if b"\x00" in head:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def atomic_write(target: Path, data: bytes | Iterable[bytes], *, sync: bool = True) -> None:
    """Write ``target`` so that it holds either its old content or all of the new, never a part.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the file is
    renamed over the target (``os.replace`` is atomic on POSIX). A process killed midway leaves
    the old file and at most a stray ``.mesh-tmp-*`` file. ``data`` may be an iterable of chunks
    so large copies stream. Replacing a symlink replaces the link, never the file it points to.
    ``sync=False`` skips the fsync: for a file whose reader checks it anyway (a cache entry against its
    digest), so a machine crash can only leave a file that is found damaged and replaced.
    """
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in (data,) if isinstance(data, bytes) else data:
                f.write(chunk)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
