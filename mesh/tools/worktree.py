"""A workspace materialised in a per-task temporary folder, for programs that need real files
(``shell.run``), and read back afterwards through the same guards as every other write.

Layout: ``<root>/ws`` holds the files (the command's cwd); ``<root>/home`` and ``<root>/tmp`` are
its ``HOME`` and ``TMPDIR``, outside the workspace so caches and temp files do not come back.
Files are written with ``atomic_write`` and only where the workspace differs from what the
folder is known to hold, never through a link. Reading back (``absorb``) walks the whole folder —
the ignored caches too — without following links and refuses the lot if it finds a symlink (one
pointing out of the workspace is called out as an escape), a device file, FIFO or socket, an
oversize file, a name that is not a canonical UTF-8 path, or too many files/bytes. A refused or
failed read-back leaves the workspace as it was, and the folder is rebuilt from the workspace
before the next command.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
from contextlib import suppress
from pathlib import Path

from mesh.contracts.models import sha256_hex
from mesh.errors import PathRefused
from mesh.tools.paths import atomic_write, canonical_path
from mesh.tools.sandbox import RunDirs
from mesh.tools.workspace import MAX_FILE_BYTES, MAX_FILES, Workspace

# Caches that tools write next to sources; they are not part of the work and are not read back
# (but they are scanned: a link planted in one would otherwise stay for a later sync to write through).
IGNORED_DIRS = frozenset({"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis"})
MAX_TOTAL_BYTES = 256 * 1024 * 1024
MAX_PROBLEMS_SHOWN = 10


class WorkTree:
    def __init__(self, parent_dir: Path | None = None) -> None:
        if parent_dir is not None:
            parent_dir.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="mesh-task-", dir=parent_dir))
        self.files, self.home, self.tmp = self.root / "ws", self.root / "home", self.root / "tmp"
        for d in (self.files, self.home, self.tmp):
            d.mkdir()
        self._synced: dict[str, str] | None = {}  # what the folder holds; None: unknown, rebuild it

    @property
    def dirs(self) -> RunDirs:
        return RunDirs(self.files, self.home, self.tmp)

    async def sync(self, ws: Workspace) -> None:
        """Make the folder hold exactly the workspace's files."""
        if self._synced is None:
            await asyncio.to_thread(_rmtree, self.files)
            self.files.mkdir()
            self._synced = {}
        target = ws.files
        writes = {p: await ws.read(p) for p, d in target.items() if self._synced.get(p) != d}
        deletes = [p for p in self._synced if p not in target]
        self._synced = None  # until the writes are done
        await asyncio.to_thread(self._write, writes, deletes)
        self._synced = dict(target)

    def _write(self, writes: dict[str, bytes], deletes: list[str]) -> None:
        for rel in deletes:
            self._inside(rel).unlink(missing_ok=True)
        for rel, data in writes.items():
            path = self._inside(rel)
            if path.is_dir() and not path.is_symlink():  # an emptied folder where a file now goes
                _rmtree(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)

    def _inside(self, rel: str) -> Path:
        """``files/rel``, refused if a folder on the way is a link (the scan refuses them; this holds anyway)."""
        path = self.files / rel
        top = os.path.realpath(self.files)
        parent = os.path.realpath(path.parent)
        if parent != top and not parent.startswith(top + os.sep):
            raise PathRefused(f"{rel!r}: a folder on its path is a link out of the workspace; not written")
        return path

    def discard(self) -> None:
        """Forget what the folder holds: it is rebuilt from the workspace before the next command."""
        self._synced = None

    async def absorb(self, ws: Workspace) -> dict[str, str]:
        """Bring what a command left in the folder into ``ws``; returns ``{path: added|modified|deleted}``."""
        try:
            found, problems = await asyncio.to_thread(self._scan)
            if problems:
                shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
                more = f" (+{len(problems) - MAX_PROBLEMS_SHOWN} more)" if len(problems) > MAX_PROBLEMS_SHOWN else ""
                raise PathRefused(f"the command left files the workspace refuses: {shown}{more}; "
                                  "none of its changes were kept")
            before = ws.files
            changes: dict[str, bytes | None] = {p: d for p, d in found.items() if before.get(p) != sha256_hex(d)}
            changes.update({p: None for p in before if p not in found})
            ws.apply(changes)
        except BaseException:
            self.discard()
            raise
        self._synced = dict(ws.files)
        return {p: "deleted" if d is None else "modified" if p in before else "added" for p, d in sorted(changes.items())}

    def _scan(self) -> tuple[dict[str, bytes], list[str]]:
        found: dict[str, bytes] = {}
        problems: list[str] = []
        total = 0
        top = str(self.files)

        def unreadable(exc: OSError) -> None:  # else its files would look deleted
            problems.append(f"folder {os.path.relpath(exc.filename or top, top)!r} cannot be read: {exc.strerror}")

        for dirpath, dirnames, filenames in os.walk(top, onerror=unreadable):  # never follows symlinks
            cache = any(part in IGNORED_DIRS for part in Path(os.path.relpath(dirpath, top)).parts)
            keep = []
            for name in dirnames:
                full = os.path.join(dirpath, name)
                if os.path.islink(full):
                    problems.append(self._link_problem(full))
                else:
                    keep.append(name)
            dirnames[:] = keep
            for name in filenames:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, top)
                try:
                    st = os.lstat(full)
                    if stat.S_ISLNK(st.st_mode):
                        problems.append(self._link_problem(full))
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        problems.append(f"{rel!r} is a device file, FIFO or socket")
                        continue
                    if cache:  # checked for links and special files above, never read back
                        continue
                    if st.st_size > MAX_FILE_BYTES:
                        problems.append(f"{rel}: {st.st_size} bytes exceeds the file size limit of {MAX_FILE_BYTES}")
                        continue
                    if canonical_path(rel) != rel or rel != rel.encode("utf-8", "replace").decode():
                        raise PathRefused(f"{rel!r} is not a canonical UTF-8 path")
                    total += st.st_size
                    if len(found) >= MAX_FILES or total > MAX_TOTAL_BYTES:
                        problems.append(f"more than {MAX_FILES} files or {MAX_TOTAL_BYTES} bytes in the workspace")
                        return found, problems
                    with open(full, "rb") as f:
                        found[rel] = f.read(MAX_FILE_BYTES + 1)
                except PathRefused as exc:
                    problems.append(str(exc))
                except OSError as exc:
                    problems.append(f"{rel!r} cannot be read: {exc.strerror}")
        return found, problems

    def _link_problem(self, full: str) -> str:
        rel = os.path.relpath(full, self.files)
        target = os.path.realpath(full)
        if os.path.commonpath([target, os.path.realpath(self.files)]) != os.path.realpath(self.files):
            return f"symlink {rel!r} escapes the workspace (points to {target})"
        return f"symlink {rel!r}: workspaces hold regular files only; write a copy instead"

    async def close(self) -> None:
        await asyncio.to_thread(_rmtree, self.root)


def _rmtree(path: Path) -> None:
    """Remove a tree even where a command took away permissions (each folder is opened up first)."""
    with suppress(OSError):
        os.chmod(path, 0o700)
    for dirpath, dirnames, _ in os.walk(path):  # top-down: a folder is opened before it is entered
        for name in dirnames:
            with suppress(OSError):
                if not os.path.islink(os.path.join(dirpath, name)):
                    os.chmod(os.path.join(dirpath, name), 0o700)
    shutil.rmtree(path, ignore_errors=True)
