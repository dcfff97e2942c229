"""The ledger file: exactly-once ingest, derived tables, batch independence, versions and migrations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from mesh.bus import Topology
from mesh.contracts import (
    Artifact,
    ArtifactCreated,
    ArtifactRef,
    BackendCall,
    Event,
    Goal,
    GoalCompleted,
    GoalSubmitted,
    NodeDown,
    NodeUp,
    StepCompleted,
    StepDispatched,
    StepFailed,
    StepProgress,
    Usage,
)
from mesh.contracts.events import likely_emitter
from mesh.errors import LedgerError, LedgerVersionError
from mesh.store import Ledger, schema
from mesh.store.synthetic import synthetic_events

TOPO = Topology()
Batch = list[tuple[int, str, Event]]


def numbered(events: list[Event], start: int = 1) -> Batch:
    return [(start + i, TOPO.event_subject(e.goal_id, likely_emitter(e), e.type), e) for i, e in enumerate(events)]


def table_rows(ledger: Ledger, table: str) -> list[tuple[object, ...]]:
    return ledger.cursor().execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()


def chunks(batch: Batch, size: int) -> Iterator[Batch]:
    for i in range(0, len(batch), size):
        yield batch[i:i + size]


@pytest.fixture
def history() -> Batch:
    return numbered(list(synthetic_events(3_000, seed=7)))


def test_new_file_records_its_version_and_starts_at_zero(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.duckdb") as ledger:
        assert ledger.schema_version == schema.SCHEMA_VERSION
        assert ledger.last_seq() == 0
        assert set(schema.TABLES) <= {r[0] for r in ledger.cursor().execute("SHOW TABLES").fetchall()}


def test_ingest_skips_sequences_at_or_below_the_high_water_mark(tmp_path: Path, history: Batch) -> None:
    path = tmp_path / "l.duckdb"
    with Ledger(path) as ledger:
        assert ledger.ingest(history[:1000]) == 1000
        # A redelivered batch overlapping the stored range adds only what is new.
        assert ledger.ingest(history[500:1500]) == 500
        assert ledger.ingest(history[:1500]) == 0
        assert ledger.last_seq() == 1500
    with Ledger(path) as reopened:  # the mark survives a restart
        assert reopened.last_seq() == 1500
        assert reopened.ingest(history[1000:]) == len(history) - 1500
        seqs = reopened.cursor().execute("SELECT count(*), count(DISTINCT seq), max(seq) FROM events").fetchone()
        assert seqs == (len(history), len(history), len(history))


def test_duplicate_sequences_inside_one_batch_count_once(tmp_path: Path, history: Batch) -> None:
    with Ledger(tmp_path / "l.duckdb") as ledger:
        assert ledger.ingest([*history[:10], *history[5:10], *reversed(history[10:20])]) == 20
        assert ledger.cursor().execute("SELECT list(seq ORDER BY seq) FROM events").fetchone()[0] == list(
            range(1, 21))


def test_failed_batch_leaves_nothing_behind(tmp_path: Path, history: Batch) -> None:
    with Ledger(tmp_path / "l.duckdb") as ledger:
        ledger.ingest(history[:100])
        before = {t: table_rows(ledger, t) for t in schema.TABLES}
        # Another writer slipped a row in at seq 150: the batch 101..200 violates the primary key.
        ledger.cursor().execute("INSERT INTO events SELECT 150, subject, event_id, goal_id, type, ts, node, payload "
                                "FROM events WHERE seq = 1")
        with pytest.raises(LedgerError, match="transaction failed"):
            ledger.ingest(history[100:200])
        ledger.cursor().execute("DELETE FROM events WHERE seq = 150")
        assert {t: table_rows(ledger, t) for t in schema.TABLES} == before
        assert ledger.last_seq() == 100
        assert ledger.ingest(history[100:200]) == 100


def test_derived_tables_follow_a_goal(tmp_path: Path) -> None:
    goal = Goal(goal_id="g1", brief="build a login system", constraints=["python only"])
    ref = ArtifactRef(digest="a" * 64, size=10, name="login.py")
    ref2 = ArtifactRef(digest="b" * 64, size=12, name="review.md")
    usage = Usage(prompt_tokens=100, completion_tokens=20, cost_usd=0.01, calls=1)
    step = dict(goal_id="g1", step_id="code", role="coder", node="coder-1")
    events: list[Event] = [
        NodeUp(goal_id="_system", node="coder-1", role="coder", host="h", pid=42, version="0.1"),
        GoalSubmitted(goal_id="g1", goal=goal),
        StepDispatched(task_id="g1.code.1", **step),
        BackendCall(goal_id="g1", step_id="code", tier="edge", model="m", usage=usage, latency_ms=12.5),
        StepFailed(error="boom", retryable=True, **step),
        StepDispatched(task_id="g1.code.2", attempt=2, **step),
        StepProgress(message="half", fraction=0.5, attempt=2, **step),
        BackendCall(goal_id="g1", step_id="code", tier="swarm", model="k", usage=usage, outcome="RateLimited"),
        ArtifactCreated(goal_id="g1", artifact=Artifact(ref=ref, goal_id="g1", producer_step="code")),
        ArtifactCreated(goal_id="g1", artifact=Artifact(ref=ref2, goal_id="g1", parents=[ref.digest])),
        StepCompleted(outputs=[ref], usage=usage, tier="edge", attempt=2, **step),
        GoalCompleted(goal_id="g1", result=ref, usage=usage + usage, steps_run=1),
        NodeDown(goal_id="_system", node="coder-1", role="coder", reason="drain"),
    ]
    with Ledger(tmp_path / "l.duckdb") as ledger:
        for item in numbered(events):  # one event per batch: every merge path runs
            ledger.ingest([item])
        cur = ledger.cursor()
        assert cur.execute("SELECT status, brief, constraints, result_digest, steps_run, prompt_tokens, cost_usd "
                           "FROM goals").fetchall() == [("completed", goal.brief, ["python only"], ref.digest, 1,
                                                         200, 0.02)]
        assert cur.execute("SELECT attempt, status, task_id, error, progress, outputs, tier FROM steps "
                           "ORDER BY attempt").fetchall() == [
            (1, "failed", "g1.code.1", "boom", None, None, None),
            (2, "completed", "g1.code.2", None, "half", [ref.digest], "edge")]
        assert cur.execute("SELECT tier, outcome, prompt_tokens FROM backend_calls ORDER BY seq").fetchall() == [
            ("edge", "ok", 100), ("swarm", "RateLimited", 100)]
        assert cur.execute("SELECT digest, parent FROM artifact_lineage").fetchall() == [(ref2.digest, ref.digest)]
        assert cur.execute("SELECT status, host, pid, down_reason FROM nodes").fetchall() == [
            ("down", "h", 42, "drain")]
        summary = dict(zip([d[0] for d in cur.execute("SELECT * FROM goal_summary").description],
                           cur.fetchone()))
        assert summary["step_attempts"] == 2 and summary["steps_failed"] == 1 and summary["backend_errors"] == 1
        assert summary["backend_calls"] == 2 and summary["prompt_tokens"] == 200
        assert {r[0]: r[1:3] for r in cur.execute("SELECT tier, calls, ok_calls FROM tier_stats").fetchall()} == {
            "edge": (1, 1), "swarm": (1, 0)}


@pytest.mark.parametrize(("count", "sizes"), [(150, (1,)), (3_000, (7, 300, 1, 50))])
def test_tables_do_not_depend_on_batch_boundaries(tmp_path: Path, history: Batch, count: int,
                                                  sizes: tuple[int, ...]) -> None:
    history = history[:count]
    with Ledger(tmp_path / "whole.duckdb") as whole, Ledger(tmp_path / "parts.duckdb") as parts:
        whole.ingest(history)
        rest, size_iter = history, iter(sizes * len(history))
        while rest:
            n = next(size_iter)
            parts.ingest(rest[:n])
            rest = rest[n:]
        for table in schema.TABLES:
            assert table_rows(parts, table) == table_rows(whole, table), table


def test_an_older_release_refuses_a_newer_file(tmp_path: Path) -> None:
    path = tmp_path / "l.duckdb"
    Ledger(path).close()
    with duckdb.connect(str(path)) as con:
        con.execute("UPDATE ledger_meta SET value = ? WHERE key = 'schema_version'", [str(schema.SCHEMA_VERSION + 1)])
    with pytest.raises(LedgerVersionError, match=f"schema version {schema.SCHEMA_VERSION + 1}"):
        Ledger(path)


def test_a_foreign_duckdb_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE t (x INTEGER)")
    with pytest.raises(LedgerError, match="not a ledger"):
        Ledger(path)


def test_read_only_open_reads_without_the_writer_lock(tmp_path: Path, history: Batch) -> None:
    path = tmp_path / "l.duckdb"
    with Ledger(path) as ledger:
        ledger.ingest(history[:50])
    with Ledger(path, read_only=True) as a, Ledger(path, read_only=True) as b:
        assert a.last_seq() == b.last_seq() == 50
        with pytest.raises(LedgerError, match="read-only"):
            a.ingest(history[50:60])
    with pytest.raises(LedgerError, match="no ledger file"):
        Ledger(tmp_path / "missing.duckdb", read_only=True)


def test_a_newer_release_migrates_an_older_file(tmp_path: Path, history: Batch,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A hand-made file at the current version (raw events only, derived tables stale) opened by a
    release one version newer, whose migration adds a column: the migration runs, every derived
    table is re-folded from the events, and the data survives."""
    path = tmp_path / "old.duckdb"
    reference = tmp_path / "reference.duckdb"
    with Ledger(reference) as ref:
        ref.ingest(history)
        expected = {t: table_rows(ref, t) for t in schema.DERIVED_TABLES}
    with duckdb.connect(str(path)) as con:  # the older file, by hand
        con.execute(schema.META_DDL)
        for ddl in (*schema.RAW_DDL, *schema.DERIVED_DDL):
            con.execute(ddl)
        con.execute(f"ATTACH '{reference}' AS ref (READ_ONLY)")
        con.execute("INSERT INTO events SELECT * FROM ref.events")
        con.execute("DETACH ref")
        con.execute("INSERT INTO ledger_meta VALUES ('schema_version', ?), ('last_seq', ?)",
                    [str(schema.SCHEMA_VERSION), str(len(history))])

    newer = schema.SCHEMA_VERSION + 1
    monkeypatch.setattr(schema, "SCHEMA_VERSION", newer)
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, schema.Migration(
        newer, ("ALTER TABLE events ADD COLUMN received_at TIMESTAMPTZ",))))
    with Ledger(path) as migrated:
        assert migrated.schema_version == newer
        assert migrated.last_seq() == len(history)
        assert "received_at" in [d[0] for d in migrated.cursor().execute("SELECT * FROM events LIMIT 0").description]
        for table in schema.DERIVED_TABLES:
            assert table_rows(migrated, table) == expected[table], table


def test_a_gap_in_the_migration_path_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "l.duckdb"
    Ledger(path).close()
    monkeypatch.setattr(schema, "SCHEMA_VERSION", schema.SCHEMA_VERSION + 2)
    with pytest.raises(LedgerError, match="no migration path"):
        Ledger(path)
    monkeypatch.undo()
    assert Ledger(path, read_only=True).schema_version == schema.SCHEMA_VERSION  # untouched


def test_upto_moves_the_mark_past_skipped_messages(tmp_path: Path, history: Batch) -> None:
    with Ledger(tmp_path / "l.duckdb") as ledger:
        assert ledger.ingest(history[:10], upto=12) == 10  # 11 and 12 were dead-lettered
        assert ledger.last_seq() == 12
        assert ledger.ingest([], upto=15) == 0 and ledger.last_seq() == 15
        assert ledger.ingest(history[10:20]) == 5  # 16..20
        assert ledger.ingest([], upto=3) == 0 and ledger.last_seq() == 20
