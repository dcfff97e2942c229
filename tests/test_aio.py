"""mesh.aio: concurrency helpers every layer leans on."""

from __future__ import annotations

import asyncio

import pytest

from mesh.aio import together, unless_set
from mesh.errors import PublishError


async def test_together_raises_the_first_error_as_itself() -> None:
    async def fail() -> int:
        raise PublishError("not acknowledged")

    with pytest.raises(PublishError):
        await together(asyncio.sleep(0, 1), fail())
    assert await together(asyncio.sleep(0, 1), asyncio.sleep(0, 2)) == [1, 2]


async def test_unless_set_abandons_a_request_when_stop_comes() -> None:
    stop = asyncio.Event()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def request_to_a_dead_server() -> str:
        started.set()
        try:
            await asyncio.Event().wait()  # an ack that never comes
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    waiting = asyncio.create_task(unless_set(stop, request_to_a_dead_server()))
    await started.wait()
    stop.set()
    assert await waiting is None and cancelled.is_set()


async def test_unless_set_returns_the_result_or_raises_the_error_as_itself() -> None:
    stop = asyncio.Event()
    assert await unless_set(stop, asyncio.sleep(0, "acked")) == "acked"

    async def refused() -> None:
        raise PublishError("refused")

    with pytest.raises(PublishError):
        await unless_set(stop, refused())
    stop.set()
    never_started = asyncio.sleep(0, "x")
    assert await unless_set(stop, never_started) is None  # closed, not left un-awaited
