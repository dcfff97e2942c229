"""Run a role's tool calls against a workspace.

Least privilege: a role calls only the tools its spec lists and starts only the programs its
``shell_allow`` names; anything else is refused (the caller records the refusal as a ``tool.call``
event). A call that fails returns a structured error to the model —
``{"ok": false, "error": "<ErrorType>", "message": "…"}`` — and leaves the workspace as it was.
The bus stays outside: blob fetches, the ledger and artifacts come in as callables.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pydantic import ValidationError

from mesh.contracts.models import fit_freeform
from mesh.errors import BlobNotFound, LedgerError, ToolError, ToolRefused
from mesh.tools.catalog import (
    TOOL_NAMES,
    TOOLS,
    ArtifactGet,
    FsList,
    FsPatch,
    FsRead,
    FsSearch,
    FsWrite,
    LedgerQuery,
    ShellRun,
)
from mesh.tools.manifest import Fetch
from mesh.tools.patch import apply_patch, parse_patch
from mesh.tools.paths import canonical_path, is_binary
from mesh.tools.sandbox import SandboxMode
from mesh.tools.shell import ShellPolicy, run_command
from mesh.tools.workspace import Workspace
from mesh.tools.worktree import WorkTree

MAX_READ_CHARS = 200_000
MAX_LIST_ENTRIES = 2_000
MAX_RESULT_CHARS = 100_000
MAX_LINE_CHARS = 300

# (sql, max_rows) -> the ledger's JSON answer ({"columns", "types", "rows", "truncated", ...}).
LedgerQueryFn = Callable[[str, int], Awaitable[dict[str, Any]]]


@dataclass(slots=True)
class ToolResult:
    tool: str
    ok: bool
    content: str
    refused: bool = False
    duration_ms: float = 0.0
    arguments: dict[str, Any] = field(default_factory=dict)
    sandbox: SandboxMode | None = None  # shell.run: the sandbox the command ran in


class ToolBox:
    def __init__(self, allowed: Iterable[str], workspace: Workspace, *, shell: ShellPolicy | None = None,
                 work_dir: Path | None = None, ledger: LedgerQueryFn | None = None,
                 artifacts: Fetch | None = None) -> None:
        self.allowed = frozenset(allowed)
        unknown = self.allowed - TOOL_NAMES
        if unknown:
            raise ToolError(f"unknown tool(s) {sorted(unknown)}; known tools: {sorted(TOOL_NAMES)}")
        self.workspace = workspace
        self.shell = shell or ShellPolicy()
        self._work_dir = work_dir  # where the per-task folder for shell.run is made (None: the system temp)
        self._ledger = ledger
        self._artifacts = artifacts
        self._tree: WorkTree | None = None
        self.last_exit_code: int | None = None  # of the last command shell.run ran (None: none ran)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Remove the per-task folder, if ``shell.run`` made one."""
        if self._tree is not None:
            await self._tree.close()
            self._tree = None

    def specs(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(name, description, JSON-schema parameters) of each allowed tool, for function calling."""
        return [(n, TOOLS[n].description, TOOLS[n].parameters) for n in sorted(self.allowed)]

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolResult:
        started = time.perf_counter()
        sandbox = self.shell.box().mode if name == "shell.run" and name in self.allowed else None
        try:
            if name not in self.allowed:
                raise ToolRefused(f"tool {name!r} is not allowed for this role; allowed: {sorted(self.allowed)}")
            try:
                args = TOOLS[name].args.model_validate(arguments)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}"
                                     for e in exc.errors(include_url=False))
                raise ToolError(f"invalid arguments for {name}: {problems}") from exc
            result = ToolResult(name, True, await _HANDLERS[name](self, args))
        except ToolError as exc:
            error = {"ok": False, "error": type(exc).__name__, "message": str(exc), "workspace_changed": False}
            result = ToolResult(name, False, json.dumps(error), refused=isinstance(exc, ToolRefused))
        result.sandbox = sandbox
        result.duration_ms = (time.perf_counter() - started) * 1000
        result.arguments = fit_freeform({k: _short(v) for k, v in arguments.items()})
        return result

    # --- the tools -----------------------------------------------------------------------------

    async def _fs_read(self, a: FsRead) -> str:
        path = canonical_path(a.path)
        data = await self.workspace.read(path)
        if is_binary(data):
            return (f"(binary file {path}: {len(data)} bytes, sha256 {self.workspace.digest_of(path)}; "
                    "fs.read shows text files only)")
        return _cut(data.decode(), MAX_READ_CHARS)

    async def _fs_write(self, a: FsWrite) -> str:
        data = a.content.encode()
        return f"wrote {len(data)} bytes to {self.workspace.write(a.path, data)}"

    async def _fs_list(self, a: FsList) -> str:
        folder = canonical_path(a.prefix) if a.prefix.strip("./") else ""
        paths = [p for p in self.workspace.paths if not folder or p == folder or p.startswith(folder + "/")]
        shown = "\n".join(paths[:MAX_LIST_ENTRIES])
        more = f"\n… and {len(paths) - MAX_LIST_ENTRIES} more" if len(paths) > MAX_LIST_ENTRIES else ""
        return (shown + more) or "(no files)"

    async def _fs_search(self, a: FsSearch) -> str:
        needle = a.query.casefold() if a.ignore_case else a.query
        hits: list[str] = []
        for path in self.workspace.paths:
            if a.path_glob and not fnmatch.fnmatchcase(path, a.path_glob):
                continue
            data = await self.workspace.read(path)
            if is_binary(data):
                continue
            for number, line in enumerate(data.decode().split("\n"), 1):
                if needle in (line.casefold() if a.ignore_case else line):
                    hits.append(f"{path}:{number}: {line[:MAX_LINE_CHARS]}")
                    if len(hits) >= a.max_results:
                        return "\n".join(hits) + f"\n(stopped at {a.max_results} matches)"
        return "\n".join(hits) or "(no matches)"

    async def _fs_patch(self, a: FsPatch) -> str:
        patches = parse_patch(a.patch)
        current: dict[str, str | None] = {}
        for path in {p for fp in patches for p in (fp.old_path, fp.new_path) if p}:
            if self.workspace.digest_of(path) is None:
                current[path] = None
                continue
            data = await self.workspace.read(path)
            if is_binary(data):
                raise ToolError(f"{path} is a binary file; fs.patch applies to text files only")
            current[path] = data.decode()
        changes = apply_patch(patches, current)
        before = self.workspace.files
        self.workspace.apply(changes)
        return "patched: " + ", ".join(
            f"{p} ({'deleted' if d is None else 'modified' if p in before else 'added'})" for p, d in changes.items())

    async def _shell_run(self, a: ShellRun) -> str:
        program = self.shell.resolve(a.argv)  # refused before anything is touched
        if self._tree is None:
            self._tree = WorkTree(self._work_dir)
        tree = self._tree
        await tree.sync(self.workspace)
        sandbox = self.shell.box()
        try:
            await asyncio.to_thread(sandbox.hand_over, tree.dirs, tree.root)
            result = await run_command(program, a.argv, dirs=tree.dirs, sandbox=sandbox, limits=self.shell.limits,
                                       network=self.shell.network, timeout=a.timeout_seconds or None)
        except BaseException:
            tree.discard()  # a killed or cancelled command's leftovers are not kept
            raise
        changed = await tree.absorb(self.workspace)
        self.last_exit_code = result.exit_code
        return json.dumps({**result.to_json(), "changed": changed})

    async def _ledger_query(self, a: LedgerQuery) -> str:
        if self._ledger is None:
            raise ToolError("ledger.query is not available on this node (no ledger service configured)")
        try:
            answer = await self._ledger(a.sql, a.max_rows)
        except LedgerError as exc:
            raise ToolError(f"{type(exc).__name__}: {exc}") from exc
        return _cut(json.dumps(answer, default=str), MAX_RESULT_CHARS)

    async def _artifact_get(self, a: ArtifactGet) -> str:
        if self._artifacts is None:
            raise ToolError("artifact.get is not available on this node")
        try:
            data = await self._artifacts(a.digest)
        except BlobNotFound as exc:
            raise ToolError(f"no artifact with digest {a.digest}") from exc
        if is_binary(data):
            return f"(binary artifact {a.digest}: {len(data)} bytes)"
        return _cut(data.decode(), MAX_READ_CHARS)


_HANDLERS: dict[str, Callable[[ToolBox, Any], Awaitable[str]]] = {
    "fs.read": ToolBox._fs_read, "fs.write": ToolBox._fs_write, "fs.list": ToolBox._fs_list,
    "fs.search": ToolBox._fs_search, "fs.patch": ToolBox._fs_patch, "shell.run": ToolBox._shell_run,
    "ledger.query": ToolBox._ledger_query, "artifact.get": ToolBox._artifact_get,
}
assert _HANDLERS.keys() == TOOL_NAMES, "every catalogued tool has a handler"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n…[truncated: {len(text) - limit} more characters]"


def _short(value: Any) -> Any:
    """An argument as recorded in the tool.call event: long strings cut, so events stay small."""
    return value if not isinstance(value, str) or len(value) <= 200 else value[:200] + "…"
