"""Request/reply services on the bus (the NATS micro protocol) and the client side of a request.

A service is a named group of endpoints, each an ``async (request bytes) -> reply bytes`` handler; it
discovers like any micro service (``nats micro ls``). A handler refuses or fails a request by raising
``ServiceError(code, description)``, which reaches the asker as the same error through the protocol's
``Nats-Service-Error`` / ``-Code`` headers; any other exception stays the handler's (a bug).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Self

import nats.errors
from nats.micro import add_service
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request
from nats.micro.service import Service

from mesh.bus.client import Bus
from mesh.errors import BusError, NoResponders, ServiceError

log = logging.getLogger(__name__)

Endpoint = Callable[[bytes], Awaitable[bytes]]


class BusService:
    """Serves ``endpoints`` as ``<group>.<name>`` while open (``async with``)."""

    def __init__(self, bus: Bus, *, name: str, version: str, description: str, group: str,
                 endpoints: Mapping[str, Endpoint]) -> None:
        self._bus, self._name, self._version, self._description = bus, name, version, description
        self._group, self._endpoints = group, dict(endpoints)
        self._service: Service | None = None

    async def __aenter__(self) -> Self:
        try:
            self._service = await add_service(self._bus._nc, name=self._name, version=self._version,
                                              description=self._description)
            group = self._service.add_group(name=self._group)
            for name, endpoint in self._endpoints.items():
                await group.add_endpoint(name=name, handler=_serve(endpoint))
        except nats.errors.Error as exc:
            raise BusError(f"cannot start the {self._name} service: {exc!r}") from exc
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._service is not None:
            try:
                await self._service.stop()
            except nats.errors.Error as exc:  # a closed connection has no subscriptions left to drain
                log.debug("%s service stop: %r", self._name, exc)


def _serve(endpoint: Endpoint) -> Callable[[Request], Awaitable[None]]:
    async def handle(request: Request) -> None:
        try:
            reply = await endpoint(request.data or b"")
        except ServiceError as exc:
            await request.respond_error(exc.code, str(exc)[:500])
            return
        await request.respond(reply)

    return handle


async def request(bus: Bus, subject: str, data: bytes, *, timeout: float) -> bytes:
    """Ask a service; its reply, or ``ServiceError`` as the service decided, ``NoResponders``, ``BusError``."""
    try:
        reply = await bus._nc.request(subject, data, timeout=timeout)
    except nats.errors.NoRespondersError as exc:
        raise NoResponders(f"no service answers on {subject}") from exc
    except (nats.errors.Error, TimeoutError) as exc:
        raise BusError(f"request on {subject} failed: {exc!r}") from exc
    headers = reply.headers or {}
    if ERROR_CODE_HEADER in headers:
        raise ServiceError(headers[ERROR_CODE_HEADER], headers.get(ERROR_HEADER, "the service refused the request"))
    return bytes(reply.data)
