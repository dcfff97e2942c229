"""bench/suite: every benchmark of the mesh, scaled down, in one run — one table of ratios.

Each row reuses its benchmark module's own measuring function (``bench.bus``, ``bench.router``,
``bench.ledger``, ``bench.orchestration``, ``bench.backends``, ``bench.cli``) at a fraction of its full size, so the
whole suite takes a few minutes; the full-size figures are in those modules' own sections of
``bench/RESULTS.md``. Ratios, not absolute rates, are what to read on a shared machine: both sides
of a ratio run in the same process, interleaved where the module does so.

    mesh bench                      # = .venv/bin/python -m bench.suite; writes the "suite" section
    mesh bench --scale 4            # bigger samples (slower, steadier)
    mesh bench --scale 0.01 --replicas 2 --no-write   # a smoke run of every group (~1-2 min)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import backends, bus, cli, codec, ledger, orchestration, router
from bench.results import arguments, parse_args, write_section
from mesh.config import MeshSettings
from mesh.contracts import ArtifactRef, Budget, DagPosition, Step, Task, encode, new_id
from mesh.embedded import EmbeddedNats
from mesh.roles.spec import default_nodes_dir, load_specs
from mesh.router.simenv import SimRouting
from mesh.store.synthetic import synthetic_events
from tests.meshkit import provision_topology, provisioned_nats


@dataclass(frozen=True)
class Row:
    measure: str
    mesh: str  # the mesh's figure, formatted
    baseline: str  # what it is compared with, formatted
    ratio: float
    unit: str  # how to read the ratio, e.g. "× raw" or "× faster"
    target: float | None = None  # the ratio the issue asked for, if any
    higher_is_better: bool = True

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        met = self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target
        return "met" if met else "**missed**"

    def cells(self) -> list[str]:
        target = "" if self.target is None else f"{'≥' if self.higher_is_better else '≤'} {self.target:g}"
        return [self.measure, self.mesh, self.baseline, f"**{self.ratio:.2f}** {self.unit}", target, self.verdict]


def typical_task() -> Task:
    """A task as the orchestrator dispatches it mid-goal: dependency outputs, memory, budget, position."""
    gid = new_id()
    refs = [ArtifactRef(digest=os.urandom(32).hex(), media_type="text/markdown", size=6_000, name=f"research-{i}/notes")
            for i in range(3)]
    step = Step(step_id="implement-1", role="coder", instruction="Implement the specification for: a login system",
                depends_on=["spec"], acceptance=["Code and tests are written to the workspace"], difficulty=0.6)
    return Task(task_id=Task.make_id(gid, step.step_id, 1), goal_id=gid, step=step, brief="Build me a login system",
                constraints=["Python 3.11 only", "never store plaintext passwords"], inputs=refs,
                memory="research-1 (researcher) done: 1 output(s)\nspec (researcher) done: 1 output(s)",
                position=DagPosition(depth=2, fan_out=1, dependents=2, total_steps=8), remaining=Budget())


async def bus_rows(scale: float) -> list[Row]:
    n = int(4_000 * scale)
    figures = await bus.bench(n, int(10_000 * scale), rounds=3)
    task = typical_task()
    async with _server() as url:
        await bus.run_raw(url, 300, encode(task))  # warm-up
        await bus.run_mesh(url, 300, task)
        raw, mesh = [], []
        for _ in range(3):  # interleaved rounds
            raw.append(await bus.run_raw(url, n, encode(task)))
            mesh.append(await bus.run_mesh(url, n, task))
    raw_rate, mesh_rate = sorted(raw)[len(raw) // 2], sorted(mesh)[len(mesh) // 2]
    return [
        Row("bus, JetStream: `Bus.publish` + `PullConsumer` vs raw nats-py (step.completed event)",
            f"{figures['mesh']:,.0f} msg/s", f"{figures['raw']:,.0f} msg/s", figures["mesh"] / figures["raw"],
            "× raw", 0.6),
        Row("bus, JetStream: mesh vs FastStream 0.7 (same event, pydantic both sides)",
            f"{figures['mesh']:,.0f} msg/s", f"{figures['faststream']:,.0f} msg/s",
            figures["mesh"] / figures["faststream"], "× FastStream", 5.0),
        Row(f"task dispatch: a `Task` ({len(encode(task))} B) published and pulled, mesh vs raw nats-py",
            f"{mesh_rate:,.0f} tasks/s", f"{raw_rate:,.0f} tasks/s", mesh_rate / raw_rate, "× raw", 0.6),
    ]


def router_rows(scale: float) -> list[Row]:
    sim = SimRouting(load_specs(default_nodes_dir()), seed=21)
    with tempfile.TemporaryDirectory(prefix="mesh-suite-router-") as tmp:
        lat = router.latency_figures(sim, int(16_000 * scale), rounds=4, tmp=Path(tmp))
    onnx, sk = lat.paths["`Router.decide`, ONNX"], lat.paths["`Router.decide`, scikit-learn"]
    bare_onnx, bare_sk = lat.paths["features + model, ONNX"], lat.paths["features + model, scikit-learn"]
    return [
        Row("router decision p50, whole `Router.decide` (features, model, constraints, `RouteDecision`): ONNX vs "
            "scikit-learn", f"{onnx[0]:.0f} µs", f"{sk[0]:.0f} µs", sk[0] / onnx[0], "× faster", 10.0),
        Row("router p50, features + model only: ONNX vs scikit-learn", f"{bare_onnx[0]:.0f} µs",
            f"{bare_sk[0]:.0f} µs", bare_sk[0] / bare_onnx[0], "× faster", 10.0),
        Row("router decision p99: ONNX vs the 100 µs target", f"{onnx[1]:.0f} µs", "100 µs", onnx[1] / 100,
            "× target", 1.0, higher_is_better=False),
    ]


def ledger_rows(scale: float) -> list[Row]:
    items = list(ledger.numbered(synthetic_events(int(200_000 * scale), seed=0)))
    with tempfile.TemporaryDirectory(prefix="mesh-suite-ledger-") as tmp:
        batched = ledger.batched_rate(Path(tmp) / "batched.duckdb", items, 20_000)
        rowwise = ledger.rowwise_rate(Path(tmp) / "rowwise.duckdb", items[:int(4_000 * scale)])
    return [
        Row(f"ledger ingest: `Ledger.ingest` batches of 20,000 ({len(items):,} events) vs row-by-row `executemany`",
            f"{batched.rate:,.0f} ev/s", f"{rowwise.rate:,.0f} ev/s", batched.rate / rowwise.rate, "× row-wise", 20.0),
        Row("ledger ingest, batched: events/s vs the 50,000 events/s target (per CPU-second in brackets)",
            f"{batched.rate:,.0f} ev/s ({batched.cpu_rate:,.0f}/CPU-s)", "50,000 ev/s", batched.rate / 50_000,
            "× target", 1.0),
    ]


async def orchestration_rows(scale: float, replicas: int = 4) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="mesh-suite-orch-") as tmp:
        work = Path(tmp)
        async with provisioned_nats(work / "nats") as server:
            assert server.pid is not None
            base = MeshSettings(nats_url=server.url, data_dir=work / "mesh", health_port=0, health_host="127.0.0.1",
                                drain_seconds=5.0, sim_latency_scale=0.0)
            over = await orchestration.overhead(base, server.pid, max(1, int(3 * scale)), work / "overhead")
            slow = base.model_copy(update={"sim_latency_ms": 50.0, "sim_latency_scale": 1.0})
            goals = max(2 * replicas, int(32 * scale))  # enough runnable steps for every replica of every role
            one = (await orchestration.throughput(slow, server.pid, 1, goals, work / "one")).steps_per_s
            many = (await orchestration.throughput(slow, server.pid, replicas, goals, work / "many")).steps_per_s
    return [
        Row(f"orchestration: steps/s with {replicas} vs 1 node process per worker role (50 ms model calls, "
            f"{goals} goals)", f"{many:.1f} steps/s", f"{one:.1f} steps/s", many / one, "× 1 replica",
            3.0 if replicas == 4 else None),
        Row(f"orchestration overhead per step, p50 ({over['steps']} steps, zero-latency model; dispatch "
            f"{over['dispatch_p50']:.1f} + worker {over['worker_p50']:.1f} ms) vs the 10 ms target",
            f"{over['total_p50']:.1f} ms", "10 ms", over["total_p50"] / 10, "× target", 1.0, higher_is_better=False),
    ]


async def backend_rows(scale: float) -> list[Row]:
    proc, url = await backends.start_server()
    try:
        over = await backends.overhead(url, int(200 * scale))
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    return [Row("model call: `ModelGateway.chat` vs a bare `AsyncOpenAI` streamed call (sim-server over HTTP)",
                f"{over['mesh_ms']:.2f} ms", f"{over['bare_ms']:.2f} ms", over["ratio"], "× bare",
                1.2, higher_is_better=False)]


async def cli_rows(scale: float) -> list[Row]:
    times = (await cli.command_times(max(1, int(5 * scale)), [cli.ROOT]))[cli.ROOT]
    return [Row(f"CLI start-up: `{name}` wall time (a fresh process, median; CPU {times[name + ' cpu']:.2f} s) vs "
                f"the {cli.TARGET} s target", f"{times[name]:.2f} s", f"{cli.TARGET} s", times[name] / cli.TARGET,
                "× target", 1.0, higher_is_better=False)
            for name in cli.COMMANDS]


def codec_rows(scale: float) -> list[Row]:
    """The pinned hostile corpus (fixed: ``scale`` does not apply), decoded as a consumer decodes it."""
    corpus = codec.hostile_corpus()
    worst = max(codec.heap_cost(data).ratio for data in corpus.values())
    slowest = max(codec.cpu_ms(data, rounds=1) for data in corpus.values())
    return [
        Row(f"decoding, hostile corpus ({len(corpus)} messages ≤ 1 MB): worst peak heap vs the 32× wire-size target",
            f"{worst:.1f}× wire", "32× wire", worst / 32, "× target", 1.0, higher_is_better=False),
        Row("decoding, hostile corpus: slowest message's CPU vs the 250 ms target", f"{slowest:.0f} ms", "250 ms",
            slowest / 250, "× target", 1.0, higher_is_better=False),
    ]


class _server:
    """A fresh nats-server in a temporary directory for one group of rows."""

    async def __aenter__(self) -> str:
        self._tmp = tempfile.TemporaryDirectory(prefix="mesh-suite-nats-")
        self._nats = EmbeddedNats(Path(self._tmp.name) / "nats")
        await self._nats.start()
        await provision_topology(MeshSettings(nats_url=self._nats.url))
        return self._nats.url

    async def __aexit__(self, *exc: object) -> None:
        await self._nats.stop()
        self._tmp.cleanup()


GROUPS: dict[str, Callable[[float], object]] = {
    "bus": bus_rows, "router": router_rows, "ledger": ledger_rows, "orchestration": orchestration_rows,
    "backends": backend_rows, "cli": cli_rows, "codec": codec_rows,
}


def run(scale: float, only: list[str] | None = None, replicas: int = 4) -> tuple[list[Row], dict[str, float]]:
    """Every group's rows, and the seconds each group took."""
    rows: list[Row] = []
    took: dict[str, float] = {}
    for name, group in GROUPS.items():
        if only and name not in only:
            continue
        started = time.perf_counter()
        out = orchestration_rows(scale, replicas) if group is orchestration_rows else group(scale)
        rows += asyncio.run(out) if asyncio.iscoroutine(out) else out  # type: ignore[arg-type]
        took[name] = time.perf_counter() - started
        print(f"{name}: {took[name]:.0f}s", file=sys.stderr, flush=True)
    return rows, took


