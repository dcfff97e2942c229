"""The recorder role (``mesh node ledger``): the event stream into the ledger file, exactly once.

How a batch travels::

    fetch ≤ batch_size messages (JetStream pull consumer on MESH_EVENTS, ack policy ALL)
      → decode them (poison → dead letter on <prefix>.dlq.ledger)
      → Ledger.ingest: rows + the last stream sequence in ONE DuckDB transaction (in a thread)
      → ONE ack, of the batch's last message, which acknowledges the whole batch

A crash before the commit loses nothing (the batch is redelivered); a crash between commit and ack
duplicates nothing (the redelivered sequences are at or below the stored mark and are skipped).

The ledger file, not the consumer, is the cursor: at start the consumer is recreated to deliver
from ``last_seq + 1``. Otherwise messages delivered to a killed process would sit out ``ack_wait``
while newer ones flow, and the first ack-all after a restart would acknowledge them unread. For the
same reason a gap in the sequence makes the feed resubscribe from the mark (``mesh.bus.feed``).

``rebuild`` replays the whole stream into a fresh file through the same feed, on a temporary consumer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from mesh.bus import Bus, DeadLetter
from mesh.bus.feed import Batch, EventFeed
from mesh.config import MeshSettings
from mesh.contracts import new_id
from mesh.errors import BusError, LedgerError
from mesh.roles.ledger_service import LedgerService
from mesh.store import Ledger
from mesh.store.query import LedgerQueries

log = logging.getLogger(__name__)
T = TypeVar("T")

ROLE = "ledger"
_RETRY = 1.0  # seconds between attempts to resubscribe while NATS does not answer


class Writer:
    """A ledger whose writer connection is used from one dedicated thread, so an ingest whose caller
    was cancelled still finishes (commits or rolls back) before ``close`` runs."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ledger-writer")

    @classmethod
    async def open(cls, path: Path) -> Writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(await asyncio.to_thread(Ledger, path))

    async def _call(self, fn: Callable[..., T], *args: object, **kw: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, lambda: fn(*args, **kw))

    async def ingest(self, batch: Batch) -> None:
        await self._call(self.ledger.ingest, batch.events, upto=batch.upto)

    async def close(self) -> None:
        try:
            await self._call(self.ledger.close)
        finally:
            self._thread.shutdown(wait=False)


