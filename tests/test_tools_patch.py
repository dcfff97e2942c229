"""fs.patch: unified diffs applied all or nothing; a diff the mesh writes always applies back."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import ToolError
from mesh.tools.diff import file_diff
from mesh.tools.patch import apply_patch, parse_patch
from mesh.tools.toolbox import ToolBox
from mesh.tools.workspace import Workspace
from tests.test_workspace import Blobs

APP = "def handle(value):\n    return value\n\n\ndef other():\n    return 1\n"


def patched(patch: str, files: dict[str, str | None]) -> dict[str, bytes | None]:
    return apply_patch(parse_patch(patch), files)


def test_a_git_style_patch_applies_even_when_its_line_numbers_are_off() -> None:
    patch = ("diff --git a/app.py b/app.py\nindex 1..2 100644\n--- a/app.py\n+++ b/app.py\n"
             "@@ -40,2 +40,3 @@\n def other():\n-    return 1\n+    # two now\n+    return 2\n")
    assert patched(patch, {"app.py": APP}) == {"app.py": APP.replace("    return 1\n", "    # two now\n    return 2\n").encode()}


def test_create_delete_and_rename() -> None:
    create = "--- /dev/null\n+++ b/new.py\n@@ -0,0 +1,2 @@\n+x = 1\n+y = 2\n"
    assert patched(create, {"new.py": None}) == {"new.py": b"x = 1\ny = 2\n"}
    delete = "--- a/app.py\n+++ /dev/null\n@@ -1,6 +0,0 @@\n" + "".join("-" + line for line in APP.splitlines(True))
    assert patched(delete, {"app.py": APP}) == {"app.py": None}
    rename = "--- a/app.py\n+++ b/lib/app.py\n@@ -1,2 +1,2 @@\n-def handle(value):\n+def handle(value: str):\n     return value\n"
    out = patched(rename, {"app.py": APP, "lib/app.py": None})
    assert out["app.py"] is None and out["lib/app.py"] == APP.replace("(value)", "(value: str)").encode()


@pytest.mark.parametrize("patch, message", [
    ("--- a/app.py\n+++ b/app.py\n@@ -1,1 +1,1 @@\n-def nothing_like_it():\n+x\n", "hunk 1 .* does not apply"),
    ("--- a/app.py\n+++ b/app.py\n@@ -1,3 +1,3 @@\n def handle(value):\n", "malformed hunk"),
    ("--- a/app.py\n+++ b/app.py\n@@ -1,1 +1,1 @@\n?odd\n", "malformed hunk"),
    ("--- a/missing.py\n+++ b/missing.py\n@@ -1 +1 @@\n-a\n+b\n", "no such file"),
    ("--- /dev/null\n+++ b/app.py\n@@ -0,0 +1 @@\n+x\n", "already exists"),
    ("--- a/../etc/passwd\n+++ b/../etc/passwd\n@@ -1 +1 @@\n-a\n+b\n", "escapes the workspace"),
    ("just prose, no diff", "no file sections"),
    ("Binary files a/x.png and b/x.png differ\n", "text diffs only"),
])
def test_bad_patches_are_errors(patch: str, message: str) -> None:
    with pytest.raises(ToolError, match=message):
        patched(patch, {"app.py": APP, "missing.py": None})


async def test_a_patch_with_one_bad_hunk_changes_nothing() -> None:
    ws = Workspace({}, Blobs().fetch)
    ws.write("app.py", APP.encode())
    ws.write("other.py", b"keep = True\n")
    before = ws.files
    patch = ("--- a/other.py\n+++ b/other.py\n@@ -1 +1 @@\n-keep = True\n+keep = False\n"  # this one would apply
             "--- a/app.py\n+++ b/app.py\n@@ -1,2 +1,2 @@\n def handle(value):\n-    return value.upper()\n+    return 0\n")
    async with ToolBox(["fs.patch"], ws) as tools:
        result = await tools.call("fs.patch", {"patch": patch})
    assert not result.ok and json.loads(result.content)["error"] == "ToolError"
    assert "hunk 1" in json.loads(result.content)["message"]
    assert ws.files == before


async def test_a_patch_through_the_toolbox_changes_the_workspace() -> None:
    ws = Workspace({}, Blobs().fetch)
    ws.write("app.py", APP.encode())
    async with ToolBox(["fs.patch", "fs.read"], ws) as tools:
        result = await tools.call("fs.patch", {"patch": file_diff("app.py", APP.encode(), b"print(1)\n")})
        assert result.ok and result.content == "patched: app.py (modified)"
        assert (await tools.call("fs.read", {"path": "app.py"})).content == "print(1)\n"


_lines = st.lists(st.sampled_from(["a\n", "b\n", "c\n", "\n", "  x = 1\n", "tail"]), max_size=12)


@settings(max_examples=200, deadline=None)
@given(old=_lines, new=_lines)
def test_the_diff_the_mesh_writes_applies_back(old: list[str], new: list[str]) -> None:
    before, after = "".join(old), "".join(new)
    if before == after:
        return
    diff = file_diff("f.txt", before.encode(), after.encode())
    assert patched(diff, {"f.txt": before}) == {"f.txt": after.encode()}
