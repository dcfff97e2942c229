"""The pull-consumer loop every role runs: bounded concurrency, in-progress acks, retries, dead letters.

How it pulls. The loop speaks the JetStream pull protocol itself (``mesh.bus.pull``: a request on
``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`` answered on one long-lived inbox) instead of
nats-py's ``PullSubscription.fetch``, for three reasons:

* **never more than it can work** — it only ever has ``concurrency - in_flight`` messages requested.
  ``fetch(batch=n)`` also holds a partial batch back until its timeout (a lone task waits a whole
  fetch timeout) and hands back stragglers from earlier timed-out fetches beyond ``batch``;
* **each message starts the moment it arrives**, not when a batch completes;
* **server restarts** — a restarted server forgets the pending pull requests, and the client
  re-sends only its SUB on reconnect, so a loop that waits for those requests waits forever
  (nats.py#504, nats.go#890). Requests here carry an idle heartbeat; when nothing (message,
  heartbeat or status) arrives for ``2.5 × heartbeat`` the outstanding requests are written off
  and re-issued. While disconnected no requests are sent (none pile up in the client's buffer to
  be replayed later). A missing consumer (503 / 409 "consumer deleted") is re-created; a missing stream
  (a server that lost its data) waits, logged, for the admin's ``mesh provision``.

What happens to a message, by handler outcome:

* returns → ``ack``. Plain acks (as nats.go sends them) by default: the server confirming each one
  (``confirm_acks=True``, ``ack_sync``) costs a round trip per message — measured at half the
  consumer's throughput — and buys no stronger guarantee, since a confirmation can time out just as
  ambiguously. An ack lost with a dropped connection means one redelivery, which idempotent
  handlers (dedupe ids, CAS state) absorb. ``run()`` flushes before it returns, so the acks of a
  drained consumer are on the wire;
* raises ``CodecError`` / ``SchemaViolation`` (poison: no retry can help) → dead letter + ``term``;
* raises anything else → ``Delivery.gives_up`` decides, the one rule every role asks too: an error
  whose class is not retryable (``mesh.errors.retryable``: ``PermanentBackendError``, ``PayloadRefused``…), or the
  delivery numbered ``max_deliver``, → dead letter + ``term``; otherwise ``nak`` with a delay of
  ``nak_delay × 2^(attempt-1)`` (at least a ``RateLimited.retry_after``, at most ``max_nak_delay``);
* whenever the loop gives up on a message it could decode, ``on_give_up`` (if given) hears of it
  first, so the role can fail the step or goal it stood for with the reason;
* the handler is cancelled (``run()`` cancelled: shutdown, a drain timeout) → ``nak``: another
  replica gets it at once;
* the process dies (kill -9, OOM) → no ack; the server redelivers after ``ack_wait``.

While a message is held (handler running, or waiting for a worker slot) it gets an in-progress ack
every ``ack_wait / 3``, so a long model call is not redelivered. Dead letters: see ``mesh.bus.dlq``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import nats.errors
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from mesh.aio import unless_set
from mesh.bus.client import Bus
from mesh.bus.dlq import DeadLetter
from mesh.bus.pull import PullInbox, PullStatus
from mesh.contracts.codec import Envelope
from mesh.errors import BusError, CodecError, NotConnected, PayloadRefused, SchemaViolation, retryable

log = logging.getLogger(__name__)

M = TypeVar("M")
Handler = Callable[["Delivery"], Awaitable[None]]
# Told when the loop gives up on a decoded message (a non-retryable error, or its last delivery), just
# before the message is dead-lettered: the role announces the outcome (a step or goal failed with the
# reason) so that the work it stood for does not wait forever on a message nobody will deliver again.
GiveUp = Callable[["Delivery", BaseException], Awaitable[None]]

def gives_up(exc: BaseException, attempt: int, max_deliver: int) -> bool:
    """No retry for an error whose class says retrying cannot help, nor after the last delivery."""
    return not retryable(exc) or attempt >= max_deliver


_HEARTBEAT = 1.0  # idle heartbeat asked of the server on every pull request
_EXPIRES = 10.0  # pull requests end after this and are renewed
_LOST_AFTER = 2.5 * _HEARTBEAT  # silence after which outstanding requests count as lost
_ACK_TIMEOUT = 5.0
_DLQ_PUBLISH_TRIES = 4
_FLUSH_TIMEOUT = 5  # nats-py types it as int seconds


@dataclass(slots=True)
class Delivery:
    """One delivered message: its envelope (claim-check resolved), the raw NATS message, which attempt
    of how many the consumer makes."""

    envelope: Envelope
    msg: Msg
    attempt: int
    subject: str
    max_deliver: int

    def message(self, expect: type[M]) -> M:
        """The validated body; ``SchemaViolation`` (poison) when it does not match ``expect``."""
        return self.envelope.message(expect)

    def gives_up(self, exc: BaseException) -> bool:
        """Whether the consumer gives up on this message if the handler raises ``exc``: the one retry rule.
        A role that must announce an outcome asks this first and re-raises only what will be retried."""
        return gives_up(exc, self.attempt, self.max_deliver)

    async def progress(self) -> None:
        """An explicit in-progress ack (the loop sends them on its own every ack_wait / 3)."""
        with contextlib.suppress(nats.errors.Error):
            await self.msg.in_progress()


class PullConsumer:
    """Runs ``handler`` for every message of a durable pull consumer, at most ``concurrency`` at a time."""

    def __init__(
        self,
        bus: Bus,
        *,
        stream: str,
        durable: str,
        handler: Handler,
        concurrency: int = 1,
        dlq_subject: str,
        max_deliver: int | None = None,
        nak_delay: float | None = None,
        max_nak_delay: float = 60.0,
        role: str | None = None,
        confirm_acks: bool = False,
        on_give_up: GiveUp | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._bus = bus
        self.stream = stream
        self.durable = durable
        self._handler = handler
        self.concurrency = concurrency
        self._dlq_subject = dlq_subject
        self._max_deliver = max_deliver
        self._nak_delay = bus.settings.nak_delay if nak_delay is None else nak_delay
        self._max_nak_delay = max_nak_delay
        self._role = role
        self._confirm_acks = confirm_acks
        self._on_give_up = on_give_up
        self._ack_wait = bus.topology.ack_wait
        self._pulls = PullInbox(bus, stream, durable, on_message=self._on_message, on_status=self._on_status)

        self._in_flight = 0
        self._min_batch = max(1, concurrency // 2)
        self._requested = 0  # messages asked for and neither delivered nor expired yet
        self._held: dict[int, Msg] = {}  # id(msg) → msg: delivered, not yet acked/naked/termed: they get in-progress acks
        self._backlog: deque[Msg] = deque()  # delivered beyond capacity (only after requests were written off)
        self._arrivals: deque[Msg] = deque()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._needs_recovery = False
        self._reconnects = bus.reconnects

    @classmethod
    def for_role(cls, bus: Bus, role: str, handler: Handler, *, concurrency: int = 1, **kw: object) -> PullConsumer:
        """The consumer of a role as the topology declares it (``role-<role>``; goals for the planner)."""
        topo = bus.topology
        return cls(bus, stream=topo.stream_for(role), durable=topo.consumer_name(role), handler=handler,
                   concurrency=concurrency, dlq_subject=topo.dlq_subject(role), role=role, **kw)  # type: ignore[arg-type]

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def stop(self) -> None:
        """Stop pulling; ``run()`` returns once the handlers in flight have finished."""
        self._stopping.set()
        self._wake.set()

    # --- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until ``stop()``. Cancelling ``run()`` naks the messages in flight (redelivered at once)."""
        await unless_set(self._stopping, self._check_consumer())
        if self._stopping.is_set():  # stopped while starting (against a dead server the check waits its timeout)
            return
        await self._pulls.open()
        try:
            async with asyncio.TaskGroup() as tg:
                keepalive = tg.create_task(self._keep_alive(), name=f"{self.durable}-keepalive")
                await self._pull(tg)
                await self._drain()
                keepalive.cancel()
            await self._pulls.flush(_FLUSH_TIMEOUT)
        finally:
            await self._pulls.close()
            await self._give_back()

    async def _pull(self, tg: asyncio.TaskGroup) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            self._take_arrivals(tg)
            if self._needs_recovery:
                await self._recover()
                continue
            if not self._bus.connected:
                if self._bus.closed:
                    raise NotConnected(f"consumer {self.durable}: the bus connection is closed")
                await self._sleep(0.05)
                continue
            if self._reconnects != self._bus.reconnects:
                # A restarted server forgot our pull requests. (A cluster peer may still hold them: then
                # a few extra messages arrive, wait in the backlog and get in-progress acks.)
                self._reconnects = self._bus.reconnects
                self._requested = 0
            if self._requested and time.monotonic() - self._pulls.last_heard > _LOST_AFTER:
                log.info("consumer %s: %d requested messages unanswered; re-requesting", self.durable,
                         self._requested)
                self._requested = 0
            free = self.concurrency - self._in_flight - self._requested - len(self._backlog)
            # Under load, ask in batches of at least half the slots, not one request per finished handler.
            if free > 0 and (free >= self._min_batch or not self._requested):
                await self._request(free)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _HEARTBEAT)

    async def _request(self, batch: int) -> None:
        try:
            await self._pulls.request(batch, expires=_EXPIRES, heartbeat=_HEARTBEAT)
        except BusError as exc:
            log.debug("consumer %s: %s", self.durable, exc)
            return
        if not self._requested:
            self._pulls.last_heard = time.monotonic()  # the silence clock starts with the first open request
        self._requested += batch

    def _on_message(self, msg: Msg) -> None:
        """Inbox callback: only bookkeeping; the loop starts the handlers."""
        self._requested = max(0, self._requested - 1)
        self._arrivals.append(msg)
        self._wake.set()

    def _on_status(self, status: PullStatus) -> None:
        if status.code in ("404", "408", "409") and status.pending is not None:
            self._requested = max(0, self._requested - status.pending)
        else:  # 503 no responders, 409 consumer deleted / leadership change / server shutdown …
            log.info("consumer %s: pull status %s %s", self.durable, status.code, status.description)
            self._requested = 0
            self._needs_recovery = status.consumer_gone
        self._wake.set()

    def _take_arrivals(self, tg: asyncio.TaskGroup) -> None:
        """Start handlers for arrived messages while worker slots are free; hold the rest."""
        while self._arrivals:
            msg = self._arrivals.popleft()
            self._held[id(msg)] = msg
            self._backlog.append(msg)
        while self._backlog and self._in_flight < self.concurrency:
            self._in_flight += 1
            tg.create_task(self._handle(self._backlog.popleft()))

    async def _drain(self) -> None:
        """Wait for the handlers in flight, handing back whatever still arrives meanwhile."""
        while True:
            await self._give_back()
            if not self._in_flight:
                return
            self._wake.clear()
            await self._wake.wait()

    async def _give_back(self) -> None:
        """Nak messages this stopping consumer will not work, so another replica takes them at once."""
        msgs = [*self._arrivals, *self._backlog]
        self._arrivals.clear()
        self._backlog.clear()
        for msg in msgs:
            self._held.pop(id(msg), None)
            with contextlib.suppress(nats.errors.Error):
                await msg.nak()

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._ack_wait / 3)
            for msg in list(self._held.values()):
                with contextlib.suppress(nats.errors.Error):
                    await msg.in_progress()

    # --- one message -----------------------------------------------------------------------

    async def _handle(self, msg: Msg) -> None:
        try:
            await self._process(msg)
        except asyncio.CancelledError:  # shutdown or drain timeout: hand the work back right away
            with contextlib.suppress(nats.errors.Error):
                await msg.nak()
            raise
        except Exception:  # the loop must survive anything a disposition (ack/nak/DLQ) can raise
            log.exception("consumer %s: disposing of a message failed; it will be redelivered", self.durable)
        finally:
            self._held.pop(id(msg), None)
            self._in_flight -= 1
            self._wake.set()

    async def _process(self, msg: Msg) -> None:
        attempt = msg.metadata.num_delivered
        max_deliver = self._max_deliver or self._bus.topology.max_deliver
        delivery: Delivery | None = None
        try:
            envelope = await self._bus.open(msg)
            delivery = Delivery(envelope=envelope, msg=msg, attempt=attempt, subject=msg.subject,
                                max_deliver=max_deliver)
            await self._handler(delivery)
        except (CodecError, SchemaViolation) as exc:
            log.warning("consumer %s: poison message seq %s: %s", self.durable, msg.metadata.sequence.stream, exc)
            await self._dead_letter(msg, exc, attempt)
        except Exception as exc:  # noqa: BLE001 — whatever a handler raises is retried or dead-lettered
            if gives_up(exc, attempt, max_deliver):
                log.warning("consumer %s: giving up on seq %s after attempt %d: %r", self.durable,
                            msg.metadata.sequence.stream, attempt, exc)
                if delivery is not None:
                    await self._announce_give_up(delivery, exc)
                await self._dead_letter(msg, exc, attempt)
            else:
                delay = self.backoff(attempt, exc)
                log.info("consumer %s: attempt %d failed (%r); retry in %.1fs", self.durable, attempt, exc, delay)
                await msg.nak(delay=delay)
        else:
            if not msg.is_acked:
                await self._ack(msg)

    async def _ack(self, msg: Msg) -> None:
        try:
            if self._confirm_acks:
                await msg.ack_sync(timeout=_ACK_TIMEOUT)
            else:
                await msg.ack()
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("consumer %s: ack of seq %s failed (%r); it may be redelivered", self.durable,
                        msg.metadata.sequence.stream, exc)

    def backoff(self, attempt: int, exc: BaseException | None = None) -> float:
        delay = min(self._nak_delay * 2 ** (attempt - 1), self._max_nak_delay)
        retry_after = getattr(exc, "retry_after", None)
        return max(delay, float(retry_after)) if isinstance(retry_after, (int, float)) else delay

    async def _announce_give_up(self, delivery: Delivery, exc: BaseException) -> None:
        if self._on_give_up is None:
            return
        try:
            await self._on_give_up(delivery, exc)
        except Exception:
            log.exception("consumer %s: announcing that seq %s was given up failed", self.durable,
                          delivery.msg.metadata.sequence.stream)

    async def _dead_letter(self, msg: Msg, exc: BaseException, attempt: int) -> None:
        letter = await self._sealed(
            DeadLetter.from_msg(msg, reason=f"{type(exc).__name__}: {exc}", error=type(exc).__name__))
        # Retried in place while the message is held: a nak on its last delivery would leave it
        # undeliverable and out of the DLQ. The letter's id dedupes a publish that landed unacked.
        for tries in range(1, _DLQ_PUBLISH_TRIES + 1):
            try:
                await self._bus.publish_raw(self._dlq_subject, letter.encode(), headers=letter.nats_headers())
                break
            except PayloadRefused:  # over the limit (huge original headers, a claim-check threshold near it): cut, it is not
                log.warning("consumer %s: dead letter of seq %s too large; sending it truncated", self.durable,
                            letter.stream_seq)
                letter = letter.truncated()
            except BusError as pub_exc:
                if tries == _DLQ_PUBLISH_TRIES:
                    log.error("consumer %s: dead-lettering seq %s failed %d times (%s); it will be redelivered",
                              self.durable, letter.stream_seq, tries, pub_exc)
                    await msg.nak(delay=self.backoff(attempt))
                    return
                await self._sleep(self.backoff(tries))
        await msg.term()

    async def _sealed(self, letter: DeadLetter) -> DeadLetter:
        """The letter, with an original above the claim-check threshold moved to the object store:
        wrapped whole, an original near the server's max_payload would make a letter it refuses."""
        if letter.size <= self._bus.settings.claim_check_bytes:
            return letter
        try:
            ref = await self._bus.put_blob(letter.data, name=f"dlq-{letter.stream}-{letter.stream_seq}")
        except BusError as exc:
            log.warning("consumer %s: storing the original of seq %s failed (%s); its letter is truncated",
                        self.durable, letter.stream_seq, exc)
            return letter.truncated()
        return letter.claim_checked(ref.digest)

    # --- recovery --------------------------------------------------------------------------

    async def _check_consumer(self) -> None:
        """Make sure the durable consumer exists (re-creating it if lost) and learn its ack_wait."""
        try:
            info = await self._bus._js.consumer_info(self.stream, self.durable)
        except NotFoundError:
            log.warning("consumer %s on %s is missing; re-creating it", self.durable, self.stream)
            await self._bus.ensure_consumers([self._role] if self._role else [])
            try:
                info = await self._bus._js.consumer_info(self.stream, self.durable)
            except NotFoundError:
                raise BusError(f"consumer {self.durable} on {self.stream} does not exist and no role of "
                               "this node declares it") from None
        if info.config.ack_wait:
            self._ack_wait = info.config.ack_wait

    async def _recover(self) -> None:
        try:
            await self._check_consumer()
            self._needs_recovery = False
        except (BusError, nats.errors.Error, TimeoutError) as exc:
            log.info("consumer %s: not recovered yet (%r)", self.durable, exc)
            await self._sleep(0.5)

    async def _sleep(self, seconds: float) -> None:
        """Sleep that ends early on ``stop()``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
