"""bench/gateway: what the HTTP front door adds to an event's way out, and what 200 streams cost it.

One nats-server, one `mesh gateway` process (the real command, its own process so its CPU can be read
from /proc), and this process as publisher and clients.

    (1) latency   events published on the bus at a steady rate; each one's age (now − event.at, same
                  clock) when it reaches (a) a ``MeshClient.watch`` in this process — what `mesh watch`
                  reads — and (b) an SSE client of ``GET /v1/goals/{id}/events`` through the gateway.
    (2) fan-out   ``--clients`` SSE clients on one goal; the gateway's CPU time (utime + stime) over the
                  run divided by the events it delivered, and whether every client got every event
                  (none fell behind: the last event's age per client).

    .venv/bin/python -m bench.gateway            # writes the "gateway" section of bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.results import finish, parse_args
from mesh.bus import Bus
from mesh.client import MeshClient
from mesh.config import MeshSettings
from mesh.contracts import ArtifactRef, GoalCompleted, StepProgress, new_id
from mesh.embedded.child import ChildProcess
from mesh.embedded.natsserver import free_port
from mesh.embedded.readiness import wait_http
from tests.meshkit import provisioned_nats

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def age_ms(at: str | datetime) -> float:
    when = datetime.fromisoformat(at) if isinstance(at, str) else at
    return (datetime.now(UTC) - when).total_seconds() * 1000


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


async def sse_events(http: httpx.AsyncClient, goal: str) -> AsyncIterator[dict[str, object]]:
    async with http.stream("GET", f"/v1/goals/{goal}/events") as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                yield json.loads(line[6:])


async def publish(bus: Bus, goal: str, n: int, rate: float) -> None:
    """``n`` progress events at ``rate`` a second, then the goal's final event."""
    start = time.monotonic()
    for i in range(n):
        await bus.emit(StepProgress(goal_id=goal, step_id="s", role="planner", message=f"event {i}"))
        await asyncio.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))  # pacing, not synchronisation
    await bus.emit(GoalCompleted(goal_id=goal, result=ArtifactRef(digest="0" * 64, size=0)))


async def warm(bus: Bus, goal: str, seen: list[asyncio.Event]) -> None:
    """One event every receiver must see before the clock starts (their subscriptions are live then)."""
    await bus.emit(StepProgress(goal_id=goal, step_id="s", role="planner", message="warm-up"))
    await asyncio.gather(*(e.wait() for e in seen))


async def latency(bus: Bus, client: MeshClient, http: httpx.AsyncClient, n: int, rate: float) -> dict[str, list[float]]:
    goal = new_id()
    ages: dict[str, list[float]] = {"watch": [], "sse": []}
    ready = {k: asyncio.Event() for k in ages}

    async def via_watch() -> None:
        async with aclosing(client.watch(goal, from_seq=0, until_final=True)) as feed:
            async for _, event in feed:
                if isinstance(event, StepProgress) and event.message == "warm-up":
                    ready["watch"].set()
                elif isinstance(event, StepProgress):
                    ages["watch"].append(age_ms(event.at))

    async def via_sse() -> None:
        async for data in sse_events(http, goal):
            if data.get("message") == "warm-up":
                ready["sse"].set()
            elif data["type"] == "step.progress":
                ages["sse"].append(age_ms(str(data["at"])))

    async with asyncio.TaskGroup() as tg:
        tg.create_task(via_watch())
        tg.create_task(via_sse())
        await warm(bus, goal, list(ready.values()))
        await publish(bus, goal, n, rate)
    return ages


async def fan_out(bus: Bus, http: httpx.AsyncClient, pids: tuple[int, int], clients: int, n: int,
                  rate: float) -> tuple[dict[str, float], list[int], list[float], list[float]]:
    """CPU seconds of the gateway, nats-server and this process (the clients) over the run; events per client;
    each client's last event's age; every delivery's age."""
    goal = new_id()
    got = [0] * clients
    last_age = [0.0] * clients
    ages: list[float] = []
    ready = [asyncio.Event() for _ in range(clients)]

    async def one(i: int) -> None:
        async for data in sse_events(http, goal):
            if data.get("message") == "warm-up":
                ready[i].set()
            elif data["type"] == "step.progress":
                got[i] += 1
                last_age[i] = age_ms(str(data["at"]))
                ages.append(last_age[i])

    async with asyncio.TaskGroup() as tg:
        for i in range(clients):
            tg.create_task(one(i))
        await warm(bus, goal, ready)
        before = (cpu_seconds(pids[0]), cpu_seconds(pids[1]), time.process_time())
        await publish(bus, goal, n, rate)
    after = (cpu_seconds(pids[0]), cpu_seconds(pids[1]), time.process_time())
    cpu = {k: a - b for k, a, b in zip(("gateway", "nats-server", "clients"), after, before, strict=True)}
    return cpu, got, last_age, ages


