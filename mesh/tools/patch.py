"""``fs.patch``: apply a unified diff to workspace files, all or nothing.

Accepted: the ``--- a/path`` / ``+++ b/path`` form that ``git diff`` and ``mesh.tools.diff`` write
(``a/``/``b/`` prefixes optional, ``/dev/null`` for a created or deleted file, ``diff``/``index``
lines ignored, ``\\ No newline at end of file`` honoured). A hunk's context and removed lines must
match the file exactly; only its position may differ from the line number in its header (the
nearest match wins), which forgives the miscounted line numbers models often write but never
applies a hunk to text it was not written for. Any hunk that does not apply fails the whole patch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mesh.errors import ToolError
from mesh.tools.diff import split_lines
from mesh.tools.paths import canonical_path

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
MAX_SHOWN_LINES = 8


@dataclass(slots=True)
class Hunk:
    old_start: int
    old: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)

    @property
    def anchor(self) -> int:
        """0-based line where ``old`` should start: a pure insertion (``-k,0``) goes after line k."""
        return self.old_start - 1 if self.old else self.old_start


@dataclass(slots=True)
class FilePatch:
    old_path: str | None  # None: the file is created
    new_path: str | None  # None: the file is deleted
    hunks: list[Hunk] = field(default_factory=list)


def parse_patch(text: str) -> list[FilePatch]:
    lines = split_lines(text)
    patches: list[FilePatch] = []
    i = 0
    while i < len(lines):
        if lines[i].startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            old, new = _paths(lines[i][4:], lines[i + 1][4:])
            patch = FilePatch(old, new)
            i += 2
            while i < len(lines) and (m := _HUNK.match(lines[i])):
                hunk, i = _read_hunk(lines, i + 1, m)
                patch.hunks.append(hunk)
            patches.append(patch)
        elif lines[i].startswith(("Binary files ", "GIT binary patch", "Binary file ")):
            raise ToolError("fs.patch applies text diffs only; write binary files with fs.write")
        else:
            i += 1  # "diff --git", "index …" and prose around the diff
    if not patches:
        raise ToolError("no file sections found: a patch needs '--- a/<path>' and '+++ b/<path>' lines")
    return patches


def _paths(old_header: str, new_header: str) -> tuple[str | None, str | None]:
    old, new = (h.rstrip("\n").split("\t")[0].strip() for h in (old_header, new_header))
    old_p = None if old == "/dev/null" else old
    new_p = None if new == "/dev/null" else new
    if old_p is None and new_p is None:
        raise ToolError("a file section has /dev/null on both sides")
    # git's a/ and b/ prefixes: strip them only when the section uses them consistently
    if (old_p is None or old_p.startswith("a/")) and (new_p is None or new_p.startswith("b/")):
        old_p, new_p = (p[2:] if p else p for p in (old_p, new_p))
    return (canonical_path(old_p) if old_p else None), (canonical_path(new_p) if new_p else None)


def _read_hunk(lines: list[str], i: int, m: re.Match[str]) -> tuple[Hunk, int]:
    hunk = Hunk(old_start=int(m[1]))
    old_count = int(m[2]) if m[2] is not None else 1
    new_count = int(m[4]) if m[4] is not None else 1
    last = ""

    def malformed(why: str) -> ToolError:
        return ToolError(f"malformed hunk '{m[0]}': {why} (expected {old_count} old and {new_count} new lines)")

    while len(hunk.old) < old_count or len(hunk.new) < new_count or (i < len(lines) and lines[i][:1] == "\\"):
        if i >= len(lines):
            raise malformed("the patch ends inside it")
        line = lines[i]
        tag, body = (" ", "\n") if line in ("\n", "") else (line[:1], line[1:])  # blank context, space lost
        if tag == "\\":  # "\ No newline at end of file": the previous line has no newline
            for side in ((hunk.old, hunk.new) if last == " " else (hunk.old,) if last == "-" else (hunk.new,)):
                if side and side[-1].endswith("\n"):
                    side[-1] = side[-1][:-1]
        elif tag in (" ", "-", "+"):
            if tag in " -":
                hunk.old.append(body)
            if tag in " +":
                hunk.new.append(body)
            last = tag
        else:
            raise malformed(f"line {line.rstrip()!r} starts with neither ' ', '-', '+' nor '\\'")
        if len(hunk.old) > old_count or len(hunk.new) > new_count:
            raise malformed("it has more lines than its header says")
        i += 1
    return hunk, i


def apply_patch(patches: list[FilePatch], current: dict[str, str | None]) -> dict[str, bytes | None]:
    """The new content of every file the patches touch (``None``: deleted), given the current text
    of each (``None``: absent). Raises ``ToolError`` naming the first file and hunk that fail."""
    state = dict(current)
    touched: set[str] = set()
    for patch in patches:
        target = patch.new_path or patch.old_path
        assert target is not None
        if patch.old_path is None:
            if state.get(target) is not None:
                raise ToolError(f"{target}: the patch creates it, but it already exists")
            before: list[str] = []
        else:
            text = state.get(patch.old_path)
            if text is None:
                raise ToolError(f"{patch.old_path}: no such file to patch")
            before = split_lines(text)
        after = "".join(_apply_hunks(target, before, patch.hunks))
        if patch.new_path is None:
            if after:
                raise ToolError(f"{target}: the patch deletes it, but its lines do not match the whole file")
            state[target] = None
        else:
            if patch.old_path not in (None, patch.new_path):  # a rename
                state[patch.old_path] = None
                touched.add(patch.old_path)
            state[patch.new_path] = after
        touched.add(target)
    return {p: _encoded(state[p]) for p in sorted(touched)}


def _encoded(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def _apply_hunks(path: str, lines: list[str], hunks: list[Hunk]) -> list[str]:
    out: list[str] = []
    pos = 0
    for n, hunk in enumerate(hunks, 1):
        at = _find(lines, hunk.old, hunk.anchor, lo=pos)
        if at is None:
            shown = "".join(hunk.old[:MAX_SHOWN_LINES]) + ("…\n" if len(hunk.old) > MAX_SHOWN_LINES else "")
            raise ToolError(f"{path}: hunk {n} (@@ -{hunk.old_start},{len(hunk.old)} @@) does not apply: these "
                            f"lines are not in the file (after line {pos}):\n{shown}Read the file again and "
                            "resend the whole patch; nothing was changed.")
        out += lines[pos:at] + hunk.new
        pos = at + len(hunk.old)
    return out + lines[pos:]


def _find(lines: list[str], block: list[str], anchor: int, *, lo: int) -> int | None:
    """The start of ``block`` in ``lines[lo:]`` nearest to ``anchor``, or None."""
    hi = len(lines) - len(block)
    if hi < lo:
        return None
    anchor = min(max(anchor, lo), hi)
    if not block:
        return anchor
    for distance in range(max(anchor - lo, hi - anchor) + 1):
        for at in (anchor - distance, anchor + distance):
            if lo <= at <= hi and lines[at:at + len(block)] == block:
                return at
    return None
