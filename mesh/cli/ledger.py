"""`mesh sql "<query>"` and `mesh ledger status | rebuild | export`.

``mesh sql`` asks the running ledger's query service (read-only, time- and row-limited);
``--file`` reads a ledger file directly instead (same guard, same limits), e.g. a rebuilt or
exported copy while no mesh runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from mesh.errors import LedgerError, NotConnected

if TYPE_CHECKING:  # the store imports DuckDB: only the commands that read a ledger file load it
    from mesh.config import MeshSettings
    from mesh.store.query import QueryResult


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sql", help="run a read-only SQL query on the ledger (SELECT/WITH only)")
    p.add_argument("query", help='e.g. "SELECT tier, sum(cost_usd) FROM backend_calls GROUP BY tier"')
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON array of row objects")
    fmt.add_argument("--csv", action="store_true", help="print CSV with a header row")
    p.add_argument("--max-rows", type=int, default=None, help="return at most this many rows")
    p.add_argument("--file", type=Path, default=None, help="query this ledger file instead of the service")
    p.set_defaults(handler=_sql)

    p = sub.add_parser("ledger", help="the ledger: status, rebuild from the stream, parquet export")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("status", help="the ledger's file, schema version and last stream sequence")
    a.add_argument("--json", action="store_true", help="one JSON object")
    a.set_defaults(handler=_status)
    a = actions.add_parser("rebuild", help="replay the event stream into a fresh ledger file")
    a.add_argument("--out", type=Path, default=None,
                   help="the new file (default: <data_dir>/ledger.rebuilt.duckdb)")
    a.add_argument("--until", type=int, default=None,
                   help="stop at this stream sequence (the ledger as it was then)")
    a.set_defaults(handler=_rebuild)
    a = actions.add_parser("export", help="write every ledger table as <table>.parquet")
    a.add_argument("--parquet", type=Path, required=True, metavar="DIR", help="directory to write into")
    a.add_argument("--file", type=Path, default=None, help="the ledger file (default: the configured one)")
    a.set_defaults(handler=_export)


# --- handlers -------------------------------------------------------------------------------------


def _sql(args: argparse.Namespace) -> int:
    if args.file is not None:
        from mesh.config import get_settings
        from mesh.store import Ledger
        from mesh.store.query import LedgerQueries

        settings = get_settings()
        with Ledger(args.file, read_only=True) as ledger:
            queries = LedgerQueries(ledger, timeout=settings.ledger_query_timeout,
                                    max_rows=settings.ledger_max_rows, max_bytes=settings.ledger_max_result_bytes)
            result = queries.sql(args.query, max_rows=args.max_rows)
    else:
        result = _run(lambda client: client.sql(args.query, max_rows=args.max_rows))
    print_result(result, sys.stdout, "json" if args.json else "csv" if args.csv else "table")
    return 0


def _status(args: argparse.Namespace) -> int:
    status = _run(lambda client: client.status())
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    width = max(map(len, status), default=0)
    for key, value in status.items():
        print(f"{key:<{width}}  {value if isinstance(value, str) else json.dumps(value)}")
    return 0


def _rebuild(args: argparse.Namespace) -> int:
    from mesh.config import get_settings
    from mesh.roles.recorder import rebuild

    settings = get_settings()
    out = args.out or settings.data_dir / "ledger.rebuilt.duckdb"

    async def main() -> int:
        async with await _connect(settings) as bus:
            return await rebuild(bus, out, until=args.until)

    from mesh.aio import run_loop

    count = run_loop(main())
    print(f"rebuilt {count} events into {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from mesh.config import get_settings
    from mesh.store import Ledger
    from mesh.store.export import export_parquet

    path = args.file or get_settings().ledger_file
    try:
        ledger = Ledger(path, read_only=True)
    except LedgerError as exc:
        raise LedgerError(f"{exc}\nwhile the ledger node holds the file, export a fresh copy instead: "
                          "`mesh ledger rebuild --out COPY`, then "
                          "`mesh ledger export --file COPY --parquet DIR`") from exc
    with ledger:
        for written in export_parquet(ledger, args.parquet):
            print(written)
    return 0


# --- helpers --------------------------------------------------------------------------------------


async def _connect(settings: MeshSettings) -> Any:
    from mesh.bus import Bus
    from mesh.embedded.localauth import local_settings

    settings = local_settings(settings)
    if not settings.nats_url:
        raise NotConnected("no mesh to talk to: set MESH_NATS_URL or start one with `mesh up`")
    return await Bus.connect(settings, name="mesh-ledger-cli", check=False)


def _run(ask: Any) -> Any:
    """Connect, ask the ledger service one thing, disconnect."""
    from mesh.aio import run_loop
    from mesh.config import get_settings
    from mesh.roles.ledger_service import LedgerClient

    settings = get_settings()

    async def main() -> Any:
        async with await _connect(settings) as bus:
            client = LedgerClient(bus, timeout=settings.ledger_query_timeout + 5)
            return await ask(client)

    return run_loop(main())


def print_result(result: QueryResult, out: TextIO, form: str) -> None:
    """A query result as an aligned text table, JSON records or CSV."""
    from mesh.store.query import jsonable

    if form == "json":
        json.dump([{k: jsonable(v) for k, v in r.items()} for r in result.records()], out, indent=2)
        out.write("\n")
    elif form == "csv":
        writer = csv.writer(out)
        writer.writerow(result.columns)
        writer.writerows([_cell(v) for v in row] for row in result.rows)
    else:
        cells = [result.columns, *([_cell(v) for v in row] for row in result.rows)]
        widths = [max(len(r[i]) for r in cells) for i in range(len(result.columns))]
        for n, row in enumerate(cells):
            out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
            if n == 0:
                out.write("  ".join("-" * w for w in widths) + "\n")
        out.write(f"({len(result.rows)} row{'s' if len(result.rows) != 1 else ''}"
                  f"{', truncated' if result.truncated else ''})\n")
    if result.truncated and form != "table":
        print(f"mesh: note: result truncated at {len(result.rows)} rows", file=sys.stderr)


def _cell(value: Any) -> str:
    from mesh.store.query import jsonable

    value = jsonable(value)
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)
