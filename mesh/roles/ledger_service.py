"""The ledger's query service over NATS (a NATS micro service) and its client.

Endpoints, request/reply with JSON bodies so any NATS client (``nats req``, Go, TypeScript) can ask::

    <prefix>.ledger.sql            {"sql": "SELECT …", "max_rows": 100?, "timeout": 5?}
    <prefix>.ledger.goal_summary   {"goal_id": "…"?, "limit": 50?}
    <prefix>.ledger.usage          {"goal_id": "…"?, "by": "tier" | "model" | "goal"}
    <prefix>.ledger.routing_stats  {}
    <prefix>.ledger.status         {}   → {"path", "schema_version", "last_seq", "events"}

A query answers ``{"columns", "types", "rows", "truncated", "elapsed_ms"}`` (``truncated``: the row
limit cut it). Errors use the micro protocol's ``Nats-Service-Error`` / ``-Code`` headers: 400 for a
refused or malformed request (an answer above the result byte cap is refused, never cut short), 500
for a query that failed, 503 when ``MESH_LEDGER_MAX_QUERIES`` are in progress already. The service
discovers like any micro service (``nats micro ls``) under the name ``<prefix>-ledger``.

Bounds (docs/LEDGER.md, "Limits"): each request is its own task, its query and the conversion of its
rows to JSON run in a thread under the time limit, and the answer is at most the result byte cap
(``MESH_LEDGER_MAX_RESULT_BYTES``, and never above the server's ``max_payload``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mesh import __version__
from mesh.bus.client import Bus
from mesh.bus.service import BUSY, BusService, request
from mesh.errors import BusError, LedgerBusy, LedgerError, NoResponders, QueryRefused, ServiceError
from mesh.store import Ledger
from mesh.store.query import LedgerQueries, QueryResult

log = logging.getLogger(__name__)

_REFUSED, _FAILED = "400", "500"
_HEADROOM = 4096  # bytes kept free under max_payload for headers and framing


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SqlRequest(_Request):
    sql: str
    max_rows: int | None = Field(default=None, ge=0)
    timeout: float | None = Field(default=None, gt=0)


class GoalSummaryRequest(_Request):
    goal_id: str | None = None
    limit: int = Field(default=50, ge=1, le=10_000)


class UsageRequest(_Request):
    goal_id: str | None = None
    by: Literal["tier", "model", "goal"] = "tier"


class EmptyRequest(_Request):
    pass


def subject(prefix: str, endpoint: str) -> str:
    return f"{prefix}.ledger.{endpoint}"


class LedgerService:
    """Serves ``LedgerQueries`` on the bus while open (``async with``). Queries run in threads, so
    the event loop (and the recorder's ingest) keeps going while one runs; closing waits for them."""

    def __init__(self, bus: Bus, ledger: Ledger, queries: LedgerQueries, *, max_concurrent: int = 4) -> None:
        self._bus, self._ledger, self._queries = bus, ledger, queries
        self._max_concurrent = max_concurrent
        self._max_bytes = min(queries.max_bytes, bus.max_payload - _HEADROOM)
        self._service: BusService | None = None
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def __aenter__(self) -> Self:
        q, cap = self._queries, self._max_bytes
        routes: dict[str, Callable[[Any], bytes]] = {
            "sql": lambda r: q.sql(r.sql, timeout=r.timeout, max_rows=r.max_rows, max_bytes=cap).encode(),
            "goal_summary": lambda r: q.goal_summary(r.goal_id, limit=r.limit, max_bytes=cap).encode(),
            "usage": lambda r: q.usage(goal_id=r.goal_id, by=r.by, max_bytes=cap).encode(),
            "routing_stats": lambda r: q.routing_stats(max_bytes=cap).encode(),
            "status": lambda r: json.dumps(self._status()).encode(),
        }
        models: dict[str, type[_Request]] = {"sql": SqlRequest, "goal_summary": GoalSummaryRequest,
                                             "usage": UsageRequest}
        prefix = self._bus.topology.prefix
        self._service = BusService(
            self._bus, name=f"{prefix}-ledger", version=__version__, group=f"{prefix}.ledger",
            description="Read-only queries over the mesh ledger (DuckDB)",
            endpoints={name: self._endpoint(models.get(name, EmptyRequest), run) for name, run in routes.items()},
            max_concurrent=self._max_concurrent)
        await self._service.__aenter__()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._service is not None:
            await self._service.__aexit__(et, e, tb)
        await self._idle.wait()  # a query thread must not outlive the ledger it reads

    def _status(self) -> dict[str, Any]:
        cursor = self._ledger.cursor()
        try:
            row = cursor.execute("SELECT count(*) FROM events").fetchone()
        finally:
            cursor.close()
        return {"path": self._ledger.path, "schema_version": self._ledger.schema_version,
                "last_seq": self._ledger.last_seq(), "events": row[0] if row else 0}

    def _endpoint(self, model: type[_Request], run: Callable[[Any], bytes]) -> Callable[[bytes], Awaitable[bytes]]:
        async def handle(data: bytes) -> bytes:
            try:
                body = model.model_validate_json(data or b"{}")
            except ValidationError as exc:
                raise ServiceError(_REFUSED, f"malformed request: {exc.errors(include_url=False)}") from exc
            self._running += 1
            self._idle.clear()
            try:
                return await asyncio.to_thread(run, body)  # the query and its JSON, off the event loop
            except QueryRefused as exc:
                raise ServiceError(_REFUSED, str(exc)) from exc
            except LedgerError as exc:
                raise ServiceError(_FAILED, str(exc)) from exc
            finally:
                self._running -= 1
                if not self._running:
                    self._idle.set()

        return handle


class LedgerClient:
    """Asks the ledger service; raises ``QueryRefused`` / ``LedgerError`` as the service decided."""

    def __init__(self, bus: Bus, *, timeout: float = 15.0) -> None:
        self._bus, self.timeout = bus, timeout

    async def _ask(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        target = subject(self._bus.topology.prefix, endpoint)
        try:
            reply = await request(self._bus, target, json.dumps(body).encode(), timeout=self.timeout)
        except NoResponders as exc:
            raise LedgerError(f"no ledger service answers on {target}: is the ledger node running?") from exc
        except ServiceError as exc:
            kind = {_REFUSED: QueryRefused, BUSY: LedgerBusy}.get(exc.code, LedgerError)
            raise kind(str(exc)) from exc
        except BusError as exc:
            raise LedgerError(f"ledger request on {target} failed: {exc}") from exc
        doc: dict[str, Any] = json.loads(reply)
        return doc

    async def sql(self, sql: str, *, max_rows: int | None = None,
                  timeout: float | None = None) -> QueryResult:
        request = SqlRequest(sql=sql, max_rows=max_rows, timeout=timeout)
        return QueryResult.from_json(await self._ask("sql", request.model_dump(exclude_none=True)))

    async def goal_summary(self, goal_id: str | None = None, *, limit: int = 50) -> QueryResult:
        return QueryResult.from_json(await self._ask("goal_summary", {"goal_id": goal_id, "limit": limit}))

    async def usage(self, *, goal_id: str | None = None,
                    by: Literal["tier", "model", "goal"] = "tier") -> QueryResult:
        return QueryResult.from_json(await self._ask("usage", {"goal_id": goal_id, "by": by}))

    async def routing_stats(self) -> QueryResult:
        return QueryResult.from_json(await self._ask("routing_stats", {}))

    async def status(self) -> dict[str, Any]:
        return await self._ask("status", {})
