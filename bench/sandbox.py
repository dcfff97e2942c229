"""bench/sandbox: what the sandbox costs per ``shell.run`` — p50/p90 of one command through the tester's
toolbox (allowlist, folder sync and read-back, shim, limits, sweep) in each sandbox mode, the node running
as root and as an unprivileged user (uid 65534 through setpriv, as tests/test_sandbox.py runs it).

    (1) ``python -c pass``: the fixed cost (an interpreter start inside the sandbox)
    (2) ``python -m pytest -q`` on a one-test workspace: what the tester's real command costs

``bwrap`` is isolation (namespaces); ``fallback`` is the no-namespace path (the same shim, limits and
sweep, plus a seccomp filter), so their difference is the price of the namespaces. bwrap alone
(``bwrap <the mesh's options> -- /bin/true`` against ``/bin/true``, with and without the network
namespace) is measured beside it.

    .venv/bin/python -m bench.sandbox [--runs 40]     # writes the "sandbox" section of bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.results import write_section
from mesh.tools.sandbox import bwrap_argv, select
from mesh.tools.shell import ShellLimits, ShellPolicy
from mesh.tools.toolbox import ToolBox
from mesh.tools.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"python -c pass": ["python", "-c", "pass"], "python -m pytest -q (1 test)": ["python", "-m", "pytest", "-q"]}


async def _measure(mode: str, runs: int) -> dict[str, list[float]]:
    async def nothing(digest: str) -> bytes:
        raise KeyError(digest)

    ws = Workspace({}, nothing)
    ws.write("test_one.py", b"def test_one():\n    assert 1 + 1 == 2\n")
    policy = ShellPolicy(frozenset({"python"}), ShellLimits(timeout_seconds=60), sandbox=select(mode))  # type: ignore[arg-type]
    times: dict[str, list[float]] = {}
    async with ToolBox(["shell.run"], ws, shell=policy) as box:
        for name, argv in COMMANDS.items():
            samples = times.setdefault(name, [])
            for i in range(runs + 2):
                started = time.perf_counter()
                result = await box.call("shell.run", {"argv": argv})
                elapsed = (time.perf_counter() - started) * 1000
                doc = json.loads(result.content)
                if not result.ok or doc["exit_code"] != 0:
                    raise SystemExit(f"{mode}: {name} failed: {result.content[:500]}")
                if i >= 2:  # the first runs warm the page cache
                    samples.append(elapsed)
    return times


def _inner(mode: str, runs: int) -> None:
    print(json.dumps({"mode": mode, "uid": os.getuid(), "times": asyncio.run(_measure(mode, runs))}))


def _bare(runs: int) -> list[str]:
    """p50 of starting /bin/true directly and through bwrap (as this process's user)."""
    bwrap = select("auto").bwrap
    if bwrap is None:
        return []
    full = bwrap_argv(bwrap, network=False, binds=[])
    variants = {"`/bin/true`": ["/bin/true"], "`bwrap … -- /bin/true`": [*full, "--", "/bin/true"],
                "`bwrap … -- /bin/true`, network shared": [a for a in full if a != "--unshare-net"] + ["--", "/bin/true"]}
    rows = []
    for name, argv in variants.items():
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run(argv, env={}, check=True)
            samples.append((time.perf_counter() - started) * 1000)
        rows.append(f"| {name} | {statistics.median(samples):.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--inner", choices=["bwrap", "fallback"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        _inner(args.inner, args.runs)
        return
    sys.path.insert(0, str(ROOT))
    from tests.sandboxkit import USERS, as_user, skip_reason

    load = os.getloadavg()[0]
    rows, notes = [], []
    for user in USERS:
        if reason := skip_reason(user):
            notes.append(f"node as {user}: not measured ({reason})")
            continue
        for mode in ("bwrap", "fallback"):
            argv = as_user(user, [sys.executable, "-m", "bench.sandbox", "--inner", mode, "--runs", str(args.runs)])
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), "HOME": "/tmp"}
            out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False)
            if out.returncode != 0:
                notes.append(f"node as {user}, {mode}: failed: {out.stderr.strip()[-300:]}")
                continue
            doc = json.loads(out.stdout)
            for name, samples in doc["times"].items():
                q = statistics.quantiles(samples, n=10)
                rows.append(f"| {name} | {user} | {mode} | {statistics.median(samples):.1f} | {q[8]:.1f} |")
                print(rows[-1], flush=True)
    body = (f"`.venv/bin/python -m bench.sandbox --runs {args.runs}` — one `shell.run` through the tester's toolbox "
            f"(sync, shim, limits, sweep, read-back), {args.runs} runs each after 2 warm-up runs; 2 cores shared "
            f"with other work, 1-minute load average {load:.1f} before and {os.getloadavg()[0]:.1f} after.\n\n"
            "| command | node runs as | sandbox | p50 ms | p90 ms |\n| --- | --- | --- | --- | --- |\n"
            + "\n".join(rows) + "".join(f"\n\n{n}" for n in notes)
            + "\n\nbwrap alone (this process's user):\n\n| command | p50 ms |\n| --- | --- |\n" + "\n".join(_bare(args.runs)))
    write_section("sandbox", body)
    print(body)


if __name__ == "__main__":
    main()
