"""Events of one unit of work published back to back, their acks awaited together.

A worker's step emits several events before its outcome (started, route decided, backend calls,
tools, artifacts). Awaiting each ack in turn costs a server round trip apiece on the step's path;
the outbox sends each at once and ``settle`` waits for all the acks — before the outcome is
published, so no event of a step can be lost behind a stored outcome, and the task is acked later
still (by the consumer, after the handler returns).
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self

from nats.js import api

from mesh.bus.client import Bus
from mesh.contracts.events import EventBase
from mesh.errors import PublishError

ACK_TIMEOUT = 5.0  # as long as a plain publish waits for its ack


class Outbox:
    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._acks: list[asyncio.Future[api.PubAck]] = []

    async def emit(self, event: EventBase) -> None:
        self._acks.append(await self._bus.emit_async(event))

    async def settle(self) -> None:
        """Wait for every ack; ``PublishError`` when one is refused or does not come in time."""
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
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        """Leaving early (an error): still give what was sent its chance to be stored, as a plain
        publish would have; an ack that does not come is given up (its future cancelled)."""
        if self._acks:
            try:
                await self.settle()
            except PublishError:
                if et is None:
                    raise
