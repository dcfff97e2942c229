"""The ledger file: opening, schema versions and migrations, exactly-once ingest.

A ``Ledger`` owns the DuckDB database of one file. DuckDB allows one writing process per file, which
is why the mesh has exactly one recorder; readers in that process get their own cursors (``cursor``)
and see committed data only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

import duckdb

from mesh.contracts import Event
from mesh.errors import LedgerError, LedgerVersionError
from mesh.store import schema
from mesh.store.ingest import append_events, fold_events

_LAST_SEQ = "last_seq"
_VERSION = "schema_version"
_SOURCE = "source"
# DuckDB checkpoints (compresses new rows into the file and rewrites every index) once the WAL
# passes this. Its 16 MB default means a checkpoint every ~35,000 events, each costlier as the
# tables grow, and halves sustained ingest; the price of a bigger WAL is a longer replay on restart.
_CHECKPOINT_THRESHOLD = "256MB"


class Ledger:
    """One ledger file. ``Ledger(path)`` creates it, migrates an older one, refuses a newer one.

    ``read_only`` opens an existing file without taking the writer's lock on it (it may not need a
    migration then); ``":memory:"`` is a throwaway ledger. The writer connection belongs to whichever
    thread calls ``ingest`` (DuckDB refuses concurrent calls on one connection); everything else
    reads through its own ``cursor()``.
    """

    schema_version: int

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = str(path)
        self.read_only = read_only
        if read_only and self.path != ":memory:" and not Path(self.path).exists():
            raise LedgerError(f"no ledger file at {self.path}")
        try:
            self._con = duckdb.connect(
                self.path, read_only=read_only,
                config={} if read_only else {"checkpoint_threshold": _CHECKPOINT_THRESHOLD})
        except duckdb.Error as exc:
            raise LedgerError(f"cannot open ledger {self.path} (is a ledger process already using it?): "
                              f"{exc}") from exc
        self._locked = False
        try:
            self._last_seq = self._open_schema()
        except BaseException:
            self._con.close()
            raise

    # --- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- schema ----------------------------------------------------------------------------------

    def _meta(self, key: str) -> str:
        row = self._con.execute("SELECT value FROM ledger_meta WHERE key = ?", [key]).fetchone()
        if row is None:
            raise LedgerError(f"ledger {self.path} lacks its {key!r} entry")
        return str(row[0])

    def _relations(self) -> set[str]:
        rows = self._con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()
        return {r[0] for r in rows}

    def _open_schema(self) -> int:
        """Create, check or migrate the schema; return the ingest high-water mark."""
        relations = self._relations()
        if "ledger_meta" not in relations:
            if relations:
                raise LedgerError(f"{self.path} is a DuckDB file but not a ledger "
                                  f"(it has {', '.join(sorted(relations))} and no ledger_meta)")
            if self.read_only:
                raise LedgerError(f"{self.path} is an empty file, not a ledger")
            self._create()
        version = int(self._meta(_VERSION))
        if version > schema.SCHEMA_VERSION:
            raise LedgerVersionError(
                f"ledger {self.path} has schema version {version}, but this release of mesh understands "
                f"versions up to {schema.SCHEMA_VERSION}: upgrade mesh, or rebuild the ledger from the "
                "stream with this release (`mesh ledger rebuild`)")
        if version < schema.SCHEMA_VERSION:
            if self.read_only:
                raise LedgerError(f"ledger {self.path} has schema version {version} and needs a migration to "
                                  f"{schema.SCHEMA_VERSION}; open it read-write once (start the ledger)")
            self._migrate(version)
        self.schema_version = schema.SCHEMA_VERSION
        return int(self._meta(_LAST_SEQ))

    def _create(self) -> None:
        with _transaction(self._con):
            self._con.execute(schema.META_DDL)
            for ddl in (*schema.RAW_DDL, *schema.DERIVED_DDL):
                self._con.execute(ddl)
            self._con.execute("INSERT INTO ledger_meta VALUES (?, ?), (?, '0')",
                              [_VERSION, str(schema.SCHEMA_VERSION), _LAST_SEQ])

    def _migrate(self, version: int) -> None:
        """Raw tables step by step, then the derived tables re-folded from the events, in one transaction."""
        steps = [m for m in schema.MIGRATIONS if m.version > version]
        if [m.version for m in steps] != list(range(version + 1, schema.SCHEMA_VERSION + 1)):
            raise LedgerError(f"no migration path from schema version {version} to {schema.SCHEMA_VERSION}")
        with _transaction(self._con):
            for migration in steps:
                for sql in migration.sql:
                    self._con.execute(sql)
            self._rederive()
            self._con.execute("UPDATE ledger_meta SET value = ? WHERE key = ?",
                              [str(schema.SCHEMA_VERSION), _VERSION])

    def _rederive(self) -> None:
        for view in schema.VIEWS:
            self._con.execute(f"DROP VIEW IF EXISTS {view}")
        for table in schema.DERIVED_TABLES:
            self._con.execute(f"DROP TABLE IF EXISTS {table}")
        for ddl in schema.DERIVED_DDL:
            self._con.execute(ddl)
        bounds = self._con.execute("SELECT min(seq), max(seq) FROM events").fetchone()
        if bounds is not None and bounds[0] is not None:
            fold_events(self._con, int(bounds[0]), int(bounds[1]))

    # --- ingest ----------------------------------------------------------------------------------

    def last_seq(self) -> int:
        """The highest stream sequence stored: a consumer resumes after it."""
        return self._last_seq

    def source(self) -> str | None:
        """The identity of the stream whose sequences this ledger stores, once claimed."""
        row = self._con.execute("SELECT value FROM ledger_meta WHERE key = ?", [_SOURCE]).fetchone()
        return str(row[0]) if row else None

    def claim_source(self, source: str) -> None:
        """Record which stream this ledger follows: sequences mean nothing across streams."""
        self._con.execute("INSERT OR REPLACE INTO ledger_meta VALUES (?, ?)", [_SOURCE, source])

    def ingest(self, batch: Sequence[tuple[int, str, Event]], *, upto: int | None = None) -> int:
        """Store ``(stream_seq, subject, event)`` triples and fold them into the derived tables.

        Rows and the new high-water mark commit in one transaction, and sequences at or below the
        stored mark are skipped, so re-ingesting a redelivered batch (crash after commit, before ack)
        adds nothing. ``upto`` raises the mark past stream messages that were read but are not
        events (dead-lettered), so they are not read again. Returns the number of events added.
        """
        if self.read_only:
            raise LedgerError(f"ledger {self.path} is open read-only")
        fresh = sorted({seq: item for item in batch if (seq := item[0]) > self._last_seq}.values(),
                       key=lambda item: item[0])
        hi = max(fresh[-1][0] if fresh else 0, upto or 0)
        if hi <= self._last_seq:
            return 0
        with _transaction(self._con):
            if fresh:
                append_events(self._con, fresh)
                fold_events(self._con, fresh[0][0], fresh[-1][0], {item[2].type for item in fresh})
            self._con.execute("UPDATE ledger_meta SET value = ? WHERE key = ?", [str(hi), _LAST_SEQ])
        self._last_seq = hi
        return len(fresh)

    # --- readers ---------------------------------------------------------------------------------

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new connection to the same database, for one reader thread."""
        return self._con.cursor()

    def lock_down(self) -> None:
        """Forbid file, network and extension access for the rest of this process's life.

        DuckDB settings are database-wide, so this also ends parquet export from this ``Ledger``:
        call it in processes that serve untrusted queries (the ledger service, ``mesh sql --file``).
        """
        if self._locked:
            return
        for setting in ("enable_external_access", "autoinstall_known_extensions", "autoload_known_extensions",
                        "allow_community_extensions"):
            self._con.execute(f"SET {setting} = false")
        self._con.execute("SET lock_configuration = true")
        self._locked = True

    @property
    def locked(self) -> bool:
        return self._locked



@contextmanager
def _transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """BEGIN … COMMIT; ROLLBACK on any exception. DuckDB's own errors surface as ``LedgerError``."""
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            yield
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
    except duckdb.Error as exc:
        raise LedgerError(f"ledger transaction failed: {exc}") from exc
