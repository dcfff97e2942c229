"""JetStream's pull protocol spoken directly, on one long-lived inbox: the core under both the task
consumer (``mesh.bus.consumer``) and the ledger's event feed (``mesh.bus.feed``).

A pull request is a publish to ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`` whose reply subject
is our inbox; the server answers with messages and with status messages (100 idle heartbeat, 404 no
messages, 408 request expired, 409 limits/leadership/consumer deleted, 503 no responders). The inbox
callback here only sorts the replies; what they mean for the caller's bookkeeping is the caller's.
nats-py's ``fetch`` is not used: a restarted server forgets outstanding pull requests (nats.py#504),
``fetch(batch=n)`` holds a partial batch until its timeout, and each message costs a timed await.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mesh.bus.client import Bus
from mesh.errors import BusError

PENDING_HEADER = "Nats-Pending-Messages"


@dataclass(frozen=True, slots=True)
class PullStatus:
    """A status reply that ends (part of) a pull request."""

    code: str
    description: str
    pending: int | None  # how many of the request's messages will no longer come, when the server says

    @property
    def consumer_gone(self) -> bool:
        """No responders, or the consumer was deleted: it must be checked (re-provisioned) before pulling on."""
        return self.code == "503" or "deleted" in self.description.lower()


class PullInbox:
    """One inbox for a pull consumer's replies: ``request`` asks, ``on_message`` gets each message,
    ``on_status`` each status but the idle heartbeat. Both callbacks run in the subscription callback:
    bookkeeping only, no awaiting."""

    def __init__(self, bus: Bus, stream: str, consumer: str, *, on_message: Callable[[Msg], None],
                 on_status: Callable[[PullStatus], None]) -> None:
        self._bus = bus
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._on_message = on_message
        self._on_status = on_status
        self._inbox = ""
        self._sub: Subscription | None = None
        self.last_heard = time.monotonic()  # any reply, heartbeats included

    async def open(self) -> None:
        if self._sub is not None:
            return
        nc = self._bus._nc
        self._inbox = nc.new_inbox()
        try:
            self._sub = await nc.subscribe(self._inbox, cb=self._reply)
        except nats.errors.Error as exc:
            raise BusError(f"cannot subscribe to the pull inbox for {self._next}: {exc!r}") from exc

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):  # a closed connection has nothing left to drain
                await sub.unsubscribe()

    async def request(self, batch: int, *, expires: float | None = None, heartbeat: float | None = None,
                      max_bytes: int | None = None) -> None:
        """Ask for up to ``batch`` messages (and ``max_bytes`` bytes of them: the server ends the request
        before the message that would pass it): what is stored now (``expires=None``: no_wait, ended by a
        404), or what arrives within ``expires`` seconds."""
        assert self._sub is not None, "open() first"
        body: dict[str, object] = {"batch": batch}
        if max_bytes is not None:
            body["max_bytes"] = max_bytes
        if expires is None:
            body["no_wait"] = True
        else:
            body["expires"] = int(expires * 1e9)
        if heartbeat is not None:
            body["idle_heartbeat"] = int(heartbeat * 1e9)
        try:
            await self._bus._nc.publish(self._next, json.dumps(body).encode(), reply=self._inbox)
        except nats.errors.Error as exc:  # disconnected, server restarting: the caller asks again later
            raise BusError(f"pull request to {self._next} not sent: {exc!r}") from exc

    async def flush(self, timeout: int) -> None:
        """Wait until what was written (acks included) reached the server, or ``timeout`` passed.
        Disconnected, there is nothing to wait for: unacknowledged messages are redelivered anyway."""
        if not self._bus.connected:
            return
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self._bus._nc.flush(timeout=timeout)

    async def _reply(self, msg: Msg) -> None:
        self.last_heard = time.monotonic()
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None:
            self._on_message(msg)
        elif status != "100":  # 100: an idle heartbeat, only proof of life
            pending = headers.get(PENDING_HEADER)
            self._on_status(PullStatus(code=status, description=headers.get("Description", ""),
                                       pending=int(pending) if pending is not None else None))
