"""Workspaces: canonical paths, all-or-nothing changes, content-addressed manifests with a parent,
diffs, the node's blob cache, and atomic file writes (killed midway: the old file survives)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.contracts.models import ArtifactRef, sha256_hex
from mesh.errors import PathRefused, ToolError, WorkspaceConflict
from mesh.tools.cache import INLINE_BYTES, BlobCache, MemoryCache
from mesh.tools.diff import diff_manifests
from mesh.tools.manifest import MANIFEST_MEDIA_TYPE, Manifest
from mesh.tools.merge import resolve_workspace
from mesh.tools.paths import TEMP_PREFIX, canonical_path
from mesh.tools.workspace import MAX_FILE_BYTES, Workspace

ROOT = Path(__file__).resolve().parent.parent


class Blobs:
    """A content-addressed blob store in a dict, standing where the bus's object store goes
    (the tools take storage as callables; the bus-backed path is covered in test_tools_e2e)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.fetches = 0

    async def fetch(self, digest: str) -> bytes:
        self.fetches += 1
        return self.data[digest]

    async def store(self, data: bytes, media_type: str, name: str) -> ArtifactRef:
        digest = sha256_hex(data)
        self.data[digest] = data
        return ArtifactRef(digest=digest, media_type=media_type, size=len(data), name=name)


@pytest.mark.parametrize("raw", ["../x", "a/../../x", "/etc/passwd", "a\\b", "a\x00b", "", "  ", ".", "./"])
def test_paths_that_escape_or_are_not_files_are_refused(raw: str) -> None:
    with pytest.raises(PathRefused):
        canonical_path(raw)


def test_canonical_form() -> None:
    assert canonical_path("./src//app.py") == "src/app.py"
    assert canonical_path("a/./b/") == "a/b"


async def test_commit_is_content_addressed_records_its_parent_and_repeats_exactly() -> None:
    blobs = Blobs()
    first = Workspace({}, blobs.fetch)
    first.write("src/app.py", b"print('hi')\n")
    base = await first.commit(blobs.store)
    assert base.media_type == MANIFEST_MEDIA_TYPE
    assert Manifest.decode(blobs.data[base.digest]).parent is None

    async def step(order: list[tuple[str, bytes]]) -> ArtifactRef:
        ws = await Workspace.open(base, blobs.fetch)
        for path, data in order:
            ws.write(path, data)
        return await ws.commit(blobs.store)

    changes = [("src/app.py", b"print('bye')\n"), ("tests/test_app.py", b"def test(): pass\n")]
    one, two = await step(changes), await step(list(reversed(changes)))
    assert one.digest == two.digest != base.digest  # same inputs → the same manifest
    manifest = Manifest.decode(blobs.data[one.digest])
    assert manifest.parent == base.digest
    assert manifest.files == {"src/app.py": sha256_hex(b"print('bye')\n"),
                              "tests/test_app.py": sha256_hex(b"def test(): pass\n")}

    same = await Workspace.open(base, blobs.fetch)
    same.write("src/app.py", b"print('hi')\n")  # identical content: nothing changed
    assert not same.dirty and same.changes() == {}


async def _derive(blobs: Blobs, parent: ArtifactRef | None, name: str, changes: dict[str, bytes | None]) -> ArtifactRef:
    ws = await Workspace.open(parent, blobs.fetch)
    ws.apply(changes)
    ref = await ws.commit(blobs.store)
    return ref.model_copy(update={"name": f"{name}/workspace"})


async def test_a_step_works_on_the_newest_workspace_whatever_the_input_order() -> None:
    blobs = Blobs()
    base = await _derive(blobs, None, "implement-1", {"app.py": b"v1\n"})
    revised = await _derive(blobs, base, "implement-1-rev1", {"app.py": b"v2\n"})
    again = await _derive(blobs, revised, "implement-1-rev2", {"app.py": b"v3\n"})
    for inputs in ([base, again, revised], [again, base], [revised, base, base]):
        newest = max(inputs, key=[base, revised, again].index)
        assert await resolve_workspace(inputs, blobs.fetch, blobs.store) == newest
    assert await resolve_workspace([], blobs.fetch, blobs.store) is None