async def run(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        async with provisioned_nats(Path(tmp) / "nats") as server:
            settings = MeshSettings(nats_url=server.url, data_dir=Path(tmp) / "mesh")
            port = free_port()
            env = {**os.environ, "MESH_NATS_URL": server.url, "MESH_DATA_DIR": str(Path(tmp) / "mesh"),
                   "MESH_LOG_LEVEL": "WARNING"}
            gateway = ChildProcess([sys.executable, "-m", "mesh", "gateway", "--port", str(port)],
                                   Path(tmp) / "gateway.log", what="gateway", env=env)
            gateway.start()
            try:
                url = f"http://127.0.0.1:{port}"
                await wait_http(f"{url}/healthz", gateway)
                limits = httpx.Limits(max_connections=args.clients + 10, max_keepalive_connections=args.clients + 10)
                async with await Bus.connect(settings, name="bench-publisher", role="planner") as bus, \
                        MeshClient.connect(settings, name="bench-watch") as client, \
                        httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:
                    ages = await latency(bus, client, http, args.events, args.rate)
                    assert server.pid is not None and gateway.pid is not None
                    cpu, got, last, all_ages = await fan_out(bus, http, (gateway.pid, server.pid), args.clients,
                                                             args.fan_events,
                                                             args.fan_rate)
            finally:
                await gateway.stop(10)
    delivered = sum(got)
    load = os.getloadavg()[0]
    rows = [
        "| measure | result |", "| --- | --- |",
        (f"| event age at a `MeshClient.watch` (what `mesh watch` reads), p50 / p99 | "
        f"{pct(ages['watch'], .5):.2f} / {pct(ages['watch'], .99):.2f} ms |"),
        (f"| event age at an SSE client through the gateway, p50 / p99 | "
        f"{pct(ages['sse'], .5):.2f} / {pct(ages['sse'], .99):.2f} ms |"),
        f"| gateway's share, p50 | +{pct(ages['sse'], .5) - pct(ages['watch'], .5):.2f} ms |",
        (f"| {args.clients} SSE clients × {args.fan_events} events at {args.fan_rate:g}/s: gateway CPU per delivered "
        f"event | {cpu['gateway'] / max(delivered, 1) * 1e6:.0f} µs ({cpu['gateway']:.2f} s CPU for {delivered:,} "
         f"deliveries; meanwhile nats-server {cpu['nats-server']:.2f} s, the clients' process {cpu['clients']:.2f} s) |"),
        f"| clients that got every event | {sum(g == args.fan_events for g in got)} of {args.clients} |",
        (f"| event age at those clients, p50 / p99; last event's age, worst client | "
        f"{pct(all_ages, .5):.1f} / {pct(all_ages, .99):.1f} ms; {max(last):.1f} ms |"),
    ]
    return (f"Command: `.venv/bin/python -m bench.gateway --events {args.events} --rate {args.rate:g} --clients "
            f"{args.clients} --fan-events {args.fan_events} --fan-rate {args.fan_rate:g}` (2-core machine shared "
            f"with other work, 1-minute load average {load:.1f} at the end; the clients run in the publisher's "
            f"process, the gateway in its own). Event age = receive time − the event's `at`, one clock.\n\n"
            + "\n".join(rows) + f"\n\nMedian latencies: watch {statistics.median(ages['watch']):.2f} ms, "
            f"SSE {statistics.median(ages['sse']):.2f} ms over {len(ages['sse'])} events.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=500)
    p.add_argument("--rate", type=float, default=100.0, help="events a second in the latency run")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--fan-events", type=int, default=100)
    p.add_argument("--fan-rate", type=float, default=10.0, help="events a second in the fan-out run")
    args = parse_args(p, argv)
    finish("gateway", asyncio.run(run(args)), not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
