"""bench/real: a few goals with EVERY tier on a real model — SmolLM2-135M-Instruct on llama-cpp-python
(the edge extra) — run as a user runs them (`mesh run --all-tiers local`, one process per role), and the
ledger of those runs exported to Parquet under ``bench/traces/real/``.

Reported per run and in total: goals attempted / completed, steps per goal, the share of plans the model
made vs the fallback built from the role specs, files written, the test pass rate (the tester's real test
run), wall time per step, calls and tokens. Deterministic: temperature 0, seed 42; swarm fan-out off, at
most one revision, a wall budget per goal.

With one real model on every tier this cannot evaluate routing between tiers (every tier is the same
model): it measures what the mesh gets through on a weak model, and the edge tier's real success for
the sim's calibration.

    .venv/bin/python -m bench.real                 # writes the "real" section of bench/RESULTS.md
    .venv/bin/python -m bench.real --goals 1 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.results import write_section
from mesh.contracts import TIERS

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "bench" / "traces" / "real"
GOALS = [
    "Write a Python function that checks whether a string is a palindrome, with pytest tests",
    "Write a Python function that returns the n-th Fibonacci number, with pytest tests",
    "Write a Python function that counts the vowels in a string, with pytest tests",
]
WALL_SECONDS = 1200


def run_goal(goal: str, data_dir: Path, out_dir: Path) -> tuple[list[dict[str, Any]], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(MESH_DATA_DIR=str(data_dir), MESH_OUT_DIR=str(out_dir), MESH_DRAIN_SECONDS="5",
               MESH_ROUTER_MODEL=str(data_dir / "no-router.onnx"), PYTHONPATH=str(ROOT))
    for tier in TIERS:
        env[f"MESH_TIER_{tier.upper()}_TEMPERATURE"] = "0"
        env[f"MESH_TIER_{tier.upper()}_SEED"] = "42"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mesh", "run", goal, "--all-tiers", "local", "--json", "--max-wall", str(WALL_SECONDS),
         "-o", "swarm=false", "-o", "max_revisions=1"],
        env=env, capture_output=True, text=True, timeout=WALL_SECONDS + 300, check=False)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not events:
        raise SystemExit(f"mesh run printed no events:\n{proc.stderr[-3000:]}")
    return events, time.monotonic() - started


def summarise(goal: str, events: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    last = events[-1]
    planned = [e for e in events if e["type"] == "goal.planned"]
    completed = [e for e in events if e["type"] == "step.completed"]
    failed = [e for e in events if e["type"] == "step.failed"]
    calls = [e for e in events if e["type"] == "backend.call"]
    tools = [e for e in events if e["type"] == "tool.call"]
    writes = {e["arguments"].get("path") for e in tools if e["tool"] == "fs.write" and e["ok"]}
    tests = [e for e in tools if e["tool"] == "shell.run" and e["role"] == "tester"]
    quality = last.get("quality") or {}
    return {
        "goal": goal, "outcome": last["type"], "reason": last.get("reason", ""), "wall_s": round(wall, 1),
        "plans": [p["source"] for p in planned], "plan_steps": len(planned[0]["plan"]["steps"]) if planned else 0,
        "plan_note": planned[0]["note"][:300] if planned else "",
        "steps_completed": len(completed), "steps_failed": len(failed), "files_written": sorted(p for p in writes if p),
        "test_runs": len(tests), "tests": quality.get("tests", "not_run"),
        "verdicts": dict(Counter(e["verdict"] or "none" for e in completed if e["role"] == "reviewer")),
        "verdicts_missing": sum(1 for e in events if e["type"] == "step.progress"
                                and e["message"].startswith("no verdict")),
        "truncated": sum(1 for e in events if e["type"] == "step.progress" and "truncated" in e["message"]),
        "calls": len(calls), "failed_calls": sum(1 for e in calls if e["outcome"] != "ok"),
        "prompt_tokens": sum(e["usage"]["prompt_tokens"] for e in calls),
        "completion_tokens": sum(e["usage"]["completion_tokens"] for e in calls),
        "call_latency_p50_ms": round(statistics.median([e["latency_ms"] for e in calls]), 0) if calls else None,
    }


def export_ledger(data_dir: Path) -> list[str]:
    """The ledger file of the runs as Parquet under bench/traces/real/ (the mesh is down: the file is free)."""
    TRACES.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "mesh", "ledger", "export", "--file", str(data_dir / "ledger.duckdb"),
                           "--parquet", str(TRACES)], capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"ledger export failed: {done.stderr[-2000:]}")
    return done.stdout.split()


def report(runs: list[dict[str, Any]]) -> str:
    n = len(runs)
    steps = [r["steps_completed"] for r in runs]
    plans = Counter(s for r in runs for s in r["plans"][:1])
    tested = [r for r in runs if r["tests"] in ("passed", "failed")]
    per_step = [r["wall_s"] / max(r["steps_completed"], 1) for r in runs]
    rows = "\n".join(
        f"| {r['goal'][:60]} | {r['outcome'].split('.')[1]} | {r['plans'][0] if r['plans'] else '-'} "
        f"({r['plan_steps']} steps) | {r['steps_completed']} / {r['steps_failed']} | "
        f"{', '.join(r['files_written']) or '-'} | {r['tests']} | {r['verdicts']} (+{r['verdicts_missing']} none) | "
        f"{r['calls']} | {r['completion_tokens']} | {r['wall_s']:.0f} s |" for r in runs)
    return (
        "`python -m bench.real` — every tier on SmolLM2-135M-Instruct (Q4_1, llama-cpp-python, n_ctx 8192, "
        "output reserve 1024), `mesh run --all-tiers local`, temperature 0, seed 42, swarm off, ≤ 1 revision, "
        f"wall budget {WALL_SECONDS} s per goal, 2-core machine shared with other work. Ledger as Parquet in "
        "`bench/traces/real/`.\n\n"
        f"- goals attempted / completed: **{n} / {sum(r['outcome'] == 'goal.completed' for r in runs)}**\n"
        f"- steps completed per goal: {', '.join(map(str, steps))} (mean {statistics.mean(steps):.1f})\n"
        f"- first plans by the model / by the fallback from the role specs: **{plans['model']} / {plans['fallback']}**\n"
        f"- files written: {sum(len(r['files_written']) for r in runs)} "
        f"({sum(1 for r in runs if r['files_written'])} of {n} goals wrote at least one)\n"
        f"- test pass rate (the tester's real run, last per goal): "
        f"**{sum(r['tests'] == 'passed' for r in tested)} / {len(tested)}**\n"
        f"- wall time per completed step: {', '.join(f'{x:.0f} s' for x in per_step)} "
        f"(model call p50 {statistics.median([r['call_latency_p50_ms'] or 0 for r in runs]) / 1000:.1f} s)\n"
        f"- truncated answers: {sum(r['truncated'] for r in runs)}; reviews without a parsable verdict: "
        f"{sum(r['verdicts_missing'] for r in runs)}\n\n"
        "| goal | outcome | first plan | steps done / failed | files | tests | verdicts | calls | out tokens | wall |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n" + rows + "\n\n"
        "What this can and cannot say: the mesh gets every role through on a 135M model (plans fall back, edits "
        "come as text, verdicts are re-asked), and the figures are the real edge tier's latency and success for "
        "the sim's calibration. With the same model on every tier it says **nothing about routing between "
        "tiers** — there is no difference between tiers to route on.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--goals", type=int, default=len(GOALS), help=f"how many goals (≤ {len(GOALS)})")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and traces alone")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / ".mesh"
        for goal in GOALS[:args.goals]:
            events, wall = run_goal(goal, data_dir, Path(tmp) / "out")
            runs.append(summarise(goal, events, wall))
            print(json.dumps(runs[-1]), flush=True)
        body = report(runs)
        print(body)
        if not args.no_write:
            for written in export_ledger(data_dir):
                print(written)
            (TRACES / "runs.json").write_text(json.dumps(runs, indent=1))
            write_section("real", body)


if __name__ == "__main__":
    main()
