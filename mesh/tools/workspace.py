"""Content-addressed workspaces.

A workspace is a manifest ``{path: sha256}`` stored as an artifact; its files live in the object
store by digest, so pods share no filesystem. A step opens the workspace of its inputs; its tool
calls change an in-memory copy of the file map (new content is kept by digest until commit);
``commit`` stores the new files and a new manifest whose ``parent`` is the manifest it was opened
from. Every change goes through ``apply``, which checks the whole resulting workspace first and
only then swaps it in — so a tool call that fails changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

from mesh.aio import together
from mesh.contracts.models import ArtifactRef, sha256_hex
from mesh.errors import PathRefused, ToolError
from mesh.tools.diff import diff_manifests
from mesh.tools.manifest import MANIFEST_MEDIA_TYPE, Fetch, Manifest, Store
from mesh.tools.paths import canonical_path, is_binary

__all__ = ["MANIFEST_MEDIA_TYPE", "MAX_FILES", "MAX_FILE_BYTES", "Workspace"]

MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_FILES = 5_000


class Workspace:
    def __init__(self, files: dict[str, str], fetch: Fetch, parent: ArtifactRef | None = None) -> None:
        self._base = dict(files)
        self._files = dict(files)
        self._blobs: dict[str, bytes] = {}  # content by digest: fetched, or written and not yet stored
        self._fetch = fetch
        self.parent = parent  # the manifest this workspace was opened from

    @classmethod
    async def open(cls, ref: ArtifactRef | None, fetch: Fetch) -> Workspace:
        if ref is None:
            return cls({}, fetch)
        return cls(Manifest.decode(await fetch(ref.digest)).files, fetch, parent=ref)

    # --- state -------------------------------------------------------------------------------

    @property
    def paths(self) -> list[str]:
        return sorted(self._files)

    @property
    def files(self) -> Mapping[str, str]:
        """The current ``{path: digest}`` (read-only view)."""
        return dict(self._files)

    @property
    def dirty(self) -> bool:
        return self._files != self._base

    def digest_of(self, path: str) -> str | None:
        return self._files.get(canonical_path(path))

    def changes(self) -> dict[str, str]:
        """Changed paths → ``added``, ``modified`` or ``deleted``, against the opened manifest."""
        out = {}
        for path in sorted(self._base.keys() | self._files.keys()):
            before, now = self._base.get(path), self._files.get(path)
            if before != now:
                out[path] = "added" if before is None else "deleted" if now is None else "modified"
        return out

    def manifest(self) -> Manifest:
        return Manifest(files=dict(self._files), parent=self.parent.digest if self.parent else None)

    # --- reading and changing ----------------------------------------------------------------

    async def read(self, raw_path: str) -> bytes:
        path = canonical_path(raw_path)
        digest = self._files.get(path)
        if digest is None:
            raise ToolError(f"no such file: {path}")
        return await self._blob(digest)

    def write(self, raw_path: str, data: bytes) -> str:
        path = canonical_path(raw_path)
        self.apply({path: data})
        return path

    def delete(self, raw_path: str) -> str:
        path = canonical_path(raw_path)
        self.apply({path: None})
        return path

    def apply(self, changes: Mapping[str, bytes | None]) -> None:
        """Write (bytes) or delete (None) several files at once: every change and the resulting
        workspace are checked before anything is applied."""
        files = dict(self._files)
        added: dict[str, bytes] = {}
        for raw, data in changes.items():
            path = canonical_path(raw)
            if data is None:
                if files.pop(path, None) is None:
                    raise ToolError(f"no such file to delete: {path}")
                continue
            if len(data) > MAX_FILE_BYTES:
                raise ToolError(f"{path}: {len(data)} bytes exceeds the file size limit of {MAX_FILE_BYTES} bytes")
            digest = sha256_hex(data)
            files[path] = digest
            added[digest] = data
        _check_shape(files)
        self._files = files
        self._blobs.update(added)

    # --- output ------------------------------------------------------------------------------

    async def commit(self, store: Store) -> ArtifactRef:
        """Store new file contents and the new manifest; return the manifest's reference. The same
        files on the same parent always give the same manifest digest (idempotent re-runs)."""
        stored, new = set(self._base.values()), dict[str, str]()  # digest → its first path
        for path, digest in sorted(self._files.items()):
            if digest not in stored:
                new.setdefault(digest, path)
        # the files concurrently (a round trip each to the store), the manifest only once they are all in
        await together(*(self._store_file(store, digest, path) for digest, path in new.items()))
        return await store(self.manifest().encode(), MANIFEST_MEDIA_TYPE, "workspace.json")

    async def _store_file(self, store: Store, digest: str, path: str) -> None:
        await store(await self._blob(digest), "application/octet-stream", path)

    async def diff(self) -> str:
        """Unified diff from the opened manifest to the current files."""
        return await diff_manifests(Manifest(files=self._base), self.manifest(), self._blob)

    async def render(self, max_file_chars: int) -> str:
        """The workspace as prompt text: the file list, then each text file (binary files named only)."""
        parts = [f"Files: {', '.join(self.paths) or '(none)'}"]
        # every file fetched concurrently first (each one not yet on this node is a round trip to the store)
        await together(*(self._blob(digest) for digest in set(self._files.values())))
        for path in self.paths:
            data = await self.read(path)
            if is_binary(data):
                parts.append(f"--- {path}\n(binary file, {len(data)} bytes)")
            else:
                text = data.decode()
                cut = f"\n…[{len(text) - max_file_chars} more characters]" if len(text) > max_file_chars else ""
                parts.append(f"--- {path}\n{text[:max_file_chars]}{cut}")
        return "\n".join(parts)

    async def _blob(self, digest: str) -> bytes:
        data = self._blobs.get(digest)
        if data is None:
            data = self._blobs[digest] = await self._fetch(digest)
        return data


def _check_shape(files: Mapping[str, str]) -> None:
    if len(files) > MAX_FILES:
        raise ToolError(f"the workspace would hold {len(files)} files; the limit is {MAX_FILES}")
    folders = {path.rsplit("/", i)[0] for path in files for i in range(1, path.count("/") + 1)}
    clash = sorted(folders & files.keys())
    if clash:
        raise PathRefused(f"{clash[0]} would be both a file and a folder of the workspace")
