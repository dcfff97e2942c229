"""Run a role's tool calls against a workspace. A role can call only the tools its spec lists; any
other call is refused (and the caller records the refusal). A failing call returns a structured error
to the model and leaves the workspace as it was."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import ToolError, ToolRefused
from mesh.tools.catalog import TOOL_SCHEMAS
from mesh.tools.workspace import Workspace

MAX_READ_CHARS = 200_000


@dataclass(slots=True)
class ToolResult:
    tool: str
    ok: bool
    content: str
    refused: bool = False
    duration_ms: float = 0.0
    arguments: dict[str, Any] = field(default_factory=dict)


class ToolBox:
    def __init__(self, allowed: list[str], workspace: Workspace) -> None:
        self.allowed = frozenset(allowed)
        self.workspace = workspace

    def specs(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(name, description, parameters) of each allowed tool, for function calling."""
        return [(n, TOOL_SCHEMAS[n]["description"], TOOL_SCHEMAS[n]["parameters"]) for n in sorted(self.allowed)]

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolResult:
        started = time.perf_counter()
        try:
            if name not in self.allowed:
                raise ToolRefused(f"tool {name!r} is not allowed for this role; allowed: {sorted(self.allowed)}")
            content = await self._run(name, arguments)
            result = ToolResult(name, True, content)
        except ToolRefused as exc:
            result = ToolResult(name, False, f"error: {exc}", refused=True)
        except ToolError as exc:
            result = ToolResult(name, False, f"error: {exc}")
        result.duration_ms = (time.perf_counter() - started) * 1000
        result.arguments = {k: (v if not isinstance(v, str) or len(v) <= 200 else v[:200] + "…")
                            for k, v in arguments.items()}
        return result

    async def _run(self, name: str, args: dict[str, Any]) -> str:
        ws = self.workspace
        if name == "fs.write":
            content = args.get("content")
            if not isinstance(content, str):
                raise ToolError("fs.write needs a string 'content'")
            path = ws.write(str(args.get("path", "")), content.encode())
            return f"wrote {len(content.encode())} bytes to {path}"
        if name == "fs.read":
            data = await ws.read(str(args.get("path", "")))
            text = data.decode("utf-8", errors="replace")
            return text if len(text) <= MAX_READ_CHARS else text[:MAX_READ_CHARS] + "\n…[truncated]"
        if name == "fs.list":
            prefix = str(args.get("prefix", "") or "")
            return "\n".join(p for p in ws.paths if p.startswith(prefix)) or "(empty)"
        raise ToolRefused(f"unknown tool {name!r}")
