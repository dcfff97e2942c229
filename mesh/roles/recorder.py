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
same reason a gap in the sequence (a message dropped between server and client) makes the feed
resubscribe from the mark; a gap right at a (re)start is real — retention or a deleted message.

``rebuild`` replays the whole stream into a fresh file through the same feed, on a temporary consumer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import nats.errors
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from mesh.bus import Bus, DeadLetter
from mesh.config import MeshSettings
from mesh.contracts import Event, new_id
from mesh.errors import BusError, ContractError, LedgerError, SchemaViolation
from mesh.roles.ledger_service import LedgerService
from mesh.store import Ledger
from mesh.store.query import LedgerQueries

log = logging.getLogger(__name__)
T = TypeVar("T")

ROLE = "ledger"
_FETCH_TIMEOUT = 1.0  # seconds a fetch waits for the first message; also how often stop() is noticed
_ACK_WAIT = 120.0  # longer than any batch takes, so a slow commit is not redelivered meanwhile
_YIELD_EVERY = 500  # decoded messages between event-loop yields


@dataclass(slots=True)
class Batch:
    """Decoded messages above the ledger's mark, in stream order."""

    events: list[tuple[int, str, Event]] = field(default_factory=list)
    dead: list[tuple[Msg, ContractError]] = field(default_factory=list)
    upto: int = 0  # the last stream sequence this batch covers (events and dead letters)
    last: Msg | None = None  # the message at ``upto``: acking it acknowledges the batch
    resync: bool = False  # a gap was found after ``upto``: resubscribe from there


