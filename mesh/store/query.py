"""Read-only queries over a ledger: a guard for untrusted SQL, limits, and the typed queries.

Untrusted SQL must pass three independent walls, so one mistake is not a breach:

1. DuckDB's own parser (``extract_statements``): exactly one statement, of type SELECT (which
   includes WITH, FROM-first, DESCRIBE, SUMMARIZE, SHOW);
2. the statement's syntax tree (``json_serialize_sql``): tables must be the ledger's own relations or
   the query's CTEs, table functions come from a short allowlist — so no ``read_csv``, ``glob``,
   ``read_text``, ``'file.parquet'`` scans, ``query()`` or Python-object replacement scans;
3. the database itself, locked down before serving (``Ledger.lock_down``): no file, network or
   extension access, configuration frozen.

Settings-revealing relations and functions (``pg_catalog.pg_settings``, ``current_setting()``,
``duckdb_settings()`` …) are refused by the guard: they show paths and configuration.

Every query runs on its own cursor with a time limit (the cursor is interrupted, and converting rows to
JSON checks the same deadline), a row limit, and a result byte cap: rows are fetched a few at a time
and counted as JSON as they come, so an answer above the cap is refused (``ResultTooLarge``) without
ever being held whole. The time limit covers the conversion, which runs in the caller's thread.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from datetime import time as dtime
from decimal import Decimal
from typing import Any, Literal
from uuid import UUID

import duckdb

from mesh.errors import LedgerError, QueryRefused, ResultTooLarge
from mesh.store.ledger import Ledger

# Table functions that touch nothing outside the query itself (or only the ledger's own catalog).
SAFE_TABLE_FUNCTIONS = frozenset({
    "range", "generate_series", "unnest", "json_each", "json_tree",
    "duckdb_tables", "duckdb_columns", "duckdb_views", "duckdb_types",
})
# Schemas whose relations are catalog metadata, readable by anyone (but for the revealing ones below).
_CATALOG_SCHEMAS = frozenset({"information_schema", "pg_catalog"})
# Catalog relations and scalar functions that reveal settings (file paths, limits) or other sessions' SQL.
REVEALING_RELATIONS = frozenset({"pg_settings", "pg_prepared_statements"})
REVEALING_FUNCTIONS = frozenset({"current_setting", "getvariable", "getenv"})
MAX_QUERY_CHARS = 20_000
MAX_RESULT_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class QueryResult:
    """Rows of one query, with column names and DuckDB type names."""

    columns: list[str]
    types: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool = False
    elapsed_ms: float = 0.0
    encoded_rows: list[str] = field(default_factory=list, repr=False, compare=False)  # each row as JSON

    def encode(self) -> bytes:
        """The answer as JSON bytes (``to_json``'s document), from the rows encoded while they were fetched."""
        return (f'{{"columns": {json.dumps(self.columns)}, "types": {json.dumps(self.types)}, '
                f'"rows": [{", ".join(self.encoded_rows)}], "truncated": {json.dumps(self.truncated)}, '
                f'"elapsed_ms": {round(self.elapsed_ms, 3)}}}').encode()

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: timestamps as RFC 3339, decimals as floats, maps as objects."""
        return {"columns": self.columns, "types": self.types,
                "rows": [[jsonable(v) for v in r] for r in self.rows],
                "truncated": self.truncated, "elapsed_ms": round(self.elapsed_ms, 3)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> QueryResult:
        return cls(columns=list(doc["columns"]), types=list(doc["types"]),
                   rows=[tuple(r) for r in doc["rows"]], truncated=bool(doc.get("truncated")),
                   elapsed_ms=float(doc.get("elapsed_ms", 0.0)))

    def records(self) -> Iterator[dict[str, Any]]:
        return (dict(zip(self.columns, row)) for row in self.rows)


def jsonable(value: Any) -> Any:
    """A DuckDB result value as plain JSON data."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (datetime, date, dtime)):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


# --- the guard ------------------------------------------------------------------------------------


def check_query(sql: str, relations: frozenset[str], parser: duckdb.DuckDBPyConnection,
                catalog: str = "") -> None:
    """Raise ``QueryRefused`` unless ``sql`` is one read-only SELECT over ``relations`` (of ``catalog``).

    ``parser`` is any connection: it only serialises the syntax tree, it runs nothing.
    """
    if len(sql) > MAX_QUERY_CHARS:
        raise QueryRefused(f"query of {len(sql)} characters exceeds the limit of {MAX_QUERY_CHARS}")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryRefused(f"cannot parse the query: {exc}") from exc
    if len(statements) != 1:
        raise QueryRefused(f"exactly one statement is accepted; got {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryRefused(f"only read-only SELECT/WITH queries are accepted, not {kind.name}")
    # fetchall, never fetchone: a result left unread keeps the cursor's transaction open, and while any
    # transaction is open DuckDB skips its automatic checkpoints — the writer's WAL and memory then grow
    # without bound (found by the soak: +120 MB/min on the ledger node).
    rows = parser.execute("SELECT json_serialize_sql(?::VARCHAR)", [sql]).fetchall()
    tree = json.loads(rows[0][0]) if rows else {"error": True, "error_message": "no syntax tree"}
    if tree.get("error"):
        raise QueryRefused(f"query form not accepted: {tree.get('error_message', 'unknown')}")
    nodes = list(_walk(tree["statements"]))
    ctes = {entry["key"].lower() for node in nodes for entry in node.get("cte_map", {}).get("map", [])}
    for node in nodes:
        kind_ = node.get("type")
        if node.get("class") == "FUNCTION" and str(node.get("function_name", "")).lower() in REVEALING_FUNCTIONS:
            raise QueryRefused(f"function {node['function_name']}() is not allowed: ledger queries may not read "
                               "the database's settings or environment")
        if kind_ == "BASE_TABLE":
            _check_table(node, relations | ctes, catalog)
        elif kind_ == "TABLE_FUNCTION":
            name = str(node["function"].get("function_name", "")).lower()
            if name not in SAFE_TABLE_FUNCTIONS:
                allowed = ", ".join(sorted(SAFE_TABLE_FUNCTIONS))
                raise QueryRefused(f"table function {name}() is not allowed: ledger queries may not read "
                                   f"files, run nested SQL or load extensions (allowed: {allowed})")


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _check_table(node: Mapping[str, Any], allowed: frozenset[str], catalog: str) -> None:
    name, schema_ = str(node.get("table_name", "")), str(node.get("schema_name", "")).lower()
    catalog_ = str(node.get("catalog_name", ""))
    if catalog_ not in ("", catalog):
        raise QueryRefused(f"unknown database {catalog_!r}: ledger queries may read only the ledger")
    if name.lower() in REVEALING_RELATIONS:
        raise QueryRefused(f"relation {name!r} is not allowed: ledger queries may not read the database's settings")
    if schema_ in _CATALOG_SCHEMAS:
        return
    if schema_ not in ("", "main") or name.lower() not in allowed:
        qualified = ".".join(p for p in (catalog_, schema_, name) if p)
        raise QueryRefused(f"unknown relation {qualified!r}: ledger queries may read only the ledger's "
                           f"tables and views ({', '.join(sorted(allowed))})")


# --- running queries ------------------------------------------------------------------------------


class LedgerQueries:
    """Guarded, limited read-only queries over one ``Ledger``; safe to call from several threads.

    Creating it locks the ledger down (``Ledger.lock_down``) unless ``lock_down=False`` — only for
    trusted callers that still need parquet export from the same process.
    """

    def __init__(self, ledger: Ledger, *, timeout: float = 10.0, max_rows: int = 10_000,
                 max_bytes: int = MAX_RESULT_BYTES, lock_down: bool = True) -> None:
        self.ledger, self.timeout, self.max_rows, self.max_bytes = ledger, timeout, max_rows, max_bytes
        if lock_down:
            ledger.lock_down()
        self._parser = ledger.cursor()
        rows = self._parser.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()
        self.relations = frozenset(r[0].lower() for r in rows)
        rows = self._parser.execute("SELECT current_database()").fetchall()  # fetchall: see check_query
        self.catalog = str(rows[0][0]) if rows else ""
        self._parser_lock = threading.Lock()

    def sql(self, sql: str, *, timeout: float | None = None, max_rows: int | None = None,
            max_bytes: int | None = None) -> QueryResult:
        """Run untrusted SQL: refused unless a single read-only SELECT over the ledger's relations."""
        with self._parser_lock:  # one cursor serves every guard check; DuckDB cursors are not shared
            check_query(sql, self.relations, self._parser, self.catalog)
        return self._run(sql, (), timeout=timeout, max_rows=max_rows, max_bytes=max_bytes)

    def _run(self, sql: str, params: Sequence[Any] | Mapping[str, Any], *, timeout: float | None = None,
             max_rows: int | None = None, max_bytes: int | None = None) -> QueryResult:
        """Rows up to ``max_rows`` (``truncated`` says there were more); ``ResultTooLarge`` as soon as the
        rows as JSON pass ``max_bytes``; ``QueryRefused`` past ``timeout``, conversion included."""
        timeout = self.timeout if timeout is None else min(timeout, self.timeout)
        max_rows = self.max_rows if max_rows is None else max(0, min(max_rows, self.max_rows))
        max_bytes = self.max_bytes if max_bytes is None else min(max_bytes, self.max_bytes)
        cursor = self.ledger.cursor()
        timer = threading.Timer(timeout, cursor.interrupt)
        started = time.perf_counter()
        timer.start()
        try:
            cursor.execute(sql, params)
            description = cursor.description or []
            columns, types = [d[0] for d in description], [str(d[1]) for d in description]
            head = len(json.dumps([columns, types])) + 96  # the answer's keys and other fields
            rows, encoded, truncated = self._fetch(cursor, started + timeout, timeout, max_rows, max_bytes, head)
        except duckdb.InterruptException as exc:
            raise QueryRefused(f"query exceeded the time limit of {timeout:g} s and was stopped") from exc
        except duckdb.Error as exc:
            raise LedgerError(f"query failed: {exc}") from exc
        finally:
            timer.cancel()
            cursor.close()
        return QueryResult(columns=columns, types=types, rows=rows, truncated=truncated,
                           elapsed_ms=(time.perf_counter() - started) * 1000, encoded_rows=encoded)

    @staticmethod
    def _fetch(cursor: duckdb.DuckDBPyConnection, deadline: float, timeout: float, max_rows: int,
               max_bytes: int, size: int) -> tuple[list[tuple[Any, ...]], list[str], bool]:
        """(rows, the rows as JSON, whether there were more than ``max_rows``), fetched in chunks sized by
        the bytes per row so far, so that little more than ``max_bytes`` (of which ``size`` are taken)
        is ever held."""
        rows: list[tuple[Any, ...]] = []
        encoded: list[str] = []
        chunk = 1  # then doubling, but never more rows than the bytes per row so far leave room for
        while len(rows) < max_rows:
            got = cursor.fetchmany(min(chunk, max_rows - len(rows)))
            if not got:
                return rows, encoded, False
            for row in got:
                text = json.dumps([jsonable(v) for v in row])
                size += len(text) + 2
                if size > max_bytes:
                    raise ResultTooLarge(max_bytes)
                encoded.append(text)
            rows.extend(got)
            if time.perf_counter() > deadline:
                raise QueryRefused(f"query exceeded the time limit of {timeout:g} s and was stopped")
            chunk = max(1, min(2048, 2 * chunk, (max_bytes - size) * len(rows) // max(size, 1)))
        return rows, encoded, bool(cursor.fetchmany(1))

    # --- typed queries -----------------------------------------------------------------------------

    def goal_summary(self, goal_id: str | None = None, *, limit: int = 50,
                     max_bytes: int | None = None) -> QueryResult:
        """One goal's summary, or the latest ``limit`` goals'."""
        if goal_id is not None:
            return self._run("SELECT * FROM goal_summary WHERE goal_id = ?", [goal_id], max_bytes=max_bytes)
        return self._run("SELECT * FROM goal_summary ORDER BY submitted_at DESC NULLS LAST, goal_id LIMIT ?",
                         [limit], max_bytes=max_bytes)

    def usage(self, *, goal_id: str | None = None,
              by: Literal["tier", "model", "goal"] = "tier", max_bytes: int | None = None) -> QueryResult:
        """Backend calls, tokens, cost and latency grouped by tier, model or goal (optionally of one goal)."""
        if by not in ("tier", "model", "goal"):
            raise QueryRefused(f"usage can be grouped by tier, model or goal, not {by!r}")
        key = "goal_id" if by == "goal" else by
        return self._run(
            f"SELECT {key}, count(*) AS calls, count(*) FILTER (outcome <> 'ok') AS errors, "
            "sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens, "
            "sum(cached_tokens) AS cached_tokens, sum(reasoning_tokens) AS reasoning_tokens, "
            "sum(cost_usd) AS cost_usd, avg(latency_ms) AS mean_latency_ms "
            f"FROM backend_calls WHERE $goal IS NULL OR goal_id = $goal "
            f"GROUP BY {key} ORDER BY cost_usd DESC, {key}",
            {"goal": goal_id}, max_bytes=max_bytes)

    def routing_stats(self, *, max_bytes: int | None = None) -> QueryResult:
        """Per router model and chosen tier: decisions, exploration, mean propensity, and how the
        routed steps ended (latest attempt of each step)."""
        return self._run(
            """WITH outcome AS (
                   SELECT goal_id, step_id, arg_max(status, attempt) AS status FROM steps GROUP BY ALL)
               SELECT r.model_version, r.tier, count(*) AS decisions,
                      count(*) FILTER (r.explored) AS explored,
                      count(*) FILTER (r.overridden_by IS NOT NULL) AS overridden,
                      avg(r.propensity) AS mean_propensity,
                      avg(r.thinking::INTEGER) AS thinking_rate,
                      count(*) FILTER (o.status = 'completed') AS steps_completed,
                      count(*) FILTER (o.status = 'failed') AS steps_failed
               FROM route_decisions r LEFT JOIN outcome o USING (goal_id, step_id)
               GROUP BY ALL ORDER BY r.model_version, r.tier""", (), max_bytes=max_bytes)
