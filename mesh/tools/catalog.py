"""The tools a role spec may list, with the JSON schema each offers for function calling."""

from __future__ import annotations

from typing import Any

_PATH = {"type": "string", "description": "Relative path inside the workspace, e.g. src/app.py"}

TOOL_SCHEMAS: dict[str, dict[str, Any]] = {
    "fs.read": {
        "description": "Read a text file of the workspace.",
        "parameters": {"type": "object", "properties": {"path": _PATH}, "required": ["path"],
                       "additionalProperties": False},
    },
    "fs.write": {
        "description": "Create or replace a file of the workspace (atomic).",
        "parameters": {"type": "object", "properties": {"path": _PATH, "content": {"type": "string"}},
                       "required": ["path", "content"], "additionalProperties": False},
    },
    "fs.list": {
        "description": "List the files of the workspace, optionally under a folder.",
        "parameters": {"type": "object", "properties": {"prefix": {"type": "string", "default": ""}},
                       "additionalProperties": False},
    },
}
TOOL_NAMES: frozenset[str] = frozenset(TOOL_SCHEMAS)
