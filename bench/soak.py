"""bench/soak: continuous goals on real node processes for a set time; node memory (RSS) and consumer
lag are sampled, fitted (least-squares slope after a warm-up) and plotted to ``bench/soak.png``.

Every role runs as its own ``mesh node <role>`` process (the ledger included) against one nats-server
with file storage; ``--in-flight`` goals are kept running at all times (a new one is submitted as
each ends); the sim answers every model call after ``--latency-ms``. Every ``--interval`` seconds:
VmRSS of each node and of the nats-server, ``num_pending`` of every role's durable consumer (the work
queues, the planner's outcomes) and the ledger's lag (the events stream's last sequence minus the
last one committed to the ledger file, from the ledger service).

    .venv/bin/python -m bench.soak --minutes 15          # writes bench/soak.png and the "soak" part
                                                         # of the "reliability" section of bench/RESULTS.md
    .venv/bin/python -m bench.soak --minutes 15 --suite  # + runs tests/reliability (MESH_LONG=1) for its figures

``tests/reliability/test_soak.py`` runs the same ``soak()`` for 75 s (15 minutes with MESH_LONG=1) and
asserts the slopes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from nats.js import api

from bench.plot import Canvas
from bench.results import arguments, finish, parse_args
from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.contracts import Goal, open_envelope
from mesh.errors import LedgerError
from mesh.roles.ledger_service import LedgerClient
from tests.meshkit import node_env, provisioned_nats, role_specs
from tests.reliability.kit import Fleet, rss_kb

PNG = Path(__file__).with_name("soak.png")
ROOT = Path(__file__).resolve().parent.parent
WARM_UP = 0.25  # share of the run left out of the fits: imports, first-use caches, JIT-less warm-up
_TERMINAL = (".goal.completed", ".goal.failed", ".goal.cancelled")


@dataclass
class Sample:
    t: float  # seconds since the first goal was submitted
    rss_mb: dict[str, float]  # role (or "nats-server") → resident MB
    lag: dict[str, int]  # durable consumer → messages not yet delivered; "ledger" → events not yet committed
    goals_done: int


@dataclass
class SoakResult:
    seconds: float
    in_flight: int
    samples: list[Sample] = field(default_factory=list)
    completed: int = 0
    failed: int = 0

    def series(self, what: str) -> dict[str, list[tuple[float, float]]]:
        """``rss_mb`` per process, or ``lag`` (the sum over consumers), as (minutes, value) points."""
        if what == "lag":
            return {"lag": [(s.t / 60, float(sum(s.lag.values()))) for s in self.samples]}
        names = list(dict.fromkeys(n for s in self.samples for n in s.rss_mb))
        return {n: [(s.t / 60, s.rss_mb[n]) for s in self.samples if n in s.rss_mb] for n in names}

    def steady(self, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        """The points after the warm-up."""
        start = self.seconds * WARM_UP / 60
        return [p for p in points if p[0] >= start]

    def slopes(self, what: str) -> dict[str, float]:
        """Least-squares slope per minute of each series after the warm-up."""
        return {n: slope(self.steady(pts)) for n, pts in self.series(what).items()}

    @property
    def goals_per_minute(self) -> float:
        return (self.completed + self.failed) / (self.seconds / 60)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points; 0 for fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)


async def soak(settings: MeshSettings, seconds: float, log_dir: Path, *, in_flight: int = 4,
               interval: float = 5.0, latency_ms: float = 50.0, server_pid: int | None = None) -> SoakResult:
    """Run goals continuously for ``seconds`` on a fresh fleet of node processes; sample as it goes."""
    roles = list(role_specs(with_ledger=True))
    env = node_env(settings, MESH_SIM_LATENCY_MS=str(latency_ms), MESH_DRAIN_SECONDS="10")
    result = SoakResult(seconds=seconds, in_flight=in_flight)
    async with await Bus.connect(settings, name="soak") as bus:
        fleet = Fleet(roles, env, log_dir).start()
        try:
            await fleet.started(timeout=120)
            consumers = [(bus.topology.stream_for(r), bus.topology.consumer_name(r))
                         for r in roles if r != "ledger"]
            consumers.append((bus.topology.events_stream, bus.topology.outcomes_consumer))
            stop = asyncio.Event()
            started = time.monotonic()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_drive(bus, result, in_flight, stop))
                sampler = tg.create_task(_sample(bus, fleet, consumers, result, started, interval, server_pid))
                await asyncio.sleep(seconds)  # the run's length: what is measured, not a synchronisation
                stop.set()
                sampler.cancel()
            assert not fleet.crashed(), f"nodes died during the soak: {fleet.crashed()}\n{fleet.logs()}"
            await fleet.terminate()
        finally:
            fleet.stop()
    return result


async def _drive(bus: Bus, result: SoakResult, in_flight: int, stop: asyncio.Event) -> None:
    """Keep ``in_flight`` goals running until ``stop``; count how they end (one watch of goal events)."""
    topo = bus.topology
    slots = asyncio.Semaphore(in_flight)
    sub = await bus._js.subscribe(topo.event_subject("*", "*", "goal.*"), stream=topo.events_stream,
                                 ordered_consumer=True, deliver_policy=api.DeliverPolicy.NEW)

    async def watch() -> None:
        async for msg in sub.messages:
            if msg.subject.endswith(_TERMINAL):
                if msg.subject.endswith(".goal.completed"):
                    result.completed += 1
                else:
                    result.failed += 1
                    print(f"goal failed: {open_envelope(msg.data).body}", file=sys.stderr)
                slots.release()

    try:
        async with asyncio.TaskGroup() as tg:
            watcher = tg.create_task(watch())
            n = 0
            while not stop.is_set():
                await slots.acquire()
                if stop.is_set():
                    break
                await bus.submit_goal(Goal(brief=f"Soak goal {n}: build me a login system"))
                n += 1
            watcher.cancel()
    finally:
        await sub.unsubscribe()


async def _sample(bus: Bus, fleet: Fleet, consumers: list[tuple[str, str]], result: SoakResult,
                  started: float, interval: float, server_pid: int | None) -> None:
    ledger = LedgerClient(bus, timeout=5)
    while True:
        pids = fleet.pids() | ({"nats-server": server_pid} if server_pid else {})
        rss = {name: rss_kb(pid) / 1024 for name, pid in pids.items()}
        lag: dict[str, int] = {}
        for stream in {s for s, _ in consumers}:
            # `fleet.started` waits for the nodes' signal handlers, which come before they connect and
            # provision their consumers: one not there yet is left out of this sample (a 404 ended the soak).
            pending = {c.name: c.pending for c in await bus.consumers(stream)}
            lag |= {durable: pending[durable] for s, durable in consumers if s == stream and durable in pending}
        last = (await bus.stream_state(bus.topology.events_stream)).last_seq
        try:
            lag["ledger"] = last - int((await ledger.status())["last_seq"])
        except LedgerError:
            pass  # busy committing a large batch: this sample goes without
        result.samples.append(Sample(time.monotonic() - started, rss, lag, result.completed + result.failed))
        await asyncio.sleep(interval)  # the sampling period


def plot(result: SoakResult, path: Path) -> None:
    canvas = Canvas(1000, 620)
    minutes = f"minutes ({result.in_flight} goals in flight, {result.completed} completed)"
    canvas.chart((90, 40, 980, 280), result.series("rss_mb"), title="RSS (MB)", x_label=minutes)
    canvas.chart((90, 360, 980, 580), result.series("lag"), title="consumer lag (messages pending)",
                 x_label="minutes")
    canvas.save(path)


def report(result: SoakResult, command: str, suite: list[str]) -> str:
    rss, lag = result.series("rss_mb"), result.series("lag")["lag"]
    rss_slopes = result.slopes("rss_mb")
    lines = [
        f"Command: `{command}` ({os.cpu_count()} CPUs, shared; load average {os.getloadavg()[0]:.1f} at the end).",
        "",
        f"### Soak: {result.seconds / 60:.0f} minutes of continuous goals",
        "",
        (f"Every role as its own process (ledger included), one nats-server (file storage), {result.in_flight} "
         f"goals in flight at all times, sim model calls. {result.completed} goals completed, {result.failed} "
         f"failed ({result.goals_per_minute:.1f} goals/min). Fits leave out the first {WARM_UP:.0%} (warm-up)."),
        "",
        "| process | RSS after warm-up | RSS at the end | slope after warm-up |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, pts in rss.items():
        steady = result.steady(pts)
        lines.append(f"| {name} | {steady[0][1]:.1f} MB | {pts[-1][1]:.1f} MB | {rss_slopes[name]:+.2f} MB/min |")
    steady_lag = [v for _, v in result.steady(lag)]
    lines += [
        "",
        (f"Consumer lag (messages pending over every role's durable consumer, plus events not yet in the "
         f"ledger): max {max(steady_lag):.0f}, mean "
         f"{statistics.fmean(steady_lag):.1f}, slope {result.slopes('lag')['lag']:+.2f} messages/min after the "
         "warm-up."),
        "",
        f"![soak: RSS and consumer lag over time]({PNG.name})",
    ]
    if suite:
        lines += ["", "### Fault suite (`MESH_LONG=1 .venv/bin/python -m pytest tests/reliability -s -k 'not soak'`)",
                  "", *[f"- {line}" for line in suite]]
    return "\n".join(lines)


def run_suite() -> list[str]:
    """The reliability tests' long variants; their ``figure:`` lines (what each one measured)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/reliability", "-s", "-q", "-p", "no:cacheprovider",
                           "-k", "not soak"], cwd=ROOT, env=os.environ | {"MESH_LONG": "1"},
                          capture_output=True, text=True, check=False)
    figures = re.findall(r"figure: (.*)$", proc.stdout, re.MULTILINE)  # pytest may print a "." before it
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "no output"
    return [*figures, f"pytest: {summary}"]


async def _main(minutes: float, in_flight: int, interval: float) -> SoakResult:
    with tempfile.TemporaryDirectory(prefix="mesh-soak-") as tmp:
        async with provisioned_nats(Path(tmp) / "nats") as server:
            settings = MeshSettings(nats_url=server.url, data_dir=Path(tmp) / "mesh", ack_wait=10.0)
            return await soak(settings, minutes * 60, Path(tmp) / "logs", in_flight=in_flight, interval=interval,
                              server_pid=server.pid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--in-flight", type=int, default=4, help="goals kept running at once")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--suite", action="store_true", help="also run tests/reliability (long) for its figures")
    args = parse_args(parser, argv, no_write="print only; leave bench/ alone")
    result = asyncio.run(_main(args.minutes, args.in_flight, args.interval))
    suite = run_suite() if args.suite else []
    if not args.no_write:
        plot(result, PNG)
    finish("reliability", report(result, ".venv/bin/python -m bench.soak" + arguments(argv), suite), not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
