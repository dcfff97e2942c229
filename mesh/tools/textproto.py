"""Tools for models without native tool calling: edits written as text, parsed into tool calls.

A tier whose server ignores function calling (llama.cpp's server with a small model's chat format)
is told this protocol in the prompt; its answer is read for

- fenced file blocks — ```` ```<lang> path/to/file.py ```` (or the path on the line just before the
  fence: ``File: x.py``, ``**x.py**``, ``# x.py``, ``x.py:``) → ``fs.write``;
- unified diffs — a ```` ```diff ```` block, or one with ``--- a/`` / ``+++ b/`` headers → ``fs.patch``;
- commands — a ```` ```run ```` block, one command per line → ``shell.run``.

Each becomes an ordinary call through the role's guarded ``ToolBox`` (allow-list, canonical paths,
all-or-nothing patches), so a text edit can do nothing a native tool call could not. Small models
often leave the path out: a role that writes files gets unnamed code blocks under default names
(``main.py``; ``test_main.py`` for a block holding tests) instead of losing the code.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

# The last fence may be left open: an answer cut off at its output limit keeps what it wrote.
_FENCE = re.compile(r"^[ \t]*```[ \t]*([^\n`]*)\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)", re.DOTALL | re.MULTILINE)
_PATH = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_./-]*\.[A-Za-z0-9]{1,8}$")
_PATH_BEFORE = re.compile(r"(?:file(?:name)?\s*[:=]\s*|#+\s*|\*\*|`)?([A-Za-z0-9_.][A-Za-z0-9_./-]*\.[A-Za-z0-9]{1,8})"
                          r"(?:\*\*|`)?\s*:?\s*$", re.IGNORECASE)
_LANG_EXT = {"python": "py", "py": "py", "python3": "py", "javascript": "js", "js": "js", "typescript": "ts",
             "ts": "ts", "go": "go", "rust": "rs", "bash": "sh", "sh": "sh", "toml": "toml", "json": "json",
             "yaml": "yaml", "markdown": "md", "md": "md", "html": "html", "css": "css", "sql": "sql"}
_NOT_CODE = {"", "text", "txt", "plaintext", "console", "output", "shell-session"}


@dataclass(frozen=True, slots=True)
class TextCall:
    """One tool call read from an answer's text."""

    name: str
    arguments: dict[str, Any]


def protocol_prompt(allowed: frozenset[str] | set[str]) -> str:
    """The instructions for the tools of ``allowed`` that the text protocol covers ('' if none)."""
    parts = []
    if "fs.write" in allowed:
        parts.append("To write a file, put its whole content in a fenced block whose first line names the path:\n"
                     "```python src/app.py\n<the whole file>\n```")
    if "fs.patch" in allowed:
        parts.append("To change part of a file, give a unified diff in a ```diff block (--- a/path, +++ b/path, "
                     "@@ hunks).")
    if "shell.run" in allowed:
        parts.append("To run a command (for example the tests), put it in a ```run block, one per line:\n"
                     "```run\npython -m pytest -q\n```")
    if not parts:
        return ""
    return "## Tools (as text)\nThis model has no function calling; write tool use as text.\n" + "\n".join(parts)


def parse_calls(text: str, allowed: frozenset[str] | set[str]) -> list[TextCall]:
    """Every edit or command in ``text`` that ``allowed`` permits, in order of appearance."""
    calls: list[TextCall] = []
    unnamed: dict[str, int] = {}
    for match in _FENCE.finditer(text):
        info, body = match.group(1).strip(), match.group(2)
        words = info.split()
        lang = words[0].lower() if words else ""
        if lang == "run":
            if "shell.run" in allowed:
                calls += [TextCall("shell.run", {"argv": shlex.split(line)})
                          for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]
            continue
        if lang in ("diff", "patch") or body.lstrip().startswith(("--- a/", "--- /dev/null", "diff --git")):
            if "fs.patch" in allowed:
                calls.append(TextCall("fs.patch", {"patch": body}))
            continue
        if "fs.write" not in allowed:
            continue
        path = next((w for w in words if _PATH.match(w)), None) or _path_before(text, match.start())
        if path is None:
            if lang in _NOT_CODE or lang not in _LANG_EXT:
                continue
            path = _default_name(body, _LANG_EXT[lang], unnamed)
        calls.append(TextCall("fs.write", {"path": path, "content": body}))
    return calls


def _path_before(text: str, fence_at: int) -> str | None:
    """A path named on the last non-empty line before a fence."""
    lines = [ln for ln in text[:fence_at].splitlines() if ln.strip()]
    if not lines:
        return None
    m = _PATH_BEFORE.search(lines[-1].strip())
    return m.group(1) if m else None


def _default_name(body: str, ext: str, seen: dict[str, int]) -> str:
    stem = "test_main" if ext == "py" and re.search(r"^\s*def test_", body, re.MULTILINE) else "main"
    seen[stem] = n = seen.get(stem, 0) + 1
    return f"{stem}.{ext}" if n == 1 else f"{stem}_{n}.{ext}"
