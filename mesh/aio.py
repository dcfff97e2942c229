"""asyncio helpers shared by the layers."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def together(*coros: Coroutine[Any, Any, T]) -> list[T]:
    """Run coroutines concurrently, owned by a TaskGroup (none outlives the call); results in order.
    The first failure is raised as itself, not wrapped in an ExceptionGroup, so that callers keep
    catching errors by type (a ``BusError`` stays retryable, a ``MeshError`` fails the step)."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c) for c in coros]
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    return [t.result() for t in tasks]


async def unless_set(stop: asyncio.Event, coro: Coroutine[Any, Any, T]) -> T | None:
    """Run ``coro`` unless ``stop`` is (or becomes) set first: then it is cancelled and None returned.
    For requests a stopping process must not wait out (against a dead server each waits its timeout)."""
    if stop.is_set():
        coro.close()
        return None
    try:
        async with asyncio.TaskGroup() as tg:
            work = tg.create_task(coro)
            stopped = tg.create_task(stop.wait())
            await asyncio.wait([work, stopped], return_when=asyncio.FIRST_COMPLETED)
            work.cancel()
            stopped.cancel()
    except BaseExceptionGroup as group:  # the coroutine's own error, as itself (callers catch by type)
        raise group.exceptions[0] from None
    return None if work.cancelled() else work.result()


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop (asyncio's own loop where uvloop is absent, e.g. Windows)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
