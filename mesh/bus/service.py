"""Request/reply services on the bus (the NATS micro protocol) and the client side of a request.

A service is a named group of endpoints, each an ``async (request bytes) -> reply bytes`` handler; it
discovers like any micro service (``nats micro ls``). A handler refuses or fails a request by raising
``ServiceError(code, description)``, which reaches the asker as the same error through the protocol's
``Nats-Service-Error`` / ``-Code`` headers; any other exception is a bug: logged, and answered 500.

Each request is handled in its own task (owned by the service's task group), so a slow one does not
hold up the next; with ``max_concurrent`` set, a request that finds that many in progress is answered at
once with ``BUSY`` (503) instead of waiting.
"""

from __future__ import annotations

import asyncio
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

BUSY, INTERNAL = "503", "500"

Endpoint = Callable[[bytes], Awaitable[bytes]]


class BusService:
    """Serves ``endpoints`` as ``<group>.<name>`` while open (``async with``)."""

    def __init__(self, bus: Bus, *, name: str, version: str, description: str, group: str,
                 endpoints: Mapping[str, Endpoint], max_concurrent: int | None = None) -> None:
        self._bus, self._name, self._version, self._description = bus, name, version, description
        self._group, self._endpoints = group, dict(endpoints)
        self._max_concurrent = max_concurrent
        self._running = 0
        self._service: Service | None = None
        self._tasks = asyncio.TaskGroup()

    async def __aenter__(self) -> Self:
        await self._tasks.__aenter__()
        try:
            self._service = await add_service(self._bus._nc, name=self._name, version=self._version,
                                              description=self._description)
            group = self._service.add_group(name=self._group)
            for name, endpoint in self._endpoints.items():
                await group.add_endpoint(name=name, handler=self._dispatcher(name, endpoint))
        except nats.errors.Error as exc:
            await self._tasks.__aexit__(None, None, None)
            raise BusError(f"cannot start the {self._name} service: {exc!r}") from exc
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            if self._service is not None:
                try:
                    await self._service.stop()
                except nats.errors.Error as exc:  # a closed connection has no subscriptions left to drain
                    log.debug("%s service stop: %r", self._name, exc)
        finally:
            await self._tasks.__aexit__(et, e, tb)  # the requests in progress are answered first

    def _dispatcher(self, name: str, endpoint: Endpoint) -> Callable[[Request], Awaitable[None]]:
        async def dispatch(request: Request) -> None:
            if self._max_concurrent is not None and self._running >= self._max_concurrent:
                await _respond_error(request, BUSY, f"{self._name} is busy: {self._running} requests in progress, "
                                                    f"the most it serves at once; retry later")
                return
            self._running += 1
            self._tasks.create_task(self._handle(name, endpoint, request))

        return dispatch

    async def _handle(self, name: str, endpoint: Endpoint, request: Request) -> None:
        try:
            reply = await endpoint(request.data or b"")
        except ServiceError as exc:
            await _respond_error(request, exc.code, str(exc))
            return
        except Exception as exc:  # a bug in the endpoint must not take the other requests down with it
            log.exception("%s.%s failed", self._name, name)
            await _respond_error(request, INTERNAL, f"internal error: {type(exc).__name__}")
            return
        finally:
            self._running -= 1
        try:
            await request.respond(reply)
        except nats.errors.Error as exc:  # the asker is gone or the connection closed: nobody to tell
            log.info("%s.%s reply not sent: %r", self._name, name, exc)


async def _respond_error(request: Request, code: str, description: str) -> None:
    try:
        await request.respond_error(code, description[:500])
    except nats.errors.Error as exc:
        log.info("error reply not sent: %r", exc)


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
