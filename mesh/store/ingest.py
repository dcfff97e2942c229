"""Columnar appends: a batch of events becomes three numpy columns and one ``INSERT … SELECT``.

Python touches each event once (``model_dump_json``); every other column is parsed out of that JSON
by DuckDB, vectorised, and the derived tables are folded from the inserted range in SQL
(``schema.FOLDS``). Row-by-row ``executemany`` is ~500 rows/s on DuckDB; this path is what makes
the ledger keep up with a busy stream (see ``bench/ledger.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet

import duckdb
import numpy as np

from mesh.contracts import Event
from mesh.store.schema import FOLDS

_BATCH_VIEW = "_ingest_batch"
_HEAD = '{"event_id":"VARCHAR","goal_id":"VARCHAR","type":"VARCHAR","at":"TIMESTAMPTZ","node":"VARCHAR"}'
_INSERT_EVENTS = (
    f"INSERT INTO events SELECT seq, subject, h.event_id, h.goal_id, h.type, h.at, h.node, payload "
    f"FROM (SELECT seq, subject, payload, json_transform(payload, '{_HEAD}') AS h FROM {_BATCH_VIEW})"
)


def append_events(con: duckdb.DuckDBPyConnection, batch: Sequence[tuple[int, str, Event]]) -> None:
    """Insert ``(seq, subject, event)`` rows into ``events`` as one columnar scan.

    The caller owns the transaction.
    """
    columns = {
        "seq": np.fromiter((item[0] for item in batch), dtype=np.uint64, count=len(batch)),
        "subject": np.array([item[1] for item in batch], dtype=object),
        "payload": np.array([item[2].model_dump_json() for item in batch], dtype=object),
    }
    # An explicit registration rather than a replacement scan: it does not depend on Python frame
    # lookup, which a locked-down reader connection must not have.
    con.register(_BATCH_VIEW, columns)
    try:
        con.execute(_INSERT_EVENTS)
    finally:
        con.unregister(_BATCH_VIEW)


def fold_events(con: duckdb.DuckDBPyConnection, lo: int, hi: int, types: AbstractSet[str] | None = None) -> None:
    """Fold the stored events with ``lo <= seq <= hi`` into the derived tables.

    ``types`` (the event types present in the range, when the caller knows them) skips the tables
    that read none of them: each statement costs milliseconds even when it matches no rows.
    """
    params = {"lo": lo, "hi": hi}
    for fold in FOLDS:
        if types is None or not fold.types.isdisjoint(types):
            con.execute(fold.sql, params)
