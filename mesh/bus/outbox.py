"""The events of one unit of work, sent in batches, their acks awaited together.

A worker's step emits several events before its outcome (started, route decided, backend calls,
tools, artifacts). Sent one by one, each costs a server wake-up and an ack of its own (on a 2-core
machine ~180 µs of CPU across client and server apiece, against ~60 µs in a batch of eight:
``bench/RESULTS.md``). The outbox encodes each event when it is emitted (a bad one fails there) and
holds it for at most ``linger`` seconds, so the events of a quick stretch of work go out together:
watchers see an event at most that much later. ``settle`` sends what is held and waits for every
ack — before the outcome is published, so no event of a step can be lost behind a stored outcome,
and the task is acked later still (by the consumer, after the handler returns).
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self

from nats.js import api

from mesh.bus.client import Bus, PreparedEvent
from mesh.contracts.events import EventBase
from mesh.errors import MeshError, NotConnected, PublishError

ACK_TIMEOUT = 5.0  # as long as a plain publish waits for its ack
LINGER_SECONDS = 0.02  # how long an event may wait for company: a human does not see it, a batch halves its cost
MAX_HELD = 64  # a burst sends at once


class Outbox:
    """Use as ``async with Outbox(bus) as outbox``: it owns the task that sends held events after the
    linger, and leaving the block settles what was emitted and ends that task."""

    def __init__(self, bus: Bus, *, linger: float = LINGER_SECONDS) -> None:
        self._bus = bus
        self._linger = linger
        self._held: list[PreparedEvent] = []
        self._acks: list[asyncio.Future[api.PubAck]] = []
        self._sending = asyncio.Lock()  # batches go out in the order their events were emitted
        self._wake = asyncio.Event()  # something is held: the sender lingers, then sends
        self._sender: asyncio.Task[None] | None = None
        self._failed: MeshError | None = None  # a batch the sender could not send: settle raises it

    async def emit(self, event: EventBase) -> None:
        if self._bus.closed:
            raise NotConnected(f"cannot emit {type(event).__name__}: the bus is closed")
        if self._sender is None:
            raise RuntimeError("an Outbox is used as `async with Outbox(bus) as outbox`")
        self._held.append(await self._bus.prepare(event))
        if len(self._held) >= MAX_HELD or self._linger <= 0:
            await self.send()
        else:
            self._wake.set()

    async def _send_held(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self._linger)  # what is emitted meanwhile goes in the same batch
            self._wake.clear()
            try:
                await self.send()
            except MeshError as exc:  # the step, not this task, decides what an unsent event means
                self._failed = self._failed or exc

    async def send(self) -> None:
        """Send what is held now, without waiting for the acks: before the step waits on something else
        anyway (storing its outputs), so those acks come back meanwhile instead of at ``settle``."""
        async with self._sending:
            held, self._held = self._held, []
            for event in held:  # no wait in between: nats-py writes them to the socket together
                self._acks.append(await self._bus.send_async(event))

    async def settle(self) -> None:
        """Send what is held and wait for every ack; ``PublishError`` when one is refused or does not come
        in time (or the error that kept a batch from being sent)."""
        await self.send()  # after any batch the sender is sending: the lock orders them
        failed_send, self._failed = self._failed, None
        if failed_send is not None:
            raise failed_send
        acks, self._acks = self._acks, []
        if not acks:
            return
        done, pending = await asyncio.wait(acks, timeout=ACK_TIMEOUT)
        for ack in pending:
            ack.cancel()
        failed = [f.exception() for f in done if f.exception() is not None]
        if pending or failed:
            raise PublishError(f"{len(pending)} event(s) not acknowledged within {ACK_TIMEOUT}s, "
                               f"{len(failed)} refused: {failed[:1]!r}")

    async def __aenter__(self) -> Self:
        self._sender = asyncio.create_task(self._send_held(), name="outbox-sender")
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        """Leaving early (an error): still give what was emitted its chance to be stored, as a plain
        publish would have; an ack that does not come is given up (its future cancelled)."""
        try:
            try:
                await self.settle()
            except (PublishError, NotConnected):
                if et is None:
                    raise
        finally:  # nothing is held now (settle sent it): the sender has nothing left to lose
            sender, self._sender = self._sender, None
            if sender is not None:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
