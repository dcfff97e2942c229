"""bench/ledger: DuckDB ingest of the event stream, batched vs row by row, and query latency, in one run.

    (1) batch sizes   the first ``--sweep`` synthetic events ingested through ``Ledger.ingest`` (the
                      recorder's path: one columnar append + SQL folds into every derived table + the
                      high-water mark, one transaction per batch) at several batch sizes, fresh file each.
    (2) row by row    the first ``--rowwise`` of the same events inserted with ``executemany`` into the
                      events table only (one transaction per 1,000 rows) — the naive way, doing less work
                      than (1), which fills seven derived tables as well.
    (3) sustained     ``--events`` events (default 1M) through ``Ledger.ingest`` at ``--batch`` into one
                      file, generated as it goes; only the ``ingest`` calls are timed.
    (4) queries       on that file: ``goal_summary`` of single goals (random sample), the latest 50 goals,
                      ``usage`` by tier and ``routing_stats``; medians and p95 of repeated runs.
    (5) recorder      end to end: ``--recorder`` events already in ``MESH_EVENTS`` (a real nats-server),
                      then the ledger role starts: time until they are all committed — pull, decode,
                      ingest, ack — at the role's batch sizes.

The data is ``mesh.store.synthetic``: whole goals (plan, routed steps, backend and tool calls, retries,
artifacts with lineage), about 45 events per goal, ~400 bytes of JSON per event.

    .venv/bin/python -m bench.ledger              # writes the "ledger" section of bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.results import finish, parse_args
from mesh.bus import Bus, Topology
from mesh.config import MeshSettings
from mesh.contracts import Event, encode
from mesh.contracts.events import likely_emitter
from mesh.roles.recorder import Recorder
from mesh.store import Ledger
from mesh.store.query import LedgerQueries
from mesh.store.synthetic import synthetic_events
from tests.meshkit import provisioned_nats

TOPO = Topology()
SWEEP_BATCHES = (1_000, 2_000, 10_000, 20_000, 50_000)
RECORDER_BATCHES = (2_000, 20_000)
Item = tuple[int, str, Event]


def numbered(events: Iterable[Event]) -> Iterator[Item]:
    for seq, event in enumerate(events, start=1):
        yield seq, TOPO.event_subject(event.goal_id, likely_emitter(event), event.type), event


def chunked(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


class Meter:
    """Events over wall time and over this process's CPU time (every thread): on a shared machine
    the wall rate drops with the load, the CPU rate much less."""

    def __init__(self) -> None:
        self.events, self.wall, self.cpu = 0, 0.0, 0.0

    @contextmanager
    def measure(self) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu

    @property
    def rate(self) -> float:
        return self.events / self.wall

    @property
    def cpu_rate(self) -> float:
        return self.events / self.cpu


def batched_rate(path: Path, items: Iterable[Item], batch: int) -> Meter:
    """``Ledger.ingest`` of ``items`` in batches into a fresh file; only the ingest calls count."""
    meter = Meter()
    with Ledger(path) as ledger:
        for chunk in chunked(items, batch):
            with meter.measure():
                meter.events += ledger.ingest(chunk)
    return meter


def rowwise_rate(path: Path, items: list[Item]) -> Meter:
    """``executemany`` into the events table, rows built from the same events."""
    meter = Meter()
    with Ledger(path) as ledger, meter.measure():
        cursor = ledger.cursor()
        for chunk in chunked(items, 1_000):
            rows = [(seq, subject, e.event_id, e.goal_id, e.type, e.at, e.node, e.model_dump_json())
                    for seq, subject, e in chunk]
            cursor.execute("BEGIN TRANSACTION")
            cursor.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            cursor.execute("COMMIT")
            meter.events += len(rows)
    return meter


def latency(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """(median, p95) milliseconds of ``runs`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.95))]


async def recorder_rates(root: Path, count: int) -> list[tuple[int, float]]:
    """(batch size, events/s) of the ledger role catching up on ``count`` stored events."""
    async with provisioned_nats(root / "nats") as server:
        settings = MeshSettings(nats_url=server.url, data_dir=root / "mesh")
        async with await Bus.connect(settings, name="bench-ledger") as bus:
            for event in synthetic_events(count, seed=2):  # core publishes: the stream stores them all
                await bus._nc.publish(TOPO.event_subject(event.goal_id, likely_emitter(event), event.type), encode(event))
            await bus._nc.flush()
            while (await bus._js.stream_info(bus.topology.events_stream)).state.last_seq < count:
                await asyncio.sleep(0.05)
            rates = []
            for size in RECORDER_BATCHES:
                path = root / f"recorder-{size}.duckdb"
                recorder = Recorder(bus, settings, batch_size=size, path=path)
                started = time.perf_counter()
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(recorder.run())
                    while recorder.committed < count:
                        await asyncio.sleep(0.01)
                    rates.append((size, count / (time.perf_counter() - started)))
                    recorder.stop()
            return rates


def main(events: int, batch: int, sweep_n: int, rowwise_n: int, recorder: int, write: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        sample = list(numbered(synthetic_events(max(sweep_n, rowwise_n), seed=0)))
        generated = len(sample) / (time.perf_counter() - started)
        print(f"generated {len(sample)} events ({generated:,.0f}/s)")

        sweep = []
        for size in SWEEP_BATCHES:
            sweep.append((size, batched_rate(root / f"sweep-{size}.duckdb", sample[:sweep_n], size)))
            print(f"batch {size:>6}: {sweep[-1][1].rate:>9,.0f} events/s")
        rowwise = rowwise_rate(root / "rowwise.duckdb", sample[:rowwise_n])
        print(f"row by row: {rowwise.rate:,.0f} events/s")
        del sample

        big = root / "big.duckdb"
        sustained = batched_rate(big, numbered(synthetic_events(events, seed=1)), batch)
        print(f"sustained, {sustained.events} events at batch {batch}: {sustained.rate:,.0f} events/s")

        with Ledger(big) as ledger:
            queries = LedgerQueries(ledger, timeout=60, max_rows=100_000)
            goal_ids = [r[0] for r in ledger.cursor().execute("SELECT goal_id FROM goals").fetchall()]
            picks = iter(random.Random(7).choices(sorted(goal_ids), k=10_000))
            query_rows = [
                ("`goal_summary(goal_id)`, one goal (200 random goals)",
                 latency(lambda: queries.goal_summary(next(picks)), 200)),
                ("`goal_summary()`, the latest 50 goals", latency(lambda: queries.goal_summary(limit=50), 20)),
                ("`usage()` by tier, all goals", latency(lambda: queries.usage(), 20)),
                ("`routing_stats()`, all decisions", latency(lambda: queries.routing_stats(), 20)),
            ]
        size_mb = os.path.getsize(big) / 2**20
        recorder_rows = asyncio.run(recorder_rates(root, recorder))
        print("recorder:", recorder_rows)

    load = os.getloadavg()[0]
    command = (f"`.venv/bin/python -m bench.ledger --events {events} --batch {batch} --sweep {sweep_n} "
               f"--rowwise {rowwise_n} --recorder {recorder}`")
    ratio, cpu_ratio = sustained.rate / rowwise.rate, sustained.cpu_rate / rowwise.cpu_rate
    body = f"""Command: {command} (2-core machine shared with other work: 1-minute load average {load:.1f}
at the end of the run). Synthetic goals from `mesh.store.synthetic` (~45 events per goal, ~400 bytes
of JSON per event), as decoded `Event` models; only the ingest calls are timed (generating the events,
{generated:,.0f}/s, is not). "per CPU-second" divides by this process's CPU time (all threads): what the
path costs, whatever else the machine was doing.

| ingest | events/s | events per CPU-second |
| --- | --- | --- |
"""
    body += "".join(f"| `Ledger.ingest`, batches of {size:,}, first {sweep_n:,} events (fresh file) | "
                    f"{m.rate:,.0f} | {m.cpu_rate:,.0f} |\n" for size, m in sweep)
    body += f"""| **`Ledger.ingest`, batches of {batch:,}, {sustained.events:,} events into one file (sustained)** | \
**{sustained.rate:,.0f}** | **{sustained.cpu_rate:,.0f}** |
| row-by-row `executemany` into `events` only, first {rowwise_n:,} events, 1,000 rows per transaction | \
{rowwise.rate:,.0f} | {rowwise.cpu_rate:,.0f} |
| **batched (sustained) / row by row** | **{ratio:,.0f}×** | **{cpu_ratio:,.0f}×** |

The batched path does strictly more work than the baseline: besides the raw `events` row it folds
every event into the derived tables (goals, steps, artifacts, route_decisions, backend_calls,
tool_calls, nodes) and stores the stream sequence, all in the batch's one transaction.
Targets: ≥ 50,000 events/s and ≥ 20× row by row.

| query on the {sustained.events:,}-event ledger ({len(goal_ids):,} goals, {size_mb:,.0f} MB file) | p50 | p95 |
| --- | --- | --- |
"""
    body += "".join(f"| {name} | {p50:.1f} ms | {p95:.1f} ms |\n" for name, (p50, p95) in query_rows)
    body += f"""
| ledger role end to end: {recorder:,} events waiting in `MESH_EVENTS` → committed (pull, decode, ingest, ack) | events/s |
| --- | --- |
"""
    body += "".join(f"| batches of {size:,} | {rate:,.0f} |\n" for size, rate in recorder_rows)
    finish("ledger", body, write)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the sustained run and query file")
    parser.add_argument("--batch", type=int, default=20_000,
                        help="batch size of the sustained run (the ledger role's, nodes/ledger.toml)")
    parser.add_argument("--sweep", type=int, default=100_000, help="events per batch-size run")
    parser.add_argument("--rowwise", type=int, default=5_000, help="events inserted row by row")
    parser.add_argument("--recorder", type=int, default=50_000, help="events for the end-to-end recorder run")
    args = parse_args(parser, None)
    main(args.events, args.batch, args.sweep, args.rowwise, args.recorder, not args.no_write)
