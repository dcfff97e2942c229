"""bench/cli: how long the `mesh` command takes, as a user types it — each one a fresh process.

1. `mesh --help`, `mesh goals`, `mesh submit "<goal>"` against a running nats-server (provisioned, a few
   goals submitted and five planned goals' states in KV, which `mesh goals` reads and validates): the
   median wall time of ``--runs`` runs each, against the 0.3 s target, and the median CPU time (user +
   system) of the process — what the wall time would be on an idle core;
2. `mesh run "<goal>" --json` on a fresh data folder (nats-server, sim-server and one process per role
   started by the command): seconds from the command's start to ``goal.submitted`` and ``goal.planned``
   on its output, and to its exit.

``--before DIR`` also times another checkout's `mesh` (e.g. a worktree of an older commit), each command's
runs interleaved with this checkout's, so both see the same load: before/after figures from one
command. The load average is reported with the figures: on a shared 2-core machine, start-up is mostly
waiting for a core.

Run: ``.venv/bin/python -m bench.cli`` (≈1 minute); ``--no-write`` leaves bench/RESULTS.md alone; ``--no-run``
times the three commands only (seconds, not a minute of `mesh run`s) and prints them without writing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.results import parse_args, write_section
from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.contracts import Goal, Plan, Step
from mesh.roles.goalstate import GoalState
from mesh.roles.goalstore import GoalStore
from tests.meshkit import provisioned_nats

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.3  # seconds, at load average < 1
COMMANDS = {"mesh --help": ["--help"], "mesh goals": ["goals"], "mesh submit": ["submit", "Build me a login system"]}


def _env(source: Path, **extra: str) -> dict[str, str]:
    # without PYTHONDONTWRITEBYTECODE: the warm-up run writes the bytecode that a user's next command reads
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_") and k != "PYTHONDONTWRITEBYTECODE"}
    return env | {"PYTHONPATH": str(source)} | extra


def _wall(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `mesh` process; run one at a time (children's rusage is summed).
    ``cwd``: a folder without a `mesh` package — `python -m` puts the working directory first on the path, so
    run from a checkout, every tree's command would be that checkout's."""
    cpu0, started = _children_cpu(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mesh", *argv], env=env, cwd=cwd, capture_output=True, timeout=120,
                          check=False)
    took, cpu = time.perf_counter() - started, _children_cpu() - cpu0
    if proc.returncode not in (0, 2):  # --help exits 0; a bare `mesh` 2
        raise RuntimeError(f"mesh {' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    return took, cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def command_times(runs: int, sources: list[Path]) -> dict[Path, dict[str, float]]:
    """Median wall seconds of each command in ``COMMANDS`` per source tree (and its CPU seconds, under
    ``"<command> cpu"``), against a fresh, provisioned nats-server."""
    with tempfile.TemporaryDirectory(prefix="mesh-bench-cli-") as tmp:
        async with provisioned_nats(Path(tmp) / "nats") as server:
            async with await Bus.connect(MeshSettings(nats_url=server.url), name="bench-cli") as bus:
                for i in range(3):
                    await bus.submit_goal(Goal(brief=f"an earlier goal {i}"))
                for i in range(5):
                    await GoalStore(bus).create(_planned(f"a planned goal {i}"))
            envs = {src: _env(src, MESH_NATS_URL=server.url, MESH_DATA_DIR=str(Path(tmp) / "mesh")) for src in sources}
            for env in envs.values():
                _wall(["--help"], env, Path(tmp))  # bytecode compiled, files in the page cache: a user's second command
            times: dict[Path, dict[str, list[float]]] = {
                src: {key: [] for name in COMMANDS for key in (name, f"{name} cpu")} for src in sources}
            for _ in range(runs):  # interleaved, so a burst of load hits every command and tree alike
                for name, argv in COMMANDS.items():
                    for src, env in envs.items():
                        wall, cpu = await asyncio.to_thread(_wall, argv, env, Path(tmp))
                        times[src][name].append(wall)
                        times[src][f"{name} cpu"].append(cpu)
    return {src: {name: statistics.median(v) for name, v in per.items()} for src, per in times.items()}


def _planned(brief: str) -> GoalState:
    """A goal's state with a five-step plan, as the planner leaves it."""
    state = GoalState(goal=Goal(brief=brief))
    steps = [Step(step_id="r", role="researcher", instruction="dig"),
             Step(step_id="c", role="coder", instruction="code", depends_on=["r"]),
             Step(step_id="v", role="reviewer", instruction="review", depends_on=["c"]),
             Step(step_id="t", role="tester", instruction="test", depends_on=["c"]),
             Step(step_id="s", role="synthesizer", instruction="sum up", depends_on=["v", "t"])]
    state.apply_plan(Plan(goal_id=state.goal.goal_id, steps=steps))
    return state


def run_times(source: Path = ROOT) -> dict[str, float]:
    """Seconds from `mesh run`'s start to goal.submitted, goal.planned and its exit (zero-latency sim)."""
    with tempfile.TemporaryDirectory(prefix="mesh-bench-run-") as tmp:
        env = _env(source, MESH_DATA_DIR=str(Path(tmp) / ".mesh"), MESH_OUT_DIR=str(Path(tmp) / "out"),
                   MESH_SIM_LATENCY_SCALE="0", MESH_DRAIN_SECONDS="5")
        seen: dict[str, float] = {}
        started = time.perf_counter()
        with subprocess.Popen([sys.executable, "-m", "mesh", "run", "Build me a login system", "--json"], env=env,
                              cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("{"):
                    kind = json.loads(line).get("type", "")
                    seen.setdefault(kind, time.perf_counter() - started)
            code = proc.wait(timeout=300)
        if code != 0 or "goal.planned" not in seen:
            raise RuntimeError(f"mesh run exited {code}; events seen: {sorted(seen)}")
        return {"submitted": seen.get("goal.submitted", float("nan")), "planned": seen["goal.planned"],
                "exit": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each command (the median is reported)")
    parser.add_argument("--before", type=Path, default=None, help="another checkout to time alongside, e.g. a "
                                                                   "worktree of an older commit")
    parser.add_argument("--no-run", action="store_true", help="time the three commands only, not `mesh run` (implies --no-write)")
    args = parse_args(parser, None)
    sources = [ROOT] + ([args.before] if args.before else [])
    load0 = os.getloadavg()[0]
    times = asyncio.run(command_times(args.runs, sources))
    # the older one first: the same cold caches
    runs = {} if args.no_run else {src: run_times(src) for src in reversed(sources)}
    load = os.getloadavg()[0]

    def cells(figures: dict[Path, dict[str, float]], key: str, digits: int, cpu: str = "") -> str:
        return " | ".join(f"{figures[src][key]:.{digits}f} s" + (f" ({figures[src][cpu]:.2f} s)" if cpu else "")
                          for src in sources)

    rows = [f"| `{name}` wall (CPU) | {cells(times, name, 2, f'{name} cpu')} | ≤ {TARGET} s |" for name in COMMANDS]
    rows += [f"| `mesh run` start → {what} | {cells(runs, key, 1)} | |"
             for key, what in (("submitted", "goal.submitted"), ("planned", "goal.planned"),
                               ("exit", "exit (goal completed, results written)")) if runs]
    head = "| command | this checkout |" + (" before |" if args.before else "") + " target |"
    table = "\n".join([head, "| --- |" + " ---: |" * len(sources) + " ---: |", *rows])
    print(table)
    print(f"load average {load0:.1f} → {load:.1f} on {os.cpu_count()} CPUs")
    if not (args.no_write or args.no_run):
        before = f" --before {args.before}" if args.before else ""
        write_section("cli", f"Command: `.venv/bin/python -m bench.cli --runs {args.runs}{before}` (median of "
                             f"{args.runs} runs per command, each a fresh process, the trees interleaved; load "
                             f"average {load0:.1f} at the start, {load:.1f} at the end, on {os.cpu_count()} shared "
                             f"CPUs).\n\n{table}")


if __name__ == "__main__":
    main()
