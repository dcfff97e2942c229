"""Tracing's cost: the orchestration overhead per step with spans exported vs off, in the same run.

The step-overhead measure of ``bench.orchestration`` (one ``mesh node`` process per role, zero-latency
sim model, goals one after another), run in pairs on one nats-server: off (no
``OTEL_EXPORTER_OTLP_ENDPOINT``: the no-op path) and exported (every node sends its spans over OTLP/HTTP
to a receiver in this process, on loopback, which decodes and counts them — a collector's work, outside
the measured processes). Within a pair the mode that runs first alternates, so a load that rises or falls
through a pair favours neither.

Beside it, in this process: the CPU of the tracing calls one step makes (an ``invoke_agent`` span with two
``chat`` and two ``execute_tool`` spans under it, attributes of the size the roles set), off and exported —
the end-to-end figures are a difference of two noisy medians on a shared machine, this is the cost itself.

Run: ``.venv/bin/python -m bench.tracing`` (≈2 minutes per pair on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from bench.orchestration import overhead
from bench.results import write_section
from mesh import tracing
from mesh.aio import run_loop
from mesh.config import MeshSettings
from tests.meshkit import http_receiver, provisioned_nats


class Sink:
    """An OTLP/HTTP trace receiver on loopback that counts what it is sent."""

    def __init__(self) -> None:
        self.spans = 0

    async def handle(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        export = ExportTraceServiceRequest.FromString(await request.read())
        self.spans += sum(len(ss.spans) for rs in export.resource_spans for ss in rs.scope_spans)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")


@asynccontextmanager
async def sink() -> AsyncIterator[tuple[Sink, str]]:
    counter = Sink()
    async with http_receiver("/v1/traces", counter.handle) as url:
        yield counter, url


STEP_ATTRIBUTES: dict[str, str | bool | int | float] = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "coder", "gen_ai.conversation.id": "g",
                   "mesh.goal.id": "g", "mesh.step.id": "implement", "mesh.step.attempt": 1, "mesh.delivery.attempt": 1}
CHAT_ATTRIBUTES: dict[str, str | bool | int | float] = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "gen_ai.provider.name": "deepseek",
                   "gen_ai.response.model": "m", "gen_ai.usage.input_tokens": 900, "gen_ai.usage.output_tokens": 300,
                   "mesh.tier": "mid", "mesh.simulated": True, "mesh.route.tier": "mid", "mesh.route.propensity": 0.9,
                   "mesh.route.explored": False, "mesh.outcome": "ok", "mesh.cost_usd": 0.001}


def step_calls(n: int) -> float:
    """CPU µs (of the calling thread) of the tracing calls of one step, as the worker makes them (``on()``
    guards the attributes). Exported, that is building and queueing the spans: their encoding and sending
    run on the SDK's export thread (in the end-to-end CPU figures)."""
    parent = tracing.new_traceparent()
    started = time.thread_time()
    for _ in range(n):
        with tracing.span("invoke_agent coder", parent=parent,
                          attributes=STEP_ATTRIBUTES if tracing.on() else None) as step:
            for _call in range(2):
                if tracing.on():
                    now = time.time_ns()
                    tracing.record("chat m", kind="client", start_ns=now - 1000, end_ns=now,
                                   attributes=dict(CHAT_ATTRIBUTES))
            for _tool in range(2):
                with tracing.span("execute_tool fs.write", attributes={"gen_ai.tool.name": "fs.write"}
                                  if tracing.on() else None) as tool:
                    if tracing.on():
                        tool.update({"mesh.tool.ok": True, "mesh.tool.refused": False})
            if tracing.on():
                step.update({"mesh.outcome": "completed", "gen_ai.usage.input_tokens": 1800})
    return (time.thread_time() - started) / n * 1e6


