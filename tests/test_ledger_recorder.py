"""The recorder role against a real nats-server: records the stream exactly once, serves the query
service (refusing writes, multiple statements and file access), dead-letters poison, resumes after
a restart, and a rebuild from the stream equals the live ledger."""

from __future__ import annotations

import contextlib
from pathlib import Path

import msgpack
import pytest

from mesh.bus import Bus, DeadLetter
from mesh.client import MeshClient
from mesh.config import MeshSettings
from mesh.contracts import Goal, GoalFailed, GoalSubmitted, StepCompleted, StepStarted, encode
from mesh.errors import LedgerError, QueryRefused
from mesh.roles.ledger_service import LedgerClient
from mesh.roles.recorder import rebuild
from mesh.store import Ledger
from tests.ledgerkit import (
    Eventually,
    burst,
    caught_up,
    publish_burst,
    recording,
    stream_messages,
    tables,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def client(bus: Bus) -> LedgerClient:
    return LedgerClient(bus, timeout=10)


async def test_records_serves_and_rebuilds_equal(bus: Bus, settings: MeshSettings, client: LedgerClient,
                                                 eventually: Eventually, tmp_path: Path) -> None:
    events = burst(3_000)
    async with recording(bus, settings):
        await publish_burst(bus, events[:1_000])
        await caught_up(eventually, client, bus)
        await publish_burst(bus, events[1_000:], chunk=250)  # later batches of other sizes
        await caught_up(eventually, client, bus)

        counts = await client.sql("SELECT count(*), count(DISTINCT seq), count(DISTINCT event_id) FROM events")
        assert counts.rows == [(3_000, 3_000, 3_000)] == [(await stream_messages(bus),) * 3]
        status = await client.status()
        assert status["events"] == 3_000 and status["last_seq"] == 3_000

        goal_id = events[-1].goal_id
        summary = await client.goal_summary(goal_id)
        assert [r["goal_id"] for r in summary.records()] == [goal_id]
        usage = await client.usage()
        assert {r["tier"] for r in usage.records()} == {"edge", "long_context", "swarm"}
        assert (await client.routing_stats()).rows
        limited = await client.sql("SELECT seq FROM events ORDER BY seq", max_rows=7)
        assert [r[0] for r in limited.rows] == list(range(1, 8)) and limited.truncated

    live = tables(settings.ledger_file)
    rebuilt_path = tmp_path / "rebuilt.duckdb"
    assert await rebuild(bus, rebuilt_path, batch_size=1_234) == 3_000
    rebuilt = tables(rebuilt_path)
    for table, rows in live.items():
        assert rebuilt[table] == rows, table
    with pytest.raises(LedgerError, match="exists"):
        await rebuild(bus, rebuilt_path)


QUERY_SERVICE_REFUSES = [
    "DELETE FROM events",
    "INSERT INTO goals (goal_id) VALUES ('x')",
    "DROP TABLE events",
    "SELECT 1; DELETE FROM events",
    "SELECT count(*) FROM events; SELECT 1",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_parquet('/tmp/x.parquet')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM '/etc/passwd'",
    "COPY events TO '/tmp/stolen.csv'",
    "ATTACH '/tmp/other.duckdb' AS other",
    "INSTALL httpfs",
]


async def test_query_service_refuses_writes_statements_and_files(bus: Bus, settings: MeshSettings,
                                                                 client: LedgerClient,
                                                                 eventually: Eventually) -> None:
    async with recording(bus, settings):
        await publish_burst(bus, burst(200))
        await caught_up(eventually, client, bus)
        for sql in QUERY_SERVICE_REFUSES:
            with pytest.raises(QueryRefused):
                await client.sql(sql)
        with pytest.raises(QueryRefused, match="time limit"):
            await client.sql("SELECT sum(a.range * b.range) FROM range(100000000) a, range(1000) b", timeout=0.2)
        with pytest.raises(LedgerError, match="malformed"):
            await client._ask("sql", {"query": "SELECT 1"})
        # nothing was written, and the ledger still serves and records
        assert (await client.sql("SELECT count(*) FROM events")).rows == [(200,)]
        assert (await client.sql("SELECT count(*) FROM goals")).rows[0][0] > 0


async def test_poison_is_dead_lettered_and_recording_goes_on(bus: Bus, settings: MeshSettings,
                                                              client: LedgerClient, eventually: Eventually) -> None:
    events = burst(100)
    async with recording(bus, settings):
        await publish_burst(bus, events[:50])
        await bus._nc.publish(bus.topology.event_subject("g", "coder", "step.started"), b"\xc1 not msgpack")
        await publish_burst(bus, events[50:])
        await caught_up(eventually, client, bus)
        assert (await client.sql("SELECT count(*), max(seq) FROM events")).rows == [(100, 101)]
        assert (await client.sql("SELECT count(*) FROM events WHERE seq = 51")).rows == [(0,)]

    sub = await bus._js.pull_subscribe(bus.topology.dlq_subject("ledger"), stream=bus.topology.dlq_stream)
    (msg,) = await sub.fetch(1, timeout=5)
    letter = DeadLetter.decode(msg.data)
    assert letter.stream_seq == 51 and letter.error == "CodecError" and letter.data == b"\xc1 not msgpack"


async def test_restart_resumes_after_the_mark(bus: Bus, settings: MeshSettings, client: LedgerClient,
                                              eventually: Eventually) -> None:
    events = burst(600)
    async with recording(bus, settings):
        await publish_burst(bus, events[:300])
        await caught_up(eventually, client, bus)
    await publish_burst(bus, events[300:])  # while no ledger runs
    async with recording(bus, settings, batch_size=128):
        await caught_up(eventually, client, bus)
        assert (await client.sql("SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM events")).rows == [
            (600, 600, 1, 600)]


async def test_rebuild_until_gives_the_ledger_as_it_was(bus: Bus, settings: MeshSettings, client: LedgerClient,
                                                        eventually: Eventually, tmp_path: Path) -> None:
    events = burst(400)
    async with recording(bus, settings):
        await publish_burst(bus, events[:250])
        await caught_up(eventually, client, bus)
    then = tables(settings.ledger_file)
    await publish_burst(bus, events[250:])
    assert await rebuild(bus, tmp_path / "then.duckdb", until=250) == 250
    assert tables(tmp_path / "then.duckdb") == then


async def test_rebuild_and_watch_read_schema_1_events_on_their_old_subjects(bus: Bus, tmp_path: Path) -> None:
    """A stream written before schema 2 holds schema-1 envelopes on ``mesh.event.<goal>.<type>`` (no role):
    ``mesh ledger rebuild`` and ``mesh watch`` (``MeshClient.watch``) still read them, next to new events."""
    goal = Goal(goal_id="gold", brief="from the last release")
    old = [GoalSubmitted(goal_id="gold", goal=goal), StepStarted(goal_id="gold", step_id="s1", role="coder")]
    for event in old:  # as a schema-1 node published them: hand-made, since no code of this release does
        doc = msgpack.unpackb(encode(event))
        doc["v"] = "1.2"
        await bus.publish_raw(f"mesh.event.gold.{event.type}", msgpack.packb(doc),
                              headers={"Nats-Msg-Id": event.event_id})
    new = StepCompleted(goal_id="gold", step_id="s1", role="coder")
    async with await Bus.connect(bus.settings, name="coder", role="coder", check=False) as coder:
        await coder.emit(new)

    watched = []
    async with contextlib.aclosing(MeshClient(bus).watch("gold")) as events:
        async for _, event in events:
            watched.append(event)
            if len(watched) == 3:
                break
    assert watched == [*old, new]

    assert await rebuild(bus, tmp_path / "rebuilt.duckdb") == 3
    with Ledger(tmp_path / "rebuilt.duckdb", read_only=True) as ledger:
        rows = ledger.cursor().execute("SELECT subject, type FROM events ORDER BY seq").fetchall()
    assert rows == [("mesh.event.gold.goal.submitted", "goal.submitted"), ("mesh.event.gold.step.started",
                    "step.started"), ("mesh.event.gold.coder.step.completed", "step.completed")]


async def test_an_event_its_subjects_role_cannot_have_emitted_is_dead_lettered(
        bus: Bus, settings: MeshSettings, client: LedgerClient, eventually: Eventually) -> None:
    """A coder reporting the reviewer's step, or announcing a goal's end, is not recorded: it goes to the
    ledger's dead letters with the reason; the genuine events around it are recorded."""
    review = StepCompleted(goal_id="g1", step_id="review", role="reviewer", verdict="approve")
    async with recording(bus, settings):
        async with await Bus.connect(bus.settings, name="coder", role="coder", check=False) as coder:
            await coder.emit(review)
            await coder.emit(GoalFailed(goal_id="g1", reason="forged"))
            await coder.emit(StepStarted(goal_id="g1", step_id="code", role="coder"))
        async with await Bus.connect(bus.settings, name="reviewer", role="reviewer", check=False) as reviewer:
            await reviewer.emit(review.model_copy(update={"event_id": "genuine"}))
        await caught_up(eventually, client, bus)
        assert (await client.sql("SELECT subject FROM events ORDER BY seq")).rows == [
            ("mesh.event.g1.coder.step.started",), ("mesh.event.g1.reviewer.step.completed",)]
    sub = await bus._js.pull_subscribe(bus.topology.dlq_subject("ledger"), stream=bus.topology.dlq_stream)
    letters = [DeadLetter.decode(msg.data) for msg in await sub.fetch(2, timeout=5)]
    assert [letter.error for letter in letters] == ["ForgedEvent", "ForgedEvent"]
    assert "step.completed event emitted by role coder: only reviewer emits it" in letters[0].reason
    assert "goal.failed event emitted by role coder: only planner emits it" in letters[1].reason


async def test_no_ledger_running_is_a_clear_error(client: LedgerClient) -> None:
    with pytest.raises(LedgerError, match="is the ledger node running"):
        await client.status()


async def test_a_recreated_stream_gets_a_new_ledger_file(bus: Bus, settings: MeshSettings, client: LedgerClient,
                                                         eventually: Eventually) -> None:
    """Sequences of a deleted and recreated stream start at 1 again: the old file is set aside
    instead of skipping the new stream's first messages as already stored."""
    async with recording(bus, settings):
        await publish_burst(bus, burst(120, seed=1))
        await caught_up(eventually, client, bus)
    await bus._js.delete_stream(bus.topology.events_stream)
    await bus.provision()
    await publish_burst(bus, burst(80, seed=2))
    async with recording(bus, settings):
        await caught_up(eventually, client, bus)
        assert (await client.sql("SELECT count(*), min(seq), max(seq) FROM events")).rows == [(80, 1, 80)]
    (aside,) = [p for p in settings.ledger_file.parent.glob("ledger.*.duckdb") if p != settings.ledger_file]
    assert len(tables(aside)["events"]) == 120