async def test_parallel_branches_are_merged_from_their_common_ancestor() -> None:
    blobs = Blobs()
    base = await _derive(blobs, None, "spec", {"app.py": b"v1\n", "old.md": b"x\n", "shared.txt": b"s\n"})
    left = await _derive(blobs, base, "implement-a", {"app.py": b"v2\n", "a.py": b"a\n", "shared.txt": b"t\n"})
    right = await _derive(blobs, base, "implement-b", {"b.py": b"b\n", "old.md": None, "shared.txt": b"t\n"})
    merged_ref = await resolve_workspace([left, right], blobs.fetch, blobs.store)
    assert merged_ref is not None and merged_ref.media_type == MANIFEST_MEDIA_TYPE
    merged = Manifest.decode(blobs.data[merged_ref.digest])
    assert merged.files == {p: sha256_hex(d) for p, d in
                            {"app.py": b"v2\n", "a.py": b"a\n", "b.py": b"b\n", "shared.txt": b"t\n"}.items()}
    assert merged.parent == left.digest  # lineage continues through the first branch


async def test_branches_that_change_one_file_differently_are_a_conflict_naming_it() -> None:
    blobs = Blobs()
    base = await _derive(blobs, None, "spec", {"app.py": b"v1\n"})
    left = await _derive(blobs, base, "implement-a", {"app.py": b"left\n"})
    right = await _derive(blobs, base, "implement-b", {"app.py": None})
    with pytest.raises(WorkspaceConflict, match=r"app\.py \(steps implement-a/workspace and implement-b/workspace\)"):
        await resolve_workspace([left, right], blobs.fetch, blobs.store)
    unrelated = await _derive(blobs, None, "other", {"app.py": b"mine\n"})
    with pytest.raises(WorkspaceConflict):  # no common ancestor: both added app.py, differently
        await resolve_workspace([base, unrelated], blobs.fetch, blobs.store)


async def test_a_failing_change_leaves_the_workspace_as_it_was() -> None:
    blobs = Blobs()
    ws = Workspace({}, blobs.fetch)
    ws.write("src/a.py", b"a = 1\n")
    before = ws.files
    with pytest.raises(PathRefused):
        ws.apply({"src/b.py": b"b = 2\n", "../escape.py": b"x"})
    with pytest.raises(ToolError, match="exceeds the file size limit"):
        ws.apply({"src/b.py": b"b = 2\n", "big.bin": b"\0" * (MAX_FILE_BYTES + 1)})
    with pytest.raises(PathRefused, match="both a file and a folder"):
        ws.apply({"src/b.py": b"b = 2\n", "src/a.py/inner": b"x"})
    with pytest.raises(ToolError, match="no such file to delete"):
        ws.apply({"src/b.py": b"b = 2\n", "missing.py": None})
    assert ws.files == before and ws.paths == ["src/a.py"]
    assert await ws.read("src/a.py") == b"a = 1\n"


@pytest.mark.parametrize("doc", [
    {"files": {"../x": "0" * 64}},
    {"files": {"/abs": "0" * 64}},
    {"files": {"a": "not-a-digest"}},
    {"files": {"a": "0" * 64}, "parent": "zz"},
    {"files": {"a": "0" * 64}, "version": 99},
    {"nofiles": {}},
])
def test_manifests_with_bad_paths_or_digests_are_refused(doc: dict[str, object]) -> None:
    with pytest.raises(ToolError):
        Manifest.decode(json.dumps(doc).encode())


async def test_diff_is_unified_for_text_and_one_line_for_binary() -> None:
    blobs = Blobs()
    old_files = {"app.py": b"a\nb\nc\n", "gone.txt": b"bye\n", "logo.png": b"\x89PNG\x00\x01"}
    new_files = {"app.py": b"a\nB\nc", "new.txt": b"hello\n", "logo.png": b"\x89PNG\x00\x02\x03"}
    old = Manifest({p: (await blobs.store(d, "", p)).digest for p, d in old_files.items()})
    new = Manifest({p: (await blobs.store(d, "", p)).digest for p, d in new_files.items()})
    diff = await diff_manifests(old, new, blobs.fetch)
    assert "--- a/app.py\n+++ b/app.py\n@@ -1,3 +1,3 @@\n a\n-b\n-c\n+B\n+c\n\\ No newline at end of file\n" in diff
    assert "--- a/gone.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n-bye\n" in diff
    assert "--- /dev/null\n+++ b/new.txt\n@@ -0,0 +1 @@\n+hello\n" in diff
    assert "Binary file logo.png changed (6 bytes → 7 bytes)\n" in diff
    assert "\x00" not in diff
    assert await diff_manifests(new, new, blobs.fetch) == ""
    short = await diff_manifests(old, new, blobs.fetch, max_chars=60)
    assert "[diff truncated at 60 characters; also changed:" in short and "new.txt" in short


