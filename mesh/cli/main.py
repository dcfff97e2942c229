"""The `mesh` command line: one argparse tree; each command group lives in its own module with
``register(subparsers)`` and handlers that return an exit code. Nothing imports this module."""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import os
import sys
from collections.abc import Sequence

# Command groups, each a module in this package with `register(subparsers)`.
COMMAND_MODULES: tuple[str, ...] = ("mesh.cli.local", "mesh.cli.schemas", "mesh.cli.sim", "mesh.cli.security",
                                     "mesh.cli.ledger", "mesh.cli.router", "mesh.cli.bench", "mesh.cli.tools",
                                     "mesh.cli.gateway", "mesh.cli.approvals", "mesh.cli.provision")

# At the exit, after the other atexit handlers, what is still alive lives until the end: frozen, it is not
# traversed by the interpreter's collections while it shuts down (~40 ms of CPU after `mesh goals`).
atexit.register(gc.freeze)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh", description="Mesh: an edge message-bus agent mesh.")
    parser.add_argument("--version", action="version", version=f"mesh {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _version() -> str:
    from mesh import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        raise SystemExit(2)
    from mesh.errors import MeshError
    from mesh.tools.sandbox import make_undumpable

    make_undumpable()  # a tool run sharing this uid cannot read this process's environment (docs/TOOLS.md)
    try:
        code = handler(args)
        sys.stdout.flush()  # output still buffered meets a closed pipe here, not at interpreter exit
    except BrokenPipeError:
        # `mesh status | head`: the reader went away. Stop quietly like any filter (128 + SIGPIPE), and
        # point stdout at /dev/null so that the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    except MeshError as exc:
        print(f"mesh: error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code or 0)
