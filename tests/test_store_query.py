"""Read-only queries: the guard refuses writes, multiple statements and file access; limits hold;
typed queries answer; parquet export writes every table."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from mesh.bus import Topology
from mesh.contracts.events import likely_emitter
from mesh.errors import LedgerError, QueryRefused
from mesh.store import Ledger, schema
from mesh.store.export import export_parquet
from mesh.store.query import LedgerQueries
from mesh.store.synthetic import synthetic_events

TOPO = Topology()


def fill(ledger: Ledger, count: int = 2_000) -> None:
    ledger.ingest([(i + 1, TOPO.event_subject(e.goal_id, likely_emitter(e), e.type), e)
                   for i, e in enumerate(synthetic_events(count, seed=3))])


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    """Shared by the module's read-only tests (each refusal test checks nothing changed)."""
    with Ledger(tmp_path_factory.mktemp("ledger") / "l.duckdb") as opened:
        fill(opened)
        yield opened


@pytest.fixture(scope="module")
def queries(ledger: Ledger) -> LedgerQueries:
    return LedgerQueries(ledger, timeout=2.0, max_rows=100)


REFUSED = {
    "two statements": "SELECT 1; SELECT 2",
    "select then write": "SELECT 1; DROP TABLE events",
    "insert": "INSERT INTO events SELECT * FROM events",
    "update": "UPDATE goals SET status = 'x'",
    "delete": "DELETE FROM goals",
    "drop": "DROP TABLE events",
    "create": "CREATE TABLE x AS SELECT 1",
    "write cte": "WITH x AS (SELECT 1) INSERT INTO nodes SELECT * FROM nodes",
    "attach": "ATTACH '/tmp/evil.duckdb' AS evil",
    "copy out": "COPY events TO '/tmp/events.csv'",
    "copy in": "COPY events FROM '/etc/passwd'",
    "export": "EXPORT DATABASE '/tmp/x'",
    "install": "INSTALL httpfs",
    "load": "LOAD httpfs",
    "pragma": "PRAGMA database_list",
    "set": "SET threads = 1",
    "call": "CALL checkpoint()",
    "read_csv": "SELECT * FROM read_csv('/etc/passwd')",
    "read_parquet": "SELECT * FROM read_parquet('/tmp/*.parquet')",
    "read_json": "SELECT * FROM read_json_auto('/etc/hosts')",
    "read_text": "SELECT * FROM read_text('/etc/passwd')",
    "read_blob": "SELECT * FROM read_blob('/etc/passwd')",
    "glob": "SELECT * FROM glob('/*')",
    "file scan": "SELECT * FROM '/etc/passwd'",
    "file scan in subquery": "SELECT (SELECT count(*) FROM 'data.csv') FROM events",
    "nested sql": "SELECT * FROM query('DROP TABLE events')",
    "settings": "SELECT * FROM duckdb_settings()",
    "other database": "SELECT * FROM other.main.events",
    "other schema": "SELECT * FROM temp.main.events",
    "python object": "SELECT * FROM ledger",
    "empty": "-- nothing",
}


@pytest.mark.parametrize("sql", REFUSED.values(), ids=REFUSED.keys())
def test_refused(queries: LedgerQueries, ledger: Ledger, sql: str) -> None:
    before = ledger.cursor().execute("SELECT count(*) FROM events").fetchone()
    with pytest.raises(QueryRefused):
        queries.sql(sql)
    assert ledger.cursor().execute("SELECT count(*) FROM events").fetchone() == before


def test_refusals_say_why(queries: LedgerQueries) -> None:
    with pytest.raises(QueryRefused, match="exactly one statement"):
        queries.sql("SELECT 1; SELECT 2")
    with pytest.raises(QueryRefused, match="not DELETE"):
        queries.sql("DELETE FROM goals")
    with pytest.raises(QueryRefused, match=r"read_csv\(\) is not allowed"):
        queries.sql("SELECT * FROM read_csv('/etc/passwd')")


ACCEPTED = [
    "SELECT count(*) FROM events",
    "select type, count(*) AS n from events group by all order by n desc",
    "WITH t AS (SELECT * FROM backend_calls) SELECT tier, sum(cost_usd) FROM t GROUP BY tier",
    "FROM goal_summary SELECT goal_id, status LIMIT 3",
    "SELECT * FROM tier_stats",
    "SELECT g.goal_id FROM goals g JOIN steps s USING (goal_id) WHERE s.status = 'failed'",
    "SELECT i FROM range(3) t(i)",
    "SELECT * FROM information_schema.tables",
    "DESCRIBE events",
    "SHOW TABLES",
    "SELECT payload->>'$.type' FROM events LIMIT 1",
]