class EventFeed:
    """Batches of ``MESH_EVENTS`` messages, in order and without gaps, from a given sequence on."""

    def __init__(self, bus: Bus, *, consumer: str, durable: bool, batch_size: int) -> None:
        self.bus, self.consumer, self.durable, self.batch_size = bus, consumer, durable, batch_size
        self.stream = bus.topology.events_stream
        self._sub: JetStreamContext.PullSubscription | None = None
        self._fresh = True  # nothing read since the consumer was (re)created

    async def open(self, start: int) -> None:
        """(Re)create the consumer to deliver from stream sequence ``start``."""
        await self.close(delete=True)
        config = api.ConsumerConfig(
            name=self.consumer, durable_name=self.consumer if self.durable else None,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
            ack_policy=api.AckPolicy.ALL, ack_wait=_ACK_WAIT, max_deliver=-1,
            max_ack_pending=max(2 * self.batch_size, 1000), filter_subject=self.bus.topology.events_filter(),
            inactive_threshold=None if self.durable else 60.0, num_replicas=self.bus.topology.replicas,
        )
        try:
            await self.bus.js.add_consumer(self.stream, config)
            self._sub = await self.bus.js.pull_subscribe_bind(self.consumer, stream=self.stream)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot create the ledger consumer {self.consumer} on {self.stream}: {exc!r}") from exc
        self._fresh = True

    async def close(self, *, delete: bool) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:
                log.debug("ledger feed unsubscribe: %r", exc)
        if delete:
            try:
                await self.bus.js.delete_consumer(self.stream, self.consumer)
            except NotFoundError:
                pass
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("could not delete consumer %s: %r", self.consumer, exc)

    async def fetch(self) -> list[Msg]:
        """Up to ``batch_size`` messages: what is there now, or what arrives within a second."""
        assert self._sub is not None, "open() first"
        try:
            msgs = await self._sub.fetch(self.batch_size, timeout=_FETCH_TIMEOUT)
        except (nats.errors.TimeoutError, TimeoutError):
            return []
        except nats.errors.Error as exc:  # disconnected, server restarting: the next fetch asks again
            log.info("ledger fetch failed (%r); retrying", exc)
            await asyncio.sleep(_FETCH_TIMEOUT)
            return []
        return sorted(msgs, key=lambda m: m.metadata.sequence.stream)

    async def drained(self) -> bool:
        """True when the consumer has nothing left to deliver."""
        try:
            info = await self.bus.js.consumer_info(self.stream, self.consumer)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot read consumer {self.consumer}: {exc!r}") from exc
        return not info.num_pending and not info.num_ack_pending

    async def decode(self, msgs: list[Msg], mark: int) -> Batch:
        """Decode the messages after ``mark``; stop at a gap (``resync``)."""
        batch = Batch(upto=mark)
        for i, msg in enumerate(msgs):
            seq = msg.metadata.sequence.stream
            if seq <= batch.upto:
                continue  # stored already (a redelivery), or a duplicate within the batch
            if seq != batch.upto + 1 and not self._fresh:
                log.warning("ledger feed: gap after seq %d (next is %d); resubscribing", batch.upto, seq)
                batch.resync = True
                break
            if seq != batch.upto + 1:
                log.warning("stream messages %d..%d no longer exist; the ledger starts at %d",
                            batch.upto + 1, seq - 1, seq)
            self._fresh = False
            try:
                envelope = await self.bus.open(msg)
                if envelope.kind != "event":
                    raise SchemaViolation(f"a {envelope.kind!r} message on the event stream")
                batch.events.append((seq, msg.subject, envelope.message()))
            except ContractError as exc:
                batch.dead.append((msg, exc))
            batch.upto, batch.last = seq, msg
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)  # decoding is CPU work; let queries and heartbeats run
        return batch

    async def ack(self, batch: Batch) -> None:
        """One ack for the whole batch (ack policy ALL); a lost ack only means a harmless redelivery."""
        if batch.last is None:
            return
        try:
            await batch.last.ack()
        except nats.errors.Error as exc:
            log.info("ledger ack of seq %d not sent (%r); the batch will be redelivered and skipped",
                     batch.upto, exc)


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
    """The ledger role for the node runtime: ``run()`` until ``stop()``; ``in_flight`` is the number of
    events being committed right now."""

    def __init__(self, bus: Bus, settings: MeshSettings, *, batch_size: int = 2000,
                 path: Path | None = None) -> None:
        self.bus, self.settings, self.batch_size = bus, settings, batch_size
        self.path = path or settings.ledger_file
        self.in_flight = 0
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()  # set once the ledger is open, the service up and the feed subscribed

    def stop(self) -> None:
        """Finish the batch in hand (commit + ack), then return from ``run()``."""
        self._stop.set()

    async def run(self) -> None:
        writer = await Writer.open(self.path)
        try:
            ledger = writer.ledger
            queries = LedgerQueries(ledger, timeout=self.settings.ledger_query_timeout,
                                    max_rows=self.settings.ledger_max_rows)
            feed = EventFeed(self.bus, consumer=self.bus.topology.consumer_name(ROLE), durable=True,
                             batch_size=self.batch_size)
            async with LedgerService(self.bus.nc, self.bus.topology.prefix, ledger, queries):
                await feed.open(ledger.last_seq() + 1)
                self.ready.set()
                try:
                    await self._record(feed, writer)
                finally:
                    await feed.close(delete=False)
        finally:
            await writer.close()

    async def _record(self, feed: EventFeed, writer: Writer) -> None:
        dlq = self.bus.topology.dlq_subject(ROLE)
        while not self._stop.is_set():
            try:
                batch = await feed.decode(await feed.fetch(), writer.ledger.last_seq())
                for msg, exc in batch.dead:
                    letter = DeadLetter.from_msg(msg, reason=f"{type(exc).__name__}: {exc}",
                                                 error=type(exc).__name__)
                    log.warning("ledger: dead-lettering seq %d: %s", letter.stream_seq, exc)
                    await self.bus.publish_raw(dlq, letter.encode(), headers=letter.nats_headers())
            except BusError as exc:  # nothing was committed: start over from the mark once NATS answers
                log.warning("ledger: %s; resubscribing from seq %d", exc, writer.ledger.last_seq() + 1)
                await asyncio.sleep(_FETCH_TIMEOUT)
                batch = Batch(resync=True)
            if batch.last is not None:
                self.in_flight = len(batch.events)
                try:
                    await writer.ingest(batch)
                finally:
                    self.in_flight = 0
                await feed.ack(batch)
            if batch.resync:
                await self._reopen(feed, writer.ledger.last_seq() + 1)

    async def _reopen(self, feed: EventFeed, start: int) -> None:
        while not self._stop.is_set():
            try:
                await feed.open(start)
                return
            except BusError as exc:
                log.warning("ledger: %s; retrying", exc)
                await asyncio.sleep(_FETCH_TIMEOUT)


async def rebuild(bus: Bus, path: Path, *, until: int | None = None, batch_size: int = 5000) -> int:
    """Replay the event stream, from its first message to its last at call time (or to stream
    sequence ``until``: the ledger as it was then), into a new ledger file at ``path``, which must
    not exist. Poison messages are skipped (the live ledger dead-lettered them already). Returns the
    number of events stored."""
    if path.exists():
        raise LedgerError(f"{path} exists; rebuild writes a fresh file (remove it or choose another path)")
    try:
        info = await bus.js.stream_info(bus.topology.events_stream)
    except (nats.errors.Error, TimeoutError) as exc:
        raise BusError(f"cannot read the state of {bus.topology.events_stream}: {exc!r}") from exc
    target = info.state.last_seq if until is None else min(until, info.state.last_seq)
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
            for msg, exc in batch.dead:
                log.warning("rebuild: skipping seq %d: %s", msg.metadata.sequence.stream, exc)
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
