"""Helpers for the ledger tests: publish synthetic event bursts, wait for the ledger, compare ledgers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.contracts import Event, encode
from mesh.contracts.events import likely_emitter
from mesh.errors import LedgerError
from mesh.roles.ledger_service import LedgerClient
from mesh.roles.recorder import Recorder
from mesh.store import Ledger, schema
from mesh.store.synthetic import synthetic_events

Eventually = Callable[..., Awaitable[None]]


async def publish_burst(bus: Bus, events: Sequence[Event], *, chunk: int = 1000, pause: float = 0.0) -> None:
    """Publish events as the mesh encodes them, as fast as core NATS takes them (the stream stores
    every message on its subjects; no per-message ack round trip), ``chunk`` at a time."""
    topo = bus.topology
    for i in range(0, len(events), chunk):
        for event in events[i:i + chunk]:
            await bus._nc.publish(topo.event_subject(event.goal_id, likely_emitter(event), event.type), encode(event),
                                 headers={"Nats-Msg-Id": event.event_id})
        await bus._nc.flush()
        if pause:
            await asyncio.sleep(pause)  # shapes the burst's rate; nothing waits on it


async def stream_last_seq(bus: Bus) -> int:
    info = await bus._js.stream_info(bus.topology.events_stream)
    return int(info.state.last_seq)


async def stream_messages(bus: Bus) -> int:
    info = await bus._js.stream_info(bus.topology.events_stream)
    return int(info.state.messages)


async def ledger_caught_up(client: LedgerClient, bus: Bus) -> bool:
    """The ledger service answers and has stored up to the stream's last sequence."""
    try:
        status = await client.status()
    except LedgerError:
        return False
    return int(status["last_seq"]) >= await stream_last_seq(bus)


async def caught_up(eventually: Eventually, client: LedgerClient, bus: Bus, timeout: float = 30) -> None:
    """Wait until the ledger has stored the whole stream."""
    await eventually(lambda: ledger_caught_up(client, bus), timeout=timeout, message="ledger caught up")


def burst(count: int, seed: int = 1) -> list[Event]:
    return list(synthetic_events(count, seed=seed))


def tables(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every table of a ledger file, rows sorted."""
    with Ledger(path, read_only=True) as ledger:
        cursor = ledger.cursor()
        return {t: cursor.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in schema.TABLES}


@asynccontextmanager
async def recording(bus: Bus, settings: MeshSettings, batch_size: int = 500) -> AsyncIterator[Recorder]:
    """An in-process recorder (the ledger role) for the duration of the block."""
    recorder = Recorder(bus, settings, batch_size=batch_size)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(recorder.run())
        await asyncio.wait_for(recorder.ready.wait(), 30)
        try:
            yield recorder
        finally:
            recorder.stop()