async def main(pairs: int, goals: int, write: bool) -> None:
    runs: dict[str, list[dict[str, float]]] = {"off": [], "exported": []}
    with tempfile.TemporaryDirectory() as tmp:
        async with provisioned_nats(Path(tmp) / "nats") as server, sink() as (counter, endpoint):
            assert server.pid is not None
            base = MeshSettings(nats_url=server.url, data_dir=Path(tmp) / "mesh", health_port=0,
                                health_host="127.0.0.1", drain_seconds=5.0, sim_latency_scale=0.0)
            # exported with the SDK's default batching (a batch every 5 s, or at 512 spans), as deployed
            modes = [("off", {}), ("exported", {tracing.ENDPOINT_ENV: endpoint})]
            for i in range(pairs):
                for mode, env in modes if i % 2 == 0 else modes[::-1]:  # each mode goes first in half the pairs
                    o = await overhead(base, server.pid, goals, Path(tmp) / f"{mode}-{i}", env)
                    runs[mode].append(o)
                    print(f"pair {i + 1}, tracing {mode}: overhead p50 {o['total_p50']:.1f} ms / p99 "
                          f"{o['total_p99']:.1f} ms over {o['steps']:.0f} steps; CPU per step {o['cpu_per_step']:.1f} ms; "
                          f"load {o['load']:.1f}")
            spans = counter.spans
            calls_off = step_calls(20_000)
            os.environ[tracing.ENDPOINT_ENV] = endpoint  # set only now: the node processes above chose for themselves
            tracing.configure("bench", "bench")
            # 400 steps' spans fit the export queue (2,048): none dropped. A thread: the loop serves the sink.
            calls_on = await asyncio.to_thread(step_calls, 400)
            await asyncio.to_thread(tracing.shutdown)  # its last export needs the loop to answer it
    off, on = (_summary(runs[m]) for m in ("off", "exported"))
    steps = sum(o["steps_run"] for o in runs["exported"])
    print(f"off: p50 {off[0]:.1f} ms, CPU {off[1]:.1f} ms/step; exported: p50 {on[0]:.1f} ms, CPU {on[1]:.1f} ms/step; "
          f"{spans} spans received; one step's tracing calls: off {calls_off:.1f} µs, exported {calls_on:.1f} µs CPU")
    if not write:
        return
    write_section("tracing", "\n".join([
        f"Command: `.venv/bin/python -m bench.tracing --pairs {pairs} --goals {goals}`", "",
        "| tracing | overhead per step p50 (median of runs) | p99 (median) | CPU per step, every process |",
        "| --- | --- | --- | --- |",
        f"| off (no `OTEL_EXPORTER_OTLP_ENDPOINT`) | {off[0]:.1f} ms | {off[2]:.1f} ms | {off[1]:.1f} ms |",
        f"| exported over OTLP/HTTP | {on[0]:.1f} ms | {on[2]:.1f} ms | {on[1]:.1f} ms |",
        "",
        (f"The tracing calls of one step themselves (an `invoke_agent` span, two `chat` and two `execute_tool` spans "
         f"with the roles' attributes; measured in the bench process, CPU): **off {calls_off:.1f} µs**, exported "
         f"**{calls_on:.0f} µs** (building and queueing the spans; the batch export runs on the SDK's thread)."),
        "",
        (f"{pairs} pairs of `bench.orchestration`'s overhead measure (off and exported, the first of a pair "
         f"alternating; {goals} sequential goals "
         f"each, one node process per role, zero-latency sim model) on one nats-server. Exported: "
         f"{spans} spans sent to a receiver on loopback in the bench process (each run's unmeasured warm-up goal "
         f"included; {steps:.0f} measured steps). Per run (off / exported, p50 ms): "
         + ", ".join(f"{a['total_p50']:.1f} / {b['total_p50']:.1f}" for a, b in zip(runs["off"], runs["exported"],
                                                                                  strict=True))
         + f"; load average at the end {runs['exported'][-1]['load']:.1f}."),
    ]))


def _summary(runs: list[dict[str, float]]) -> tuple[float, float, float]:
    return (statistics.median(o["total_p50"] for o in runs), statistics.median(o["cpu_per_step"] for o in runs),
            statistics.median(o["total_p99"] for o in runs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=2, help="off/exported pairs of runs")
    parser.add_argument("--goals", type=int, default=5, help="sequential goals per run")
    parser.add_argument("--no-write", action="store_true", help="print the figures, leave RESULTS.md alone")
    args = parser.parse_args()
    run_loop(main(args.pairs, args.goals, not args.no_write))
