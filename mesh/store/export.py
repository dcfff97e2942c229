"""Parquet export of every ledger table, for offline analysis (pandas, polars, Spark, DuckDB itself)."""

from __future__ import annotations

from pathlib import Path

import duckdb

from mesh.errors import LedgerError
from mesh.store.ledger import Ledger
from mesh.store.schema import TABLES

# A stable row order makes exports of equal ledgers byte-comparable.
_ORDER = {"goals": "goal_id", "steps": "goal_id, step_id, attempt", "nodes": "node_id", "approvals": "goal_id, request"}


def export_parquet(ledger: Ledger, directory: str | Path) -> list[Path]:
    """Write ``<table>.parquet`` for every table into ``directory``; return the files written."""
    if ledger.locked:
        raise LedgerError("this ledger is locked down for serving queries and cannot write files; "
                          "export from a process that does not serve queries (e.g. `mesh ledger export`)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cursor = ledger.cursor()
    written = []
    try:
        for table in TABLES:
            path = out / f"{table}.parquet"
            literal = str(path).replace("'", "''")  # COPY takes no parameters for its target
            cursor.execute(f"COPY (SELECT * FROM {table} ORDER BY {_ORDER.get(table, 'seq')}) "
                           f"TO '{literal}' (FORMAT parquet, COMPRESSION zstd)")
            written.append(path)
    except duckdb.Error as exc:
        raise LedgerError(f"parquet export to {out} failed: {exc}") from exc
    finally:
        cursor.close()
    return written
