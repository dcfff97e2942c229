"""Orchestration benchmarks, one run, on a real nats-server with in-process role nodes and the sim:

Tools that start processes (the tester's shell.run) are left out: they would measure pytest.

1. overhead per step with a zero-latency model: the mesh's own time per step, split into
   dispatch (dependency done → step started: event → planner CAS → task publish → worker fetch)
   and worker (step started → step completed: inputs, routing, packing, events, artifacts);
2. steps/s with 1, 2 and 4 replicas of every worker role (each replica working one task at a time)
   when every model call takes 50 ms.

Run: ``.venv/bin/python -m bench.orchestration`` (≈1 minute on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench.results import write_section
from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.contracts import EventBase, Goal, GoalPlanned, StepCompleted, StepStarted
from mesh.embedded import EmbeddedNats
from mesh.roles.spec import RoleSpec
from tests.meshkit import in_process_mesh, role_specs, run_goal

WORKERS = ("researcher", "coder", "reviewer", "tester", "synthesizer")


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def step_overheads(events: list[EventBase]) -> tuple[list[float], list[float]]:
    """Per step: (dispatch ms, worker ms) from event timestamps."""
    plan = next(e.plan for e in events if isinstance(e, GoalPlanned))
    planned_at = next(e.at for e in events if isinstance(e, GoalPlanned))
    done = {e.step_id: e.at for e in events if isinstance(e, StepCompleted)}
    started = {e.step_id: e.at for e in events if isinstance(e, StepStarted)}
    deps = {s.step_id: s.depends_on for s in plan.steps}
    dispatch, worker = [], []
    for sid, t0 in started.items():
        if sid not in done or sid not in deps:
            continue  # revision steps are added after planning; their dependencies are in the state
        ready_at = max((done[d] for d in deps[sid] if d in done), default=planned_at)
        dispatch.append((t0 - ready_at).total_seconds() * 1000)
        worker.append((done[sid] - t0).total_seconds() * 1000)
    return dispatch, worker


async def overhead(settings: MeshSettings, goals: int) -> dict[str, float]:
    dispatch: list[float] = []
    worker: list[float] = []
    async with await Bus.connect(settings, name="bench") as bus, in_process_mesh(settings, specs=model_only_specs()):
        for i in range(goals):
            events = await run_goal(bus, Goal(brief=f"Overhead probe {i}: a key-value store"))
            d, w = step_overheads(events)
            dispatch += d
            worker += w
    total = [a + b for a, b in zip(dispatch, worker, strict=True)]
    return {"steps": len(total), "dispatch_p50": _pct(dispatch, 0.5), "dispatch_p99": _pct(dispatch, 0.99),
            "worker_p50": _pct(worker, 0.5), "worker_p99": _pct(worker, 0.99),
            "total_p50": statistics.median(total), "total_p99": _pct(total, 0.99)}


def model_only_specs(concurrency: int | None = None) -> dict[str, RoleSpec]:
    """Role specs without shell.run: the tester's real pytest run would measure pytest, not the mesh."""
    specs = {}
    for role, spec in role_specs().items():
        update: dict[str, object] = {}
        if "shell.run" in spec.tools:
            update |= {"tools": [t for t in spec.tools if t != "shell.run"], "shell_allow": []}
        if concurrency is not None and spec.kind == "worker":
            update["concurrency"] = concurrency
        specs[role] = spec.model_copy(update=update)
    return specs


async def throughput(settings: MeshSettings, replicas: int, goals: int) -> float:
    specs = model_only_specs(concurrency=1)
    counts = {"planner": 1} | {r: replicas for r in WORKERS}
    async with await Bus.connect(settings, name="bench") as bus, in_process_mesh(settings, counts, specs):
        started = time.perf_counter()
        results = await asyncio.gather(*(run_goal(bus, Goal(brief=f"Throughput probe {i}"), timeout=600)
                                         for i in range(goals)))
        elapsed = time.perf_counter() - started
    steps = sum(1 for events in results for e in events if isinstance(e, StepCompleted))
    return steps / elapsed


async def main(goals: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats(Path(tmp) / "nats") as server:
            base = MeshSettings(nats_url=server.url, data_dir=Path(tmp) / "mesh", health_port=0,
                                health_host="127.0.0.1", drain_seconds=5.0, sim_latency_scale=0.0)
            o = await overhead(base, goals)
            print(f"overhead over {o['steps']} steps: dispatch p50 {o['dispatch_p50']:.1f} ms / p99 "
                  f"{o['dispatch_p99']:.1f} ms; worker p50 {o['worker_p50']:.1f} / p99 {o['worker_p99']:.1f} ms; "
                  f"total p50 {o['total_p50']:.1f} / p99 {o['total_p99']:.1f} ms")
            slow = base.model_copy(update={"sim_latency_ms": 50.0, "sim_latency_scale": 1.0})
            rates = {}
            for n in (1, 2, 4):
                rates[n] = await throughput(slow, n, goals=8)
                print(f"{n} replica(s) per worker role: {rates[n]:.1f} steps/s")
    write_section("orchestration", "\n".join([
        "Command: `.venv/bin/python -m bench.orchestration`", "",
        "| measure | p50 | p99 |", "| --- | --- | --- |",
        f"| dispatch: dependency done → step started | {o['dispatch_p50']:.1f} ms | {o['dispatch_p99']:.1f} ms |",
        f"| worker: started → completed, zero-latency model | {o['worker_p50']:.1f} ms | {o['worker_p99']:.1f} ms |",
        f"| **orchestration overhead per step** (sum) | **{o['total_p50']:.1f} ms** | {o['total_p99']:.1f} ms |",
        "",
        f"Steps measured: {o['steps']} over {goals} sequential goals, one replica per role. Target p50 ≤ 10 ms.",
        "",
        "| worker replicas per role (concurrency 1 each), 50 ms per model call | steps/s | vs 1 |",
        "| --- | --- | --- |",
        *(f"| {n} | {rates[n]:.1f} | {rates[n] / rates[1]:.2f}× |" for n in (1, 2, 4)),
        "",
        "8 concurrent goals. Target: 4 replicas ≥ 3× the throughput of 1.",
    ]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--goals", type=int, default=5)
    asyncio.run(main(parser.parse_args().goals))
