"""`mesh tools run <role> --workspace DIR -- ARGV…`: one command exactly as that role's ``shell.run``
runs it (allowlist, sandbox, limits, environment) — to check a policy, or to attack one."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.errors import BlobNotFound, ConfigError, NodeSpecError

if TYPE_CHECKING:  # the worker's imports (model SDKs, the router) load only when a command runs
    from mesh.tools.shell import ShellPolicy
    from mesh.tools.toolbox import ToolResult
    from mesh.tools.workspace import Workspace


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    tools = sub.add_parser("tools", help="tool policies: run one command as a role's shell.run would")
    tsub = tools.add_subparsers(dest="tools_command", metavar="COMMAND", required=True)
    p = tsub.add_parser("run", help="run ARGV as <role>'s shell.run would, in its sandbox; print the result",
                        usage="mesh tools run ROLE --workspace DIR [--timeout S] [--json] -- ARGV...",
                        description="The workspace folder is copied in (regular files only) and left unchanged; "
                                    "the result says what the command changed. Exit status: the command's, "
                                    "1 if shell.run refused or failed.")
    p.add_argument("role")
    # argparse drops a "--" inside subcommands: the options and the command are split here instead.
    p.add_argument("rest", nargs=argparse.REMAINDER, help="--workspace DIR [--timeout S] [--json] -- ARGV...")
    p.set_defaults(handler=_run)


def _options(rest: list[str]) -> tuple[argparse.Namespace, list[str]]:
    cut = rest.index("--") if "--" in rest else len(rest)
    p = argparse.ArgumentParser(prog="mesh tools run ROLE")
    p.add_argument("--workspace", type=Path, required=True, help="folder whose files are the workspace")
    p.add_argument("--timeout", type=float, default=0, help="seconds (0: the node's MESH_SHELL_TIMEOUT)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    return p.parse_args(rest[:cut]), rest[cut + 1:]


def _run(parsed: argparse.Namespace) -> int:
    from mesh.config import get_settings
    from mesh.roles.spec import default_nodes_dir, load_specs
    from mesh.roles.worker import shell_policy
    from mesh.tools import sandbox

    args, argv = _options(parsed.rest)
    if not argv:
        raise ConfigError("give the command after --, e.g. mesh tools run tester --workspace . -- python -m pytest")
    settings = get_settings()
    specs = load_specs(default_nodes_dir())
    spec = specs.get(parsed.role)
    if spec is None:
        raise NodeSpecError(f"unknown role {parsed.role!r}; roles: {', '.join(sorted(specs))}")
    if "shell.run" not in spec.tools:
        raise NodeSpecError(f"role {parsed.role!r} may not call shell.run (its tools: {', '.join(spec.tools) or 'none'})")
    sandbox.harden_process()  # as a node is: what a run leaves behind is swept, this process unreadable
    policy = shell_policy(spec, settings)
    workspace = _load(args.workspace)
    result = asyncio.run(_call(spec.tools, workspace, policy, argv, args.timeout))
    box = policy.box().describe()
    doc: dict[str, Any] = json.loads(result.content)
    if args.json:
        print(json.dumps({"role": parsed.role, "sandbox": box, "ok": result.ok, "result": doc}, indent=2))
    else:
        print(f"sandbox: {box['mode']}" + (f"\nwarning: {box['warning']}" if "warning" in box else ""))
        if result.ok:
            print(f"exit code: {doc['exit_code']}" + (f" ({doc['signal']})" if doc.get("signal") else ""))
            print(f"changed: {json.dumps(doc['changed'])}")
            print(f"--- stdout\n{doc['stdout']}--- stderr\n{doc['stderr']}", end="")
        else:
            print(f"{doc['error']}: {doc['message']}")
    return (doc["exit_code"] if 0 <= doc["exit_code"] < 256 else 1) if result.ok else 1


async def _call(tools: list[str], workspace: Workspace, policy: ShellPolicy, argv: list[str],
                timeout: float) -> ToolResult:
    from mesh.tools.toolbox import ToolBox

    async with ToolBox(tools, workspace, shell=policy) as box:
        return await box.call("shell.run", {"argv": argv, "timeout_seconds": timeout})


def _load(folder: Path) -> Workspace:
    """The folder's regular files as an in-memory workspace; links and special files are refused."""
    from mesh.tools.paths import canonical_path
    from mesh.tools.workspace import Workspace

    if not folder.is_dir():
        raise ConfigError(f"--workspace {folder} is not a folder")

    async def nothing_stored(digest: str) -> bytes:
        raise BlobNotFound(digest)

    workspace = Workspace({}, nothing_stored)
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            mode = os.lstat(full).st_mode
            rel = canonical_path(os.path.relpath(full, folder))
            if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ConfigError(f"--workspace: {rel} is a link or special file; a workspace holds regular files only")
            if stat.S_ISREG(mode):
                workspace.write(rel, Path(full).read_bytes())
    return workspace
