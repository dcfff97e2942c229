"""The tools a role spec may list. Each tool's arguments are a pydantic model: it validates what a
model sent, and its JSON schema is what function calling offers — one source for both."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_PATH = "Relative path inside the workspace, e.g. src/app.py"


class ToolArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FsRead(ToolArgs):
    path: str = Field(description=_PATH)


class FsWrite(ToolArgs):
    path: str = Field(description=_PATH)
    content: str = Field(description="The whole new content of the file (UTF-8 text).")


class FsList(ToolArgs):
    prefix: str = Field(default="", description="Only files under this folder, e.g. src; empty for all.")


class FsSearch(ToolArgs):
    query: str = Field(min_length=1, max_length=500, description="Text to find (a plain string, not a regex).")
    path_glob: str = Field(default="", description="Only files whose path matches this glob, e.g. src/*.py.")
    ignore_case: bool = False
    max_results: int = Field(default=50, ge=1, le=500)


class FsPatch(ToolArgs):
    patch: str = Field(min_length=1, description=(
        "A unified diff ('--- a/path', '+++ b/path', '@@ -l,n +l,n @@' hunks; /dev/null to create or "
        "delete a file). All hunks apply or nothing changes."))


class ShellRun(ToolArgs):
    argv: list[str] = Field(min_length=1, max_length=256, description=(
        "The command as a list, e.g. [\"python\", \"-m\", \"pytest\", \"-q\"]; argv[0] must be on the "
        "role's allowlist. Runs in the workspace folder, no shell."))
    timeout_seconds: float = Field(default=0, ge=0, description="0 = the role's limit; larger values are capped.")


class LedgerQuery(ToolArgs):
    sql: str = Field(min_length=1, max_length=20_000, description="One read-only SELECT over the ledger tables.")
    max_rows: int = Field(default=100, ge=1, le=1000)


class ArtifactGet(ToolArgs):
    digest: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the artifact (lowercase hex).")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    args: type[ToolArgs]

    @cached_property
    def parameters(self) -> dict[str, Any]:
        return _untitled(self.args.model_json_schema())


def _untitled(schema: Any) -> Any:
    """The schema without pydantic's generated ``title`` keys: noise in every prompt."""
    if isinstance(schema, dict):
        return {k: _untitled(v) for k, v in schema.items() if not (k == "title" and isinstance(v, str))}
    if isinstance(schema, list):
        return [_untitled(v) for v in schema]
    return schema


TOOLS: dict[str, Tool] = {t.name: t for t in (
    Tool("fs.read", "Read a text file of the workspace.", FsRead),
    Tool("fs.write", "Create or replace a file of the workspace (atomic: all of it or nothing).", FsWrite),
    Tool("fs.list", "List the files of the workspace, optionally under a folder.", FsList),
    Tool("fs.search", "Find lines containing a string in the workspace's text files (path:line: text).", FsSearch),
    Tool("fs.patch", "Apply a unified diff to workspace files; a hunk that does not apply changes nothing.",
         FsPatch),
    Tool("shell.run", "Run an allowed command in the workspace folder (e.g. the tests); files it writes "
         "there become part of the workspace. Returns exit code, stdout and stderr.", ShellRun),
    Tool("ledger.query", "Read-only SQL over the mesh's ledger (goals, steps, artifacts, tool calls, usage).",
         LedgerQuery),
    Tool("artifact.get", "Fetch an artifact's content by its sha256 digest.", ArtifactGet),
)}
TOOL_NAMES: frozenset[str] = frozenset(TOOLS)
