"""What changed between two workspace manifests, as the text a reviewer reads: a unified diff for
text files (``--- a/…`` / ``+++ b/…``, ``/dev/null`` for added and deleted files — the form
``fs.patch`` applies), one line for a binary file."""

from __future__ import annotations

import difflib

from mesh.tools.manifest import Fetch, Manifest
from mesh.tools.paths import is_binary

MAX_DIFF_CHARS = 200_000
NO_NEWLINE = "\\ No newline at end of file\n"


def split_lines(text: str) -> list[str]:
    """Lines with their ``\\n`` kept; only ``\\n`` ends a line (``str.splitlines`` would also split
    on form feeds and Unicode separators, and the diff would no longer apply)."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    return lines + [parts[-1]] if parts[-1] else lines


def file_diff(path: str, old: bytes | None, new: bytes | None) -> str:
    """One file's change; ``None`` means the file does not exist on that side."""
    if any(side is not None and is_binary(side) for side in (old, new)):
        sizes = " → ".join("absent" if side is None else f"{len(side)} bytes" for side in (old, new))
        return f"Binary file {path} changed ({sizes})\n"
    old_lines = split_lines(old.decode()) if old else []
    new_lines = split_lines(new.decode()) if new else []
    lines = [f"--- {'a/' + path if old is not None else '/dev/null'}\n",
             f"+++ {'b/' + path if new is not None else '/dev/null'}\n"]
    for line in list(difflib.unified_diff(old_lines, new_lines, n=3))[2:]:  # our own headers, above
        lines.append(line if line.endswith("\n") else line + "\n" + NO_NEWLINE)
    return "".join(lines)


async def diff_manifests(old: Manifest | None, new: Manifest, fetch: Fetch, *,
                         max_chars: int = MAX_DIFF_CHARS) -> str:
    """The diff from ``old`` (``None``: an empty workspace) to ``new``; files in path order. Past
    ``max_chars`` the remaining files are only named, so a huge change cannot flood a prompt."""
    before = old.files if old is not None else {}
    changed = sorted(p for p in before.keys() | new.files.keys() if before.get(p) != new.files.get(p))
    parts: list[str] = []
    size = 0
    for i, path in enumerate(changed):
        a = await fetch(before[path]) if path in before else None
        b = await fetch(new.files[path]) if path in new.files else None
        part = file_diff(path, a, b)
        if size + len(part) > max_chars:
            parts.append(f"[diff truncated at {max_chars} characters; also changed: {', '.join(changed[i:])}]\n")
            break
        parts.append(part)
        size += len(part)
    return "".join(parts)
