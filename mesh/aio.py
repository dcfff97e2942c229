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


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop (asyncio's own loop where uvloop is absent, e.g. Windows)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
