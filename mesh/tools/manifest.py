"""The workspace manifest: ``{path: sha256}`` plus the digest of the manifest it was derived from.

Encoded as canonical JSON (sorted keys, no whitespace, no timestamps), so the same files on the
same parent always give the same bytes and therefore the same digest: a redelivered step that
makes the same changes produces the same manifest, and storing it again is a no-op.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mesh.contracts.models import ArtifactRef
from mesh.errors import PathRefused, ToolError
from mesh.tools.paths import canonical_path

MANIFEST_MEDIA_TYPE = "application/vnd.mesh.workspace+json"
FORMAT_VERSION = 1
_HEX = frozenset("0123456789abcdef")

# Storage is passed in, so tools stay pure of the bus: fetch bytes by digest; store bytes and get a ref.
Fetch = Callable[[str], Awaitable[bytes]]
Store = Callable[[bytes, str, str], Awaitable[ArtifactRef]]  # (data, media_type, name) -> ref


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


@dataclass(frozen=True, slots=True)
class Manifest:
    files: dict[str, str] = field(default_factory=dict)
    parent: str | None = None  # digest of the manifest this one was derived from

    def encode(self) -> bytes:
        doc = {"version": FORMAT_VERSION, "parent": self.parent, "files": dict(sorted(self.files.items()))}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Parse and check a manifest: canonical paths, sha256 digests, a known format version."""
        try:
            doc = json.loads(data)
            files, parent = doc["files"], doc.get("parent")
            version = doc.get("version", FORMAT_VERSION)
        except (ValueError, KeyError, TypeError) as exc:
            raise ToolError(f"not a workspace manifest: {exc!r}") from exc
        if version != FORMAT_VERSION:
            raise ToolError(f"workspace manifest format {version!r} is not supported (expected {FORMAT_VERSION})")
        if not isinstance(files, dict) or not all(_is_digest(d) for d in files.values()):
            raise ToolError("not a workspace manifest: 'files' must map paths to sha256 digests")
        if parent is not None and not _is_digest(parent):
            raise ToolError(f"not a workspace manifest: bad parent digest {parent!r}")
        try:
            checked = {canonical_path(p): d for p, d in files.items()}
        except PathRefused as exc:
            raise ToolError(f"workspace manifest holds a bad path: {exc}") from exc
        if len(checked) != len(files):
            raise ToolError("workspace manifest names a file twice (paths differ only in form)")
        return cls(files=checked, parent=parent)
