"""Read-only queries: the guard refuses writes, multiple statements and file access; limits hold;
typed queries answer; parquet export writes every table."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from mesh.bus import Topology
from mesh.contracts.events import likely_emitter
from mesh.errors import LedgerError, QueryRefused, ResultTooLarge
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
    "pg_settings": "SELECT name, setting FROM pg_catalog.pg_settings",
    "pg_settings unqualified": "SELECT * FROM pg_settings",
    "pg_settings in a subquery": "SELECT (SELECT setting FROM pg_catalog.pg_settings LIMIT 1) FROM events",
    "pg_settings in a CTE": "WITH s AS (FROM pg_catalog.pg_settings) SELECT * FROM s",
    "pg_settings joined": "SELECT e.seq FROM events e JOIN pg_catalog.pg_settings p ON p.name = e.type",
    "pg_settings quoted": 'SELECT * FROM "pg_catalog"."PG_SETTINGS"',
    "current_setting": "SELECT current_setting('memory_limit')",
    "current_setting upper case": "SELECT CURRENT_SETTING('temp_directory')",
    "current_setting qualified": "SELECT pg_catalog.current_setting('threads')",
    "current_setting in a lambda": "SELECT list_transform(['threads'], x -> current_setting(x))",
    "current_setting in WHERE": "SELECT seq FROM events WHERE current_setting('threads') IS NOT NULL",
    "current_setting in ORDER BY": "SELECT seq FROM events ORDER BY current_setting('home_directory')",
    "getvariable": "SELECT getvariable('x')",
    "prepared statements": "SELECT * FROM pg_catalog.pg_prepared_statements",
    "databases view": "SELECT * FROM duckdb_databases",
    "databases function": "SELECT * FROM duckdb_databases()",
    "database list": "SELECT * FROM pragma_database_list",
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


def test_refused_settings_say_why(queries: LedgerQueries) -> None:
    with pytest.raises(QueryRefused, match=r"current_setting\(\) is not allowed"):
        queries.sql("SELECT current_setting('memory_limit')")
    with pytest.raises(QueryRefused, match="'pg_settings' is not allowed"):
        queries.sql("SELECT * FROM pg_catalog.pg_settings")
    assert queries.sql("SELECT count(*) FROM pg_catalog.pg_tables").rows  # the rest of the catalog is readable


def test_a_result_above_the_byte_cap_is_refused_not_cut(queries: LedgerQueries) -> None:
    big = "SELECT seq, repeat('x', 1000) AS pad FROM events ORDER BY seq"
    with pytest.raises(ResultTooLarge, match="exceeds the limit of 20000 bytes") as caught:
        queries.sql(big, max_bytes=20_000)
    assert isinstance(caught.value, QueryRefused)
    fits = queries.sql("SELECT seq, repeat('x', 100) AS pad FROM events ORDER BY seq LIMIT 50", max_bytes=20_000)
    data = fits.encode()
    assert len(data) <= 20_000 and len(fits.rows) == 50 and not fits.truncated
    assert json.loads(data) == json.loads(json.dumps(fits.to_json()))  # the streamed JSON is the whole answer
    with pytest.raises(ResultTooLarge):  # the cap counts the columns and types too
        queries.sql("SELECT 1 AS " + ", 1 AS ".join(f"c{i}" for i in range(100)), max_bytes=1024)


def test_a_huge_result_never_materialises(ledger: Ledger) -> None:
    """A 1 GB result against a 1 MiB cap: refused after about a megabyte of rows has been read."""
    capped = LedgerQueries(ledger, timeout=30, max_rows=2_000_000, max_bytes=1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(ResultTooLarge):
            capped.sql("SELECT repeat('x', 1000) AS s FROM range(1000000)")  # 1 GB as JSON
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024 * 1024, f"{peak:,} B of Python heap for a refused result"


def test_the_time_limit_covers_the_conversion_to_json(ledger: Ledger) -> None:
    """2,000,000 rows are quick for DuckDB (~0.5 s) and slow to convert (~5 s): the limit stops the conversion."""
    roomy = LedgerQueries(ledger, timeout=1.0, max_rows=2_000_000, max_bytes=1 << 30)
    with pytest.raises(QueryRefused, match="time limit of 1 s"):
        roomy.sql("SELECT range AS i, range::VARCHAR AS s FROM range(2000000)")


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
