"""Orchestration benchmarks, one run, on a real nats-server with the sim as every model tier.

Tools that start processes (the tester's shell.run) are left out: they would measure pytest.

1. overhead per step with a zero-latency model, one node process per role and one goal at a
   time: the mesh's own time per step, split into dispatch (dependency done → step started: event →
   planner CAS → task publish → worker fetch) and worker (step started → step completed: inputs,
   routing, packing, events, artifacts);
2. steps/s with 1, 2 and 4 replicas of every worker role (each replica working one task at a time)
   when every model call takes 50 ms. The goals run concurrently, enough of them that 4 replicas of
   every role can all have work (a goal is mostly a chain: one runnable step at a time after its
   research fan-out); the CPU used meanwhile is reported beside it.

Every node is its own ``mesh node <role>`` process, as deployed: in-process nodes share one event
loop and one core (replicas could not scale), and the bench's own event watch would run on it too.

Run: ``.venv/bin/python -m bench.orchestration`` (≈3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.results import arguments, parse_args, write_section
from mesh.aio import run_loop
from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.contracts import EventBase, Goal, GoalPlanned, StepCompleted, StepStarted
from mesh.roles.spec import RoleSpec
from tests.meshkit import NodeProcess, node_env, provisioned_nats, role_specs, run_goal

WORKERS = ("researcher", "coder", "reviewer", "tester", "synthesizer")
IDLE_SECONDS = 5.0


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


async def round_trip(bus: Bus, n: int = 200) -> float:
    """p50 ms of one bare JetStream round trip (a KV read) on this machine right now: the unit the
    overhead is made of (each step is a chain of them: CAS, task publish, state check, blobs, events)."""
    kv = await bus.kv(bus.topology.kv_nodes)
    await kv.put("bench-probe", b"x")
    times = []
    for _ in range(n):
        started = time.perf_counter()
        await kv.get("bench-probe")
        times.append((time.perf_counter() - started) * 1000)
    await kv.delete("bench-probe")
    return statistics.median(times)


async def overhead(settings: MeshSettings, server_pid: int, goals: int, work: Path,
                   env: dict[str, str] | None = None) -> dict[str, float]:
    """The overhead figures, and ``cpu:<process>``: CPU ms per step of each process (nats-server, each role).
    ``env``: more environment for the node processes (``bench.tracing``: the OTLP endpoint)."""
    dispatch: list[float] = []
    worker: list[float] = []
    counts = {"planner": 1} | dict.fromkeys(WORKERS, 1)
    async with node_fleet(settings, server_pid, counts, model_only_specs(), work, env) as (bus, pids):
        names = dict(zip(pids, ["nats-server", *counts], strict=True))  # one process per role, in fleet order
        rtt = await round_trip(bus)
        # Nodes are long-lived: the first goal pays one-time costs (lazy schema builds, the router's first
        # inference, the blob cache's first scan) that no later step does. It runs unmeasured.
        await run_goal(bus, Goal(brief="Warm-up: a key-value store"))
        idle0, idle_started = _process_jiffies(pids), time.perf_counter()
        await asyncio.sleep(IDLE_SECONDS)  # what the fleet burns doing nothing (heartbeats, polls, sweeps)
        idle = sum(_process_jiffies(pids).values()) - sum(idle0.values())
        idle_per_s = idle / (time.perf_counter() - idle_started)
        before, ran, started = _process_jiffies(pids), 0, time.perf_counter()
        for i in range(goals):
            events = await run_goal(bus, Goal(brief=f"Overhead probe {i}: a key-value store"))
            d, w = step_overheads(events)
            dispatch += d
            worker += w
            ran += sum(1 for e in events if isinstance(e, StepCompleted))  # revisions too: their CPU is counted
        after, elapsed = _process_jiffies(pids), time.perf_counter() - started
    total = [a + b for a, b in zip(dispatch, worker, strict=True)]
    per_step = 1000 / os.sysconf("SC_CLK_TCK") / ran  # jiffies over the run → CPU ms per step run
    cpu = {f"cpu:{names[pid]}": (after[pid] - before[pid]) * per_step for pid in pids}
    return {"steps": len(total), "dispatch_p50": _pct(dispatch, 0.5), "dispatch_p99": _pct(dispatch, 0.99),
            "worker_p50": _pct(worker, 0.5), "worker_p99": _pct(worker, 0.99),
            "total_p50": statistics.median(total), "total_p99": _pct(total, 0.99), "rtt_p50": rtt,
            "cpu_per_step": sum(cpu.values()), "steps_run": ran,
            "idle_per_step": idle_per_s * elapsed * per_step, "load": os.getloadavg()[0]} | cpu


def model_only_specs(concurrency: int | None = None) -> dict[str, RoleSpec]:
    """Role specs without shell.run: the tester's real pytest run would measure pytest, not the mesh.
    A verdict from tests goes with it (it reads shell.run's exit status). Validated here, as the nodes
    will validate them: a spec they would refuse fails the bench at once, not after a 60 s wait."""
    specs = {}
    for role, spec in role_specs().items():
        update: dict[str, object] = {}
        if "shell.run" in spec.tools:
            update |= {"tools": [t for t in spec.tools if t != "shell.run"], "shell_allow": [],
                       "verdict_from_tests": False}
        if concurrency is not None and spec.kind == "worker":
            update["concurrency"] = concurrency
        specs[role] = RoleSpec.model_validate(spec.model_dump() | update)
    return specs


def write_specs(specs: dict[str, RoleSpec], folder: Path) -> Path:
    """The specs as ``nodes/*.toml`` for node processes (``MESH_NODES_DIR``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for role, spec in specs.items():
        doc = spec.model_dump(mode="json", exclude_none=True)
        lines = [f"{k} = {json.dumps(v)}" for k, v in doc.items() if not isinstance(v, dict)]
        for table, values in ((k, v) for k, v in doc.items() if isinstance(v, dict)):
            lines += ["", f"[{table}]", *(f"{k} = {json.dumps(v)}" for k, v in values.items())]
        (folder / f"{role}.toml").write_text("\n".join(lines) + "\n")  # JSON scalars and arrays are TOML
    return folder


@dataclass(frozen=True, slots=True)
class Rate:
    """One throughput run: steps/s, and where the CPU went meanwhile (in cores: 2.0 = both busy)."""

    steps_per_s: float
    machine: float  # every process on the machine, other users' included
    mesh: float  # the node processes and nats-server
    load: float  # the 1-minute load average at the end: runnable processes competing for the cores


def _jiffies(pids: list[int]) -> tuple[int, int]:
    """(busy jiffies of the whole machine, user + system jiffies of ``pids``), from /proc."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4], sum(_process_jiffies(pids).values())  # all but idle and iowait


def _process_jiffies(pids: list[int]) -> dict[int, int]:
    """User + system jiffies of each of ``pids``, from /proc."""
    own = {}
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        own[pid] = int(stat[11]) + int(stat[12])  # utime, stime (fields 14 and 15 of proc(5))
    return own


async def _await_nodes(bus: Bus, counts: dict[str, int], timeout: float = 180.0) -> None:
    """Wait until every node process heartbeats into ``mesh_nodes`` (its consumers start with it). Generous:
    21 processes importing the runtime at once on a loaded 2-core machine took over a minute."""
    kv = await bus.kv(bus.topology.kv_nodes)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            beats = Counter([json.loads((await kv.get(k)).value or b"{}").get("role") for k in await kv.keys()])
        except Exception:  # noqa: BLE001 — no keys yet, or a node that left between keys() and get()
            beats = Counter()
        if all(beats[role] >= n for role, n in counts.items()):
            return
        await asyncio.sleep(0.2)  # polling: heartbeats are the only readiness signal a node process gives
    raise TimeoutError(f"node processes not up within {timeout:.0f}s: {counts}")


@asynccontextmanager
async def node_fleet(settings: MeshSettings, server_pid: int, counts: dict[str, int], specs: dict[str, RoleSpec],
                     work: Path, extra_env: dict[str, str] | None = None) -> AsyncIterator[tuple[Bus, list[int]]]:
    """``counts[role]`` ``mesh node <role>`` processes, as deployed, running ``specs``; yields a bus once
    they are all up, and the pids of the server and the nodes (for their CPU use). SIGTERM on exit."""
    env = node_env(settings, MESH_NODES_DIR=str(write_specs(specs, work / "nodes")), MESH_LOG_LEVEL="WARNING",
                   **(extra_env or {}))
    if settings.sim_latency_ms is not None:
        env["MESH_SIM_LATENCY_MS"] = str(settings.sim_latency_ms)
    procs = [NodeProcess(role, env, work).start() for role, n in counts.items() for _ in range(n)]
    try:
        async with await Bus.connect(settings, name="bench") as bus:
            await _await_nodes(bus, counts)
            yield bus, [server_pid, *(p.proc.pid for p in procs if p.proc)]
    finally:
        for proc in procs:
            proc.signal(signal.SIGTERM)
        for proc in procs:
            await proc.wait()


async def throughput(settings: MeshSettings, server_pid: int, replicas: int, goals: int, work: Path) -> Rate:
    """Steps/s with ``replicas`` node processes per worker role, and the CPU they and the server used."""
    counts = {"planner": 1} | dict.fromkeys(WORKERS, replicas)
    async with node_fleet(settings, server_pid, counts, model_only_specs(concurrency=1), work) as (bus, pids):
        cpu0, started = _jiffies(pids), time.perf_counter()
        results = await asyncio.gather(*(run_goal(bus, Goal(brief=f"Throughput probe {replicas}.{i}"),
                                                  timeout=600) for i in range(goals)))
        elapsed, cpu1 = time.perf_counter() - started, _jiffies(pids)
    steps = sum(1 for events in results for e in events if isinstance(e, StepCompleted))
    tick = os.sysconf("SC_CLK_TCK") * elapsed
    return Rate(steps / elapsed, (cpu1[0] - cpu0[0]) / tick, (cpu1[1] - cpu0[1]) / tick, os.getloadavg()[0])


async def main(goals: int, concurrent_goals: int, replicas: list[int], write: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with provisioned_nats(Path(tmp) / "nats") as server:
            base = MeshSettings(nats_url=server.url, data_dir=Path(tmp) / "mesh", health_port=0,
                                health_host="127.0.0.1", drain_seconds=5.0, sim_latency_scale=0.0)
            assert server.pid is not None
            o = await overhead(base, server.pid, goals, Path(tmp) / "overhead")
            print(f"overhead over {o['steps']} steps: dispatch p50 {o['dispatch_p50']:.1f} ms / p99 "
                  f"{o['dispatch_p99']:.1f} ms; worker p50 {o['worker_p50']:.1f} / p99 {o['worker_p99']:.1f} ms; "
                  f"total p50 {o['total_p50']:.1f} / p99 {o['total_p99']:.1f} ms; "
                  f"bare round trip p50 {o['rtt_p50']:.2f} ms; CPU per step {o['cpu_per_step']:.1f} ms "
                  f"({_cpu_split(o)}; of it idle {o['idle_per_step']:.1f}); load average {o['load']:.1f}")
            slow = base.model_copy(update={"sim_latency_ms": 50.0, "sim_latency_scale": 1.0})
            rates = {}
            for n in replicas:
                r = rates[n] = await throughput(slow, server.pid, n, concurrent_goals, Path(tmp) / f"replicas-{n}")
                print(f"{n} replica(s) per worker role: {r.steps_per_s:.1f} steps/s; CPU cores busy: machine "
                      f"{r.machine:.2f}, mesh {r.mesh:.2f}; load average {r.load:.1f}")
    if not write:
        return
    if not {1, 4} <= rates.keys():
        raise SystemExit("RESULTS.md needs the 1- and 4-replica runs (or pass --no-write)")
    met = {"overhead": o["total_p50"] <= 10, "cpu": o["cpu_per_step"] <= 9,
           "replicas": rates[4].steps_per_s >= 3.5 * rates[1].steps_per_s}
    write_section("orchestration", "\n".join([
        f"Command: `.venv/bin/python -m bench.orchestration{arguments(None)}`", "",
        "| measure | p50 | p99 |", "| --- | --- | --- |",
        f"| dispatch: dependency done → step started | {o['dispatch_p50']:.1f} ms | {o['dispatch_p99']:.1f} ms |",
        f"| worker: started → completed, zero-latency model | {o['worker_p50']:.1f} ms | {o['worker_p99']:.1f} ms |",
        f"| **orchestration overhead per step** (sum) | **{o['total_p50']:.1f} ms** | {o['total_p99']:.1f} ms |",
        "",
        (f"Steps measured: {o['steps']} (revisions left out) over {goals} sequential goals, one node process per "
         f"role, load average "
         f"{o['load']:.1f}. A bare JetStream round trip (KV read) took {o['rtt_p50']:.2f} ms p50 during the run. "
         f"**Target p50 ≤ 10 ms: {_verdict(met['overhead'])}.**"),
        "",
        (f"CPU per step run ({o['steps_run']:.0f}, revisions included), every process (planning and every role "
         f"included): **{o['cpu_per_step']:.1f} ms** "
         f"({_cpu_split(o)}), of which {o['idle_per_step']:.1f} ms is what the fleet burns idle over as long "
         f"(heartbeats, polls, sweeps; measured for {IDLE_SECONDS:.0f} s before the goals). "
         f"**Target ≤ 9 ms: {_verdict(met['cpu'])}.**"),
        "",
        ("| worker replicas per role (concurrency 1, one process each), 50 ms per model call | steps/s | vs 1 "
         "| CPU cores busy: mesh / machine | load average |"),
        "| --- | --- | --- | --- | --- |",
        *(f"| {n} | {r.steps_per_s:.1f} | {r.steps_per_s / rates[1].steps_per_s:.2f}× | {r.mesh:.2f} / "
          f"{r.machine:.2f} | {r.load:.1f} |" for n, r in rates.items()),
        "",
        (f"{concurrent_goals} concurrent goals, one planner process; mesh = the node processes and nats-server, "
         f"machine = everything on it (2 cores). **Target 4 replicas ≥ 3.5× the throughput of 1: "
         f"{_verdict(met['replicas'])}.**"),
    ]))


def _cpu_split(o: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('cpu:')} {v:.1f}" for k, v in o.items() if k.startswith("cpu:"))


def _verdict(met: bool) -> str:
    return "met" if met else "missed"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--goals", type=int, default=5, help="sequential goals of the overhead measure")
    parser.add_argument("--concurrent-goals", type=int, default=32, help="goals of each throughput run")
    parser.add_argument("--replicas", type=int, nargs="*", default=[1, 2, 4],
                        help="worker replicas per role of the throughput runs (none: overhead only)")
    args = parse_args(parser, None)
    run_loop(main(args.goals, args.concurrent_goals, args.replicas, not args.no_write))  # uvloop, as every `mesh node` runs
