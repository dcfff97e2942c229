"""Acceptance: kill -9 of the ledger process during a burst of 50,000 events, then a restart. The events
table ends with exactly the stream's messages, none twice, and every table equals a rebuild."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.errors import LedgerError
from mesh.roles.ledger_service import LedgerClient
from mesh.roles.recorder import rebuild
from tests.ledgerkit import Eventually, burst, caught_up, publish_burst, stream_messages, tables
from tests.meshkit import NodeProcess, node_env

pytestmark = pytest.mark.timeout(300)

BURST = 50_000


async def stored(client: LedgerClient) -> int:
    try:
        return int((await client.status())["last_seq"])
    except LedgerError:
        return -1


async def test_kill_9_during_a_burst_loses_and_duplicates_nothing(bus: Bus, settings: MeshSettings,
                                                                  eventually: Eventually, tmp_path: Path) -> None:
    client = LedgerClient(bus, timeout=10)
    env = node_env(settings)
    events = burst(BURST)
    first = NodeProcess("ledger", env, tmp_path).start()
    second: NodeProcess | None = None
    try:
        await eventually(lambda: _answers(client), timeout=60, message="ledger service up")
        async with asyncio.TaskGroup() as tg:
            publishing = tg.create_task(publish_burst(bus, events, chunk=500, pause=0.04))
            await eventually(lambda: _at_least(client, 5_000), timeout=60, message="ledger stored 5,000")
            first.signal(signal.SIGKILL)
            assert await first.wait() == -signal.SIGKILL
            assert not publishing.done(), "the kill must land during the burst"
            stored_at_kill = await stream_messages(bus)
            second = NodeProcess("ledger", env, tmp_path).start()
        assert stored_at_kill < BURST
        await caught_up(eventually, client, bus, timeout=120)

        total = await stream_messages(bus)
        assert total >= BURST + 2  # the burst, plus each ledger node's node.up
        counts = await client.sql("SELECT count(*), count(DISTINCT seq), count(DISTINCT event_id), max(seq) "
                                  "FROM events")
        assert counts.rows == [(total, total, total, total)]
        last_seq = int((await client.status())["last_seq"])
        second.signal(signal.SIGTERM)
        assert await second.wait() == 0
    finally:
        first.stop()
        if second is not None:
            second.stop()

    # Every derived table equals what a clean replay of the same stream prefix produces.
    assert await rebuild(bus, tmp_path / "rebuilt.duckdb", until=last_seq) == total
    live, rebuilt = tables(settings.ledger_file), tables(tmp_path / "rebuilt.duckdb")
    for table, rows in live.items():
        assert rebuilt[table] == rows, table


async def _answers(client: LedgerClient) -> bool:
    return await stored(client) >= 0


async def _at_least(client: LedgerClient, count: int) -> bool:
    return await stored(client) >= count
