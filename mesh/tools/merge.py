"""Which workspace a step works on when its inputs carry several manifests.

A revision's inputs hold the revised code and, passed on by the review it answers, the code before
it; a step after parallel coder steps holds one workspace per branch. The step works on the newest
when one manifest descends from all the others (order of the inputs does not matter); otherwise the
branches are merged three-way from their nearest common ancestor: each branch's changes since then
are applied, and two branches that changed one path differently are a ``WorkspaceConflict`` (the
step fails with the paths named, and the planner replans) — never a silent loss of one branch's work.
"""

from __future__ import annotations

from mesh.contracts.models import ArtifactRef
from mesh.errors import ToolError, WorkspaceConflict
from mesh.tools.manifest import MANIFEST_MEDIA_TYPE, Fetch, Manifest, Store

MAX_ANCESTRY = 1024  # manifests walked back per branch: far beyond any goal's revisions


async def _lineage(digest: str, fetch: Fetch, until: set[str]) -> list[tuple[str, Manifest]]:
    """The manifest and its ancestors, newest first — stopping once every digest of ``until`` is among
    them (the common case, a revision and the code before it, is one hop, not a walk to the root)."""
    line: list[tuple[str, Manifest]] = []
    seen: set[str] = set()
    current: str | None = digest
    while current is not None and not until <= seen:
        if len(line) == MAX_ANCESTRY:
            raise ToolError(f"workspace {digest[:12]} has more than {MAX_ANCESTRY} ancestors")
        manifest = Manifest.decode(await fetch(current))
        line.append((current, manifest))
        seen.add(current)
        current = manifest.parent
    return line


async def resolve_workspace(refs: list[ArtifactRef], fetch: Fetch, store: Store) -> ArtifactRef | None:
    """The workspace a step with these manifest inputs works on (None: no workspace yet)."""
    distinct = list({ref.digest: ref for ref in refs}.values())
    if len(distinct) <= 1:
        return distinct[0] if distinct else None
    digests = {ref.digest for ref in distinct}
    lines: dict[str, list[tuple[str, Manifest]]] = {}
    for ref in distinct:
        lines[ref.digest] = await _lineage(ref.digest, fetch, until=digests)
        if digests <= {a for a, _ in lines[ref.digest]}:
            return ref
    # No branch descends from all the others, so each walk above went to its root: merge.
    ancestors = {d: {a for a, _ in line} for d, line in lines.items()}
    first = distinct[0].digest
    base = next((m.files for a, m in lines[first] if all(a in ancestors[d] for d in ancestors)), {})
    merged, changed_by = dict(base), dict[str, tuple[str, str | None]]()
    conflicts: list[str] = []
    for ref in distinct:
        files = lines[ref.digest][0][1].files
        for path in sorted(base.keys() | files.keys()):
            new = files.get(path)
            if new == base.get(path):
                continue
            if path in changed_by and changed_by[path][1] != new:
                conflicts.append(f"{path} (steps {changed_by[path][0]} and {ref.name or ref.digest[:12]})")
                continue
            changed_by[path] = (ref.name or ref.digest[:12], new)
            if new is None:
                merged.pop(path, None)
            else:
                merged[path] = new
    if conflicts:
        raise WorkspaceConflict("parallel steps changed the same files differently: " + "; ".join(conflicts))
    return await store(Manifest(files=merged, parent=first).encode(), MANIFEST_MEDIA_TYPE, "merged/workspace")
