"""Batches of ``MESH_EVENTS`` messages for the ledger: in stream order, without gaps, one ack each.

Pulling. A batch is fetched with JetStream's pull protocol spoken directly (``mesh.bus.pull``, the
core the task consumer uses too), on one inbox whose callback only collects: a ``no_wait`` request takes whatever is stored right now (up
to ``batch_size``, ended by a 404 status); when there is nothing, a one-message request waits up to
a second and, once something arrives, a second ``no_wait`` request takes the rest. nats-py's
``fetch`` does the same but awaits each message with its own timeout, which costs about as much
per message as decoding it. A message from a request written off by a timeout (server restart) may
arrive later; it is collected then, and ordering below sorts it in.

Order. The consumer is created to deliver from a given sequence; ``decode`` takes messages after
the caller's mark in order and stops at a gap. A gap right after (re)creating the consumer is real
(retention or a deleted message: the first message delivered is the first that exists); any other
gap means a message went missing between server and client, and the caller resubscribes from its mark.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import nats.errors
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import NotFoundError

from mesh.bus.client import Bus, event_of
from mesh.bus.pull import PullInbox, PullStatus
from mesh.contracts import Event
from mesh.contracts.codec import EVENT_HISTORY_MAJORS
from mesh.errors import BusError, ContractError, ForgedEvent

log = logging.getLogger(__name__)

_WAIT = 1.0  # seconds a request for the next message waits (and how often a stop is noticed)
_GRACE = 2.0  # beyond a request's own expiry, before it is written off as lost
_ACK_WAIT = 120.0  # longer than any batch takes to commit, so none is redelivered meanwhile
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
    """A pull consumer (ack policy ALL) on the events stream, recreated at a chosen sequence."""

    def __init__(self, bus: Bus, *, consumer: str, durable: bool, batch_size: int,
                 batch_bytes: int | None = None) -> None:
        self.bus, self.consumer, self.durable, self.batch_size = bus, consumer, durable, batch_size
        self.batch_bytes = batch_bytes or bus.settings.ledger_batch_bytes
        self.stream = bus.topology.events_stream
        self._pulls = PullInbox(bus, self.stream, consumer, on_message=self._collect, on_status=self._ended)
        self._arrived: list[Msg] = []
        self._want = 0  # messages that complete the open request
        self._done = asyncio.Event()  # the open request ended (404/408/409 status) or got its batch
        self._fresh = True  # nothing read since the consumer was (re)created

    # --- consumer lifecycle ----------------------------------------------------------------------

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
            await self.bus._js.add_consumer(self.stream, config)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot create the ledger consumer {self.consumer} on {self.stream}: "
                           f"{exc!r}") from exc
        await self._pulls.open()
        self._arrived.clear()
        self._fresh = True

    async def close(self, *, delete: bool) -> None:
        await self._pulls.close()
        if delete:
            try:
                await self.bus._js.delete_consumer(self.stream, self.consumer)
            except NotFoundError:
                pass
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("could not delete consumer %s: %r", self.consumer, exc)

    async def drained(self) -> bool:
        """True when the consumer has nothing left to deliver."""
        try:
            info = await self.bus._js.consumer_info(self.stream, self.consumer)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot read consumer {self.consumer}: {exc!r}") from exc
        return not info.num_pending and not info.num_ack_pending

    # --- pulling ---------------------------------------------------------------------------------

    def _collect(self, msg: Msg) -> None:
        self._arrived.append(msg)
        if len(self._arrived) >= self._want:
            self._done.set()

    def _ended(self, status: PullStatus) -> None:
        """404 no messages, 408 expired, 409 …: the request is over."""
        if status.code not in ("404", "408"):
            log.info("ledger feed: pull status %s %s", status.code, status.description)
        self._done.set()

    async def _pull(self, batch: int, *, wait: float | None) -> None:
        """One pull request; returns when it ended, its batch arrived, or it is written off."""
        self._want = len(self._arrived) + batch
        self._done.clear()
        # never below two messages of the largest size: a message above a request's max_bytes is never delivered
        await self._pulls.request(batch, expires=wait, max_bytes=max(self.batch_bytes, 2 * self.bus.max_payload))
        try:
            await asyncio.wait_for(self._done.wait(), (wait or 0.0) + _GRACE)
        except TimeoutError:
            log.info("ledger feed: pull request unanswered for %.0fs; asking again", (wait or 0.0) + _GRACE)

    async def fetch(self) -> list[Msg]:
        """Up to ``batch_size`` messages: what is stored now, or what arrives within a second."""
        try:
            if not self._arrived:
                await self._pull(self.batch_size, wait=None)
            if not self._arrived:
                await self._pull(1, wait=_WAIT)
                if self._arrived:
                    await self._pull(self.batch_size - len(self._arrived), wait=None)
        except BusError as exc:  # disconnected, server restarting: the next fetch asks again
            log.info("ledger: %s; retrying", exc)
            await asyncio.sleep(_WAIT)
        msgs, self._arrived = self._arrived, []
        return sorted(msgs, key=lambda m: m.metadata.sequence.stream)

    # --- decoding and acking ---------------------------------------------------------------------

    async def decode(self, msgs: list[Msg], mark: int) -> Batch:
        """Decode the messages after ``mark``; stop at a gap (``resync``), or once the batch holds
        ``batch_bytes`` (messages plus claim-checked bodies): the rest is the next ``fetch``'s."""
        batch = Batch(upto=mark)
        size = 0
        for i, msg in enumerate(msgs):
            if size >= self.batch_bytes:
                self._arrived[:0] = msgs[i:]
                break
            seq = msg.metadata.sequence.stream
            if seq <= batch.upto:
                continue  # stored already (a redelivery), or a duplicate within the batch
            if seq != batch.upto + 1 and not self._fresh:
                log.warning("ledger feed: gap after seq %d (next is %d); resubscribing", batch.upto, seq)
                batch.resync = True
                break
            if seq != batch.upto + 1:
                log.warning("stream messages %d..%d no longer exist; the ledger goes on from %d",
                            batch.upto + 1, seq - 1, seq)
            self._fresh = False
            size += len(msg.data)
            try:
                envelope = await self.bus.open(msg, majors=EVENT_HISTORY_MAJORS)
                event = event_of(envelope)
                if reason := self.bus.topology.forged(msg.subject, event):
                    raise ForgedEvent(reason)
                size += envelope.size - len(msg.data)  # its claim-checked body, if any
                batch.events.append((seq, msg.subject, event))
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