class Recorder:
    """The ledger role for the node runtime: ``run()`` until ``stop()``. ``in_flight`` is the number of
    events being committed right now, ``committed`` the last stream sequence in the ledger."""

    def __init__(self, bus: Bus, settings: MeshSettings, *, batch_size: int = 20_000,
                 path: Path | None = None) -> None:
        self.bus, self.settings, self.batch_size = bus, settings, batch_size
        self.path = path or settings.ledger_file
        self.in_flight = 0
        self.committed = 0
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()  # set once the ledger is open, the service up and the feed subscribed

    def stop(self) -> None:
        """Finish the batch in hand (commit + ack), then return from ``run()``."""
        self._stop.set()

    async def run(self) -> None:
        writer = await self._open()
        try:
            ledger = writer.ledger
            queries = LedgerQueries(ledger, timeout=self.settings.ledger_query_timeout,
                                    max_rows=self.settings.ledger_max_rows,
                                    max_bytes=self.settings.ledger_max_result_bytes)
            feed = EventFeed(self.bus, consumer=self.bus.topology.consumer_name(ROLE), durable=True,
                             batch_size=self.batch_size)
            async with LedgerService(self.bus, ledger, queries, max_concurrent=self.settings.ledger_max_queries):
                await feed.open(ledger.last_seq() + 1)
                self.ready.set()
                try:
                    await self._record(feed, writer)
                finally:
                    await feed.close(delete=False)
        finally:
            await writer.close()

    async def _open(self) -> Writer:
        """The ledger file for the current events stream. A file that recorded another stream (the
        stream was deleted and recreated, e.g. with the embedded server's data) would skip the new
        stream's first sequences: it is set aside as ``<name>.<stream identity time>.duckdb``."""
        info = await self.bus.stream_state(self.bus.topology.events_stream)
        source = f"{info.name}@{info.created.isoformat()}" if info.created else None
        writer = await Writer.open(self.path)
        claimed = writer.ledger.source()
        if source is None or claimed == source:
            return writer
        if claimed is not None:
            await writer.close()
            stamp = "".join(c for c in claimed.rpartition("@")[2] if c.isalnum())
            aside = self.path.with_name(f"{self.path.stem}.{stamp}{self.path.suffix}")
            for old, new in ((self.path, aside), (Path(f"{self.path}.wal"), Path(f"{aside}.wal"))):
                if old.exists():
                    old.rename(new)
            log.warning("ledger %s recorded another %s (%s, now %s); set aside, starting a new file",
                        self.path, self.bus.topology.events_stream, claimed, source)
            writer = await Writer.open(self.path)
        writer.ledger.claim_source(source)
        return writer

    async def _record(self, feed: EventFeed, writer: Writer) -> None:
        """Fetch and decode the next batch while the previous one commits (DuckDB runs much of a
        commit without the GIL; decoding needs it), yet commit and ack strictly in stream order."""
        self.committed = writer.ledger.last_seq()
        mark = self.committed  # the last sequence decoded, committed or not
        committing: asyncio.Task[None] | None = None
        async with asyncio.TaskGroup() as tg:
            while not self._stop.is_set():
                batch = await self._next(feed, mark)
                if committing is not None:
                    await committing
                    committing = None
                if batch.last is not None:
                    mark = batch.upto
                    committing = tg.create_task(self._commit(feed, writer, batch))
                if batch.resync:
                    if committing is not None:
                        await committing
                        committing = None
                    mark = writer.ledger.last_seq()
                    await self._reopen(feed, mark + 1)

    async def _next(self, feed: EventFeed, mark: int) -> Batch:
        """The next decoded batch after ``mark``, its poison already dead-lettered."""
        try:
            batch = await feed.decode(await feed.fetch(), mark)
            for msg, exc in batch.dead:
                error = type(exc).__name__
                letter = DeadLetter.from_msg(msg, reason=f"{error}: {exc}", error=error)
                log.warning("ledger: dead-lettering seq %d: %s", letter.stream_seq, exc)
                await self.bus.publish_raw(self.bus.topology.dlq_subject(ROLE), letter.encode(),
                                           headers=letter.nats_headers())
            return batch
        except BusError as exc:  # nothing of this batch was committed: start over from the mark
            log.warning("ledger: %s; resubscribing", exc)
            await asyncio.sleep(_RETRY)
            return Batch(upto=mark, resync=True)

    async def _commit(self, feed: EventFeed, writer: Writer, batch: Batch) -> None:
        self.in_flight = len(batch.events)
        try:
            await writer.ingest(batch)
        finally:
            self.in_flight = 0
        self.committed = batch.upto
        await feed.ack(batch)

    async def _reopen(self, feed: EventFeed, start: int) -> None:
        while not self._stop.is_set():
            try:
                await feed.open(start)
                return
            except BusError as exc:
                log.warning("ledger: %s; retrying", exc)
                await asyncio.sleep(_RETRY)


async def rebuild(bus: Bus, path: Path, *, until: int | None = None, batch_size: int = 20_000) -> int:
    """Replay the event stream, from its first message to its last at call time (or to stream
    sequence ``until``: the ledger as it was then), into a new ledger file at ``path``, which must
    not exist. Poison messages are skipped (the live ledger dead-lettered them already). Returns the
    number of events stored."""
    if path.exists():
        raise LedgerError(f"{path} exists; rebuild writes a fresh file (remove it or choose another path)")
    info = await bus.stream_state(bus.topology.events_stream)
    target = info.last_seq if until is None else min(until, info.last_seq)
    stored = 0
    writer = await Writer.open(path)
    feed = EventFeed(bus, consumer=f"ledger-rebuild-{new_id()[:8]}", durable=False, batch_size=batch_size)
    try:
        await feed.open(1)
        while writer.ledger.last_seq() < target:
            msgs = await feed.fetch()
            if not msgs and await feed.drained():
                break  # the stream's tail was deleted after we looked
            batch = await feed.decode([m for m in msgs if m.metadata.sequence.stream <= target],
                                      writer.ledger.last_seq())
            for msg, reason in batch.dead:
                log.warning("rebuild: skipping seq %d: %s", msg.metadata.sequence.stream, reason)
            if batch.last is not None:
                await writer.ingest(batch)
                await feed.ack(batch)  # frees max_ack_pending for the next batch
                stored += len(batch.events)
            if batch.resync:
                await feed.open(writer.ledger.last_seq() + 1)
    finally:
        await feed.close(delete=True)
        await writer.close()
    return stored
