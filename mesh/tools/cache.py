"""A node's on-disk cache of object-store blobs, by digest.

Workspace files are content-addressed, so a file fetched once for one task serves every later
task on the node (and every node sharing the folder: writes are atomic and names are digests, so
concurrent writers cannot clash). The cache is itself a ``Fetch``: wrap the bus's ``get_blob`` in
it and hand it to a workspace. Every read is checked against its digest; a damaged entry is
dropped and fetched again. Past ``max_bytes`` the least recently used entries are evicted.

``MemoryCache`` keeps the most recently used blobs in memory in front of it: every step of a goal reads
the same manifest and files again (the lineage walk, the workspace, the prompt), and each disk read is
a file read, a digest check and a utime — the largest share of a step's CPU in the worker before it.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TypeVar

from mesh.contracts.models import sha256_hex
from mesh.errors import ToolError
from mesh.tools.manifest import Fetch
from mesh.tools.paths import atomic_write

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_MEMORY_BYTES = 64 * 1024 * 1024
INLINE_BYTES = 256 * 1024  # entries up to this size are read and written without a thread hop
T = TypeVar("T")
R = TypeVar("R")


class BlobCache:
    def __init__(self, root: Path, fetch: Fetch, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = root
        self._fetch = fetch
        self.max_bytes = max_bytes
        self._bytes: int | None = None  # measured on the first store
        self.hits = 0
        self.misses = 0

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    async def __call__(self, digest: str) -> bytes:
        path = self.path(digest)
        data = await _small_inline(_read_verified, _size(path), path, digest)
        if data is not None:
            self.hits += 1
            return data
        self.misses += 1
        data = await self._fetch(digest)
        if sha256_hex(data) != digest:
            raise ToolError(f"blob {digest} failed its digest check")
        await _small_inline(self._store, len(data), path, data)
        return data

    def _store(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data, sync=False)  # every read checks the digest: a torn entry is fetched again
        if self._bytes is None:
            self._bytes = sum(size for _, size, _ in _entries(self.root))
        else:
            self._bytes += len(data)
        if self._bytes > self.max_bytes:
            self._bytes = self.prune(int(self.max_bytes * 0.8))

    def prune(self, keep_bytes: int) -> int:
        """Evict least recently used entries until at most ``keep_bytes`` remain; returns the total."""
        entries = sorted(_entries(self.root), key=lambda e: e[2])  # oldest use first
        total = sum(size for _, size, _ in entries)
        for path, size, _ in entries:
            if total <= keep_bytes:
                break
            with suppress(FileNotFoundError):
                path.unlink()
                total -= size
        return total


class MemoryCache:
    """A ``Fetch`` that keeps up to ``max_bytes`` of recently used blobs in memory in front of another
    ``Fetch`` (a ``BlobCache``). Entries are only ever what that one returned, already digest-checked,
    and are immutable by their digest, so a memory hit needs no check."""

    def __init__(self, fetch: Fetch, *, max_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        self._fetch = fetch
        self.max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[str, bytes] = OrderedDict()  # digest → data, least recently used first

    async def __call__(self, digest: str) -> bytes:
        data = self._entries.get(digest)
        if data is not None:
            self._entries.move_to_end(digest)
            return data
        data = await self._fetch(digest)
        if len(data) <= self.max_bytes // 8:  # a few huge blobs must not flush everything else
            self._entries[digest] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                self._bytes -= len(self._entries.popitem(last=False)[1])
        return data


async def _small_inline(io: Callable[[Path, T], R], size: int, path: Path, arg: T) -> R:
    """Disk I/O of a small entry on the loop itself, a large one in a thread: a thread hop (two wake-ups,
    two context switches) cost more CPU and latency than reading or writing a few KiB of page cache."""
    if size <= INLINE_BYTES:
        return io(path, arg)
    return await asyncio.to_thread(io, path, arg)


def _size(path: Path) -> int:
    """The entry's size in bytes; 0 when there is none (the read that follows finds it missing)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_verified(path: Path, digest: str) -> bytes | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if sha256_hex(data) != digest:
        with suppress(FileNotFoundError):
            path.unlink()
        return None
    with suppress(OSError):
        os.utime(path)  # mark as recently used, for eviction
    return data


def _entries(root: Path) -> list[tuple[Path, int, float]]:
    out = []
    for path in root.glob("??/*"):
        with suppress(FileNotFoundError):
            st = path.stat()
            out.append((path, st.st_size, st.st_mtime))
    return out