async def test_render_names_binary_files_instead_of_dumping_them() -> None:
    ws = Workspace({}, Blobs().fetch)
    ws.write("img.bin", bytes(range(256)))
    ws.write("a.txt", b"x" * 50)
    text = await ws.render(max_file_chars=10)
    assert "--- img.bin\n(binary file, 256 bytes)" in text
    assert "--- a.txt\nxxxxxxxxxx\n…[40 more characters]" in text


@pytest.mark.parametrize("payload", [b"payload", b"p" * (INLINE_BYTES + 1)], ids=["inline", "in a thread"])
async def test_blob_cache_serves_by_digest_and_recovers_from_a_damaged_entry(tmp_path: Path, payload: bytes) -> None:
    blobs = Blobs()
    ref = await blobs.store(payload, "", "f")
    cache = BlobCache(tmp_path / "blobs", blobs.fetch)
    assert await cache(ref.digest) == payload
    again = BlobCache(tmp_path / "blobs", blobs.fetch)  # another task, or another node on the host
    assert await again(ref.digest) == payload
    assert blobs.fetches == 1 and again.hits == 1

    cache.path(ref.digest).write_bytes(b"tampered")
    assert await cache(ref.digest) == payload
    assert blobs.fetches == 2 and cache.path(ref.digest).read_bytes() == payload


async def test_blob_cache_evicts_least_recently_used_entries(tmp_path: Path) -> None:
    blobs = Blobs()
    refs = [await blobs.store(bytes([i]) * 400, "", str(i)) for i in range(4)]
    cache = BlobCache(tmp_path / "blobs", blobs.fetch, max_bytes=1000)
    for ref in refs:
        await cache(ref.digest)
    kept = [r for r in refs if cache.path(r.digest).exists()]
    assert sum(r.size for r in kept) <= 1000 and refs[-1] in kept


async def test_memory_cache_serves_recent_blobs_without_fetching_and_stays_within_its_bound() -> None:
    blobs = Blobs()
    refs = [await blobs.store(bytes([i]) * 100, "", str(i)) for i in range(9)]
    cache = MemoryCache(blobs.fetch, max_bytes=800)  # eight entries of 100 bytes (an eighth each, the most kept)
    assert await cache(refs[0].digest) == bytes([0]) * 100
    assert await cache(refs[0].digest) == bytes([0]) * 100
    assert blobs.fetches == 1
    big = await blobs.store(b"x" * 101, "", "big")  # over an eighth of the bound: passed through, not kept
    await cache(big.digest)
    await cache(big.digest)
    assert blobs.fetches == 3
    for ref in refs[1:8]:  # now full: eight entries
        await cache(ref.digest)
    await cache(refs[0].digest)  # used again, so refs[1] is the least recently used
    await cache(refs[8].digest)  # a ninth entry evicts it
    assert blobs.fetches == 3 + 8
    await cache(refs[0].digest)
    assert blobs.fetches == 3 + 8
    await cache(refs[1].digest)
    assert blobs.fetches == 3 + 8 + 1


_SLOW_WRITER = """
import sys
from pathlib import Path
from mesh.tools.paths import atomic_write

def chunks():
    for line in sys.stdin:  # the parent feeds one chunk, then kills us before the next
        yield line.encode() * 100_000
        print("chunk", flush=True)

atomic_write(Path(sys.argv[1]), chunks())
"""


async def test_a_write_killed_midway_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "app.py"
    target.write_bytes(b"old content\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SLOW_WRITER, str(target), cwd=ROOT,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"new content\n")
    await proc.stdin.drain()
    assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"chunk\n"  # midway: one chunk written
    temps = list(tmp_path.glob(f"{TEMP_PREFIX}*"))
    assert len(temps) == 1 and temps[0].stat().st_size > 0
    proc.send_signal(signal.SIGKILL)
    assert await proc.wait() == -signal.SIGKILL
    assert target.read_bytes() == b"old content\n"
