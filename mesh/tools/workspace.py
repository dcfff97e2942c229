"""Content-addressed workspaces.

A workspace is a manifest ``{path: sha256}`` stored as an artifact; its files live in the object store
by digest, so pods share no filesystem. A step opens the workspace of its inputs, its tool calls change
an in-memory overlay, and ``commit`` stores changed files and a new manifest whose parent is the old one.
A failed tool call changes nothing: writes are applied to the overlay only after every check passed.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import PurePosixPath

from mesh.contracts.models import ArtifactRef, sha256_hex
from mesh.errors import PathRefused, ToolError

MANIFEST_MEDIA_TYPE = "application/vnd.mesh.workspace+json"
MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_FILES = 5_000

Fetch = Callable[[str], Awaitable[bytes]]
Store = Callable[[bytes, str, str], Awaitable[ArtifactRef]]  # (data, media_type, name) -> ref


def canonical_path(raw: str) -> str:
    """The canonical relative form of a workspace path, or ``PathRefused``."""
    if not isinstance(raw, str) or not raw.strip():
        raise PathRefused("path must be a non-empty string")
    if "\x00" in raw or "\\" in raw:
        raise PathRefused(f"path {raw!r} contains a NUL byte or a backslash")
    path = PurePosixPath(raw)
    if path.is_absolute():
        raise PathRefused(f"absolute path {raw!r} refused: paths are relative to the workspace")
    parts = [p for p in path.parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise PathRefused(f"path {raw!r} escapes the workspace ('..')")
    if not parts:
        raise PathRefused(f"path {raw!r} names the workspace itself, not a file")
    return "/".join(parts)


def parse_manifest(data: bytes) -> dict[str, str]:
    try:
        doc = json.loads(data)
        files = doc["files"]
        assert isinstance(files, dict)
        return {canonical_path(p): str(d) for p, d in files.items()}
    except (ValueError, KeyError, AssertionError, PathRefused) as exc:
        raise ToolError(f"not a workspace manifest: {exc}") from exc


class Workspace:
    """A manifest plus an overlay of changed files; reads fall through to the object store."""

    def __init__(self, files: dict[str, str], fetch: Fetch, parent: ArtifactRef | None = None) -> None:
        self._base = dict(files)
        self._fetch = fetch
        self._cache: dict[str, bytes] = {}
        self._changed: dict[str, bytes] = {}
        self.parent = parent

    @classmethod
    async def open(cls, ref: ArtifactRef | None, fetch: Fetch) -> Workspace:
        if ref is None:
            return cls({}, fetch)
        return cls(parse_manifest(await fetch(ref.digest)), fetch, parent=ref)

    @property
    def paths(self) -> list[str]:
        return sorted(set(self._base) | set(self._changed))

    @property
    def dirty(self) -> bool:
        return bool(self._changed)

    def digest_of(self, path: str) -> str | None:
        if path in self._changed:
            return sha256_hex(self._changed[path])
        return self._base.get(path)

    async def read(self, raw_path: str) -> bytes:
        path = canonical_path(raw_path)
        if path in self._changed:
            return self._changed[path]
        digest = self._base.get(path)
        if digest is None:
            raise ToolError(f"no such file: {path}")
        if digest not in self._cache:
            self._cache[digest] = await self._fetch(digest)
        return self._cache[digest]

    def write(self, raw_path: str, data: bytes) -> str:
        path = canonical_path(raw_path)
        if len(data) > MAX_FILE_BYTES:
            raise ToolError(f"{path}: {len(data)} bytes exceeds the file limit of {MAX_FILE_BYTES}")
        if path not in self._base and path not in self._changed and len(self.paths) >= MAX_FILES:
            raise ToolError(f"workspace already holds the maximum of {MAX_FILES} files")
        if any(p.startswith(path + "/") for p in self.paths):
            raise PathRefused(f"{path} is a folder of the workspace")
        self._changed[path] = data
        return path

    def diff_paths(self) -> dict[str, str]:
        """Changed paths → 'added' or 'modified'."""
        return {p: ("modified" if p in self._base else "added") for p in sorted(self._changed)}

    async def commit(self, store: Store) -> ArtifactRef:
        """Store changed files and the new manifest; return the manifest's reference."""
        files = dict(self._base)
        for path, data in sorted(self._changed.items()):
            ref = await store(data, "application/octet-stream", path)
            files[path] = ref.digest
        manifest = json.dumps({"files": dict(sorted(files.items()))}, sort_keys=True).encode()
        return await store(manifest, MANIFEST_MEDIA_TYPE, "workspace.json")