@pytest.mark.parametrize("sql", ACCEPTED)
def test_accepted(queries: LedgerQueries, sql: str) -> None:
    result = queries.sql(sql)
    assert result.columns and result.rows


def test_the_database_itself_is_locked_down(queries: LedgerQueries, ledger: Ledger, tmp_path: Path) -> None:
    """The third wall holds even for SQL that never passes the guard."""
    cursor = ledger.cursor()
    with pytest.raises(duckdb.Error, match="disabled by configuration"):
        cursor.execute("SELECT * FROM read_csv('/etc/passwd')")
    with pytest.raises(duckdb.Error, match="locked"):
        cursor.execute("SET enable_external_access = true")
    with pytest.raises(LedgerError, match="locked down"):
        export_parquet(ledger, tmp_path / "out")


def test_row_limit_truncates(queries: LedgerQueries) -> None:
    result = queries.sql("SELECT seq FROM events ORDER BY seq")
    assert len(result.rows) == 100 and result.truncated
    assert [r[0] for r in result.rows] == list(range(1, 101))
    small = queries.sql("SELECT seq FROM events ORDER BY seq", max_rows=5)
    assert len(small.rows) == 5 and small.truncated
    assert not queries.sql("SELECT 1").truncated


def test_time_limit_interrupts(queries: LedgerQueries) -> None:
    with pytest.raises(QueryRefused, match="time limit of 0.3 s"):
        queries.sql("SELECT sum(a.range * b.range) FROM range(100000000) a, range(1000) b", timeout=0.3)
    assert queries.sql("SELECT 1").rows == [(1,)]  # the ledger keeps serving


def test_sql_errors_are_ledger_errors(queries: LedgerQueries) -> None:
    with pytest.raises(LedgerError, match="no_such_column"):
        queries.sql("SELECT no_such_column FROM events")


def test_typed_queries(queries: LedgerQueries, ledger: Ledger) -> None:
    cur = ledger.cursor()
    goal_id = cur.execute("SELECT goal_id FROM goals WHERE status = 'completed' LIMIT 1").fetchone()[0]
    one = list(queries.goal_summary(goal_id).records())
    assert len(one) == 1 and one[0]["status"] == "completed" and one[0]["steps_completed"] >= 1
    assert len(queries.goal_summary(limit=3).rows) == 3

    by_tier = {r["tier"]: r for r in queries.usage().records()}
    assert set(by_tier) == {"edge", "long_context", "swarm"}
    total = cur.execute("SELECT count(*), sum(cost_usd) FROM backend_calls").fetchone()
    assert sum(r["calls"] for r in by_tier.values()) == total[0]
    assert sum(r["cost_usd"] for r in by_tier.values()) == pytest.approx(total[1])
    for_goal = list(queries.usage(goal_id=goal_id, by="model").records())
    assert sum(r["calls"] for r in for_goal) == cur.execute(
        "SELECT count(*) FROM backend_calls WHERE goal_id = ?", [goal_id]).fetchone()[0]
    with pytest.raises(QueryRefused):
        queries.usage(by="node")  # type: ignore[arg-type]

    routing = list(queries.routing_stats().records())
    assert sum(r["decisions"] for r in routing) == cur.execute("SELECT count(*) FROM route_decisions").fetchone()[0]
    assert all(0 < r["mean_propensity"] <= 1 for r in routing)


def test_results_are_json_ready(queries: LedgerQueries) -> None:
    import json

    doc = queries.sql("SELECT ts, probabilities, features, seq FROM route_decisions LIMIT 2").to_json()
    text = json.dumps(doc)
    assert '"probabilities"' in text and doc["rows"][0][0].startswith("2026-")
    assert isinstance(doc["rows"][0][1], dict)


def test_parquet_export_round_trips(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.duckdb") as ledger:
        fill(ledger, 500)
        files = export_parquet(ledger, tmp_path / "out")
        assert sorted(f.name for f in files) == sorted(f"{t}.parquet" for t in schema.TABLES)
        cur = ledger.cursor()
        for table in schema.TABLES:
            path = str(tmp_path / "out" / f"{table}.parquet")
            diff = cur.execute(f"SELECT count(*) FROM ((FROM {table} EXCEPT ALL FROM read_parquet('{path}')) "
                               f"UNION ALL (FROM read_parquet('{path}') EXCEPT ALL FROM {table}))").fetchone()
            assert diff == (0,), table
