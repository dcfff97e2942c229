"""Server-Sent Events: framing, keep-alives in silences, and a response that always closes its source.

A stream is a view of ``MESH_EVENTS`` from a position, so nothing here holds state a reconnect would need:
the client's ``Last-Event-ID`` (the stream sequence) is the whole cursor.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import aclosing
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Send

T = TypeVar("T")
KEEPALIVE = b": keep-alive\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies must not buffer a stream
_END = object()


def frame(data: Any, *, event: str | None = None, id: int | None = None) -> bytes:
    """One SSE message; ``data`` is sent as compact JSON unless it is already a string."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), default=str)
    head = (f"id: {id}\n" if id is not None else "") + (f"event: {event}\n" if event else "")
    return (head + "".join(f"data: {line}\n" for line in text.split("\n")) + "\n").encode()


async def with_silences(source: AsyncIterable[T], interval: float) -> AsyncIterator[T | None]:
    """The items of ``source``, and ``None`` after each ``interval`` seconds without one (time for a
    keep-alive). A pump task reads the source so that waiting for it with a timeout never cancels the
    source's own read half-way."""
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=256)

    async def pump() -> None:
        try:
            async with aclosing(aiter(source)) as items:  # type: ignore[type-var]
                async for item in items:
                    await queue.put(item)
        except Exception as exc:  # noqa: BLE001 — handed to the reader, which raises it as itself
            await queue.put(exc)
            return
        await queue.put(_END)

    failed: Exception | None = None
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(pump())
        try:
            while True:
                try:
                    async with asyncio.timeout(interval):
                        item = await queue.get()
                except TimeoutError:
                    yield None
                    continue
                if item is _END:
                    break
                if isinstance(item, Exception):
                    failed = item  # raised below, as itself rather than inside the TaskGroup's group
                    break
                yield item  # type: ignore[misc]
        finally:
            task.cancel()
    if failed is not None:
        raise failed


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` whose body generator is closed however the stream ends (a client that goes
    away included), so the mesh watch behind it is removed at once."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], *, headers: dict[str, str] | None = None) -> None:
        super().__init__(content, headers={**SSE_HEADERS, **(headers or {})})

    async def stream_response(self, send: Send) -> None:
        async with aclosing(self.body_iterator):  # type: ignore[type-var]
            await super().stream_response(send)