def table(rows: list[Row]) -> str:
    lines = ["| measure | mesh | baseline | ratio | target | |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    return "\n".join(lines + ["| " + " | ".join(r.cells()) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mesh bench", description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every sample size")
    parser.add_argument("--only", nargs="*", choices=list(GROUPS), help="run only these groups")
    parser.add_argument("--replicas", type=int, default=4,
                        help="worker replicas compared with one in the orchestration group (the target is for 4)")
    args = parse_args(parser, argv)
    if args.replicas < 2:
        parser.error("--replicas must be at least 2")
    rows, took = run(args.scale, args.only, args.replicas)
    args_text = arguments(argv)
    text = "\n".join([
        (f"Command: `mesh bench{args_text}` (= `.venv/bin/python -m bench.suite{args_text}`), "
         f"{sum(took.values()):.0f} s on {os.cpu_count()} shared CPUs (load average {os.getloadavg()[0]:.1f} at "
         "the end). Each row reuses its benchmark's own measuring code at a fraction of its full size; the "
         "full-size runs are the sections above. A ratio compares two paths measured in the same run."),
        "", table(rows), "",
        ("Missed targets, with the measured figure and the reason: see \"Targets\" in the README's Reliability "
         "section and docs/RELIABILITY.md."),
    ])
    print(table(rows))
    if not args.no_write and not args.only and args.replicas == 4:
        write_section("suite", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
