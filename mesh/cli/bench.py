"""`mesh bench`: run the benchmark suite (``bench/suite.py``) and print one table of ratios.

The suite lives in ``bench/`` of a source checkout (it is not part of the installed package: it
measures the mesh against nats-py, FastStream, scikit-learn and row-wise DuckDB, which a deployment
does not need); this command finds it next to the ``mesh`` package of an editable install or in the
current directory.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import mesh


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bench", help="run the benchmark suite and print one table of ratios (from a source checkout)",
        description="Bus vs raw nats-py and FastStream, task dispatch, ONNX router vs scikit-learn, ledger batched "
        "vs row-wise, 1 vs 4 replicas and per-step overhead, gateway vs bare SDK call: each benchmark's own code at "
        "a fraction of its full size. Writes the \"suite\" section of bench/RESULTS.md.",
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every sample size (default 1: a few minutes)")
    p.add_argument("--only", nargs="*", metavar="GROUP", help="bus, router, ledger, orchestration, backends, cli")
    p.add_argument("--replicas", type=int, default=4,
                   help="worker replicas compared with one in the orchestration group (default 4, the target's)")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    p.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    root = _checkout()
    if root is None:
        print("mesh bench: the benchmark suite (bench/) comes with a source checkout of mesh; run this command "
              "from its root", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    suite = importlib.import_module("bench.suite")
    argv = ["--scale", str(args.scale), "--replicas", str(args.replicas)] \
        + (["--only", *args.only] if args.only else []) + (["--no-write"] if args.no_write else [])
    return int(suite.main(argv))


def _checkout() -> Path | None:
    """The source tree holding ``bench/suite.py``: beside the mesh package, or the working directory."""
    for root in (Path(mesh.__file__).resolve().parent.parent, Path.cwd()):
        if (root / "bench" / "suite.py").is_file():
            return root
    return None
