"""`mesh schemas export|check`: the language-neutral contracts in schemas/."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("schemas", help="export or check the JSON Schemas and AsyncAPI document")
    actions = p.add_subparsers(dest="action", required=True)
    for name, fn, doc in (("export", _export, "write schemas/"), ("check", _check, "fail if schemas/ is stale")):
        a = actions.add_parser(name, help=doc)
        a.add_argument("--dir", type=Path, default=Path("schemas"))
        a.set_defaults(handler=fn)


def _export(args: argparse.Namespace) -> int:
    from mesh.spec import export

    for path in export(args.dir):
        print(path)
    return 0


def _check(args: argparse.Namespace) -> int:
    from mesh.spec import render

    stale = [n for n, text in render().items() if not (args.dir / n).exists() or (args.dir / n).read_text() != text]
    for name in stale:
        print(f"stale: {args.dir / name}")
    if stale:
        print("run `mesh schemas export` and commit the result")
    return 1 if stale else 0
