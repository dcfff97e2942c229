"""bench/query_limits: what a ledger query that would return 1 GB costs before it is refused.

In one process with a real DuckDB file: the query runs through ``LedgerQueries`` (the guard, the
chunked fetch counting JSON bytes against the result cap) and is refused; measured are its wall and
CPU time, the peak Python heap (tracemalloc) and the growth of the process's peak RSS. For contrast,
a result of 2,048 rows of 500 KB (also 1 GB): DuckDB builds a whole vector before the first row is
read, which no cap on the Python side can prevent (docs/LEDGER.md, "Limits worth knowing").

    .venv/bin/python -m bench.query_limits        # writes the "query limits" section of bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

from bench.results import finish, parse_args
from mesh.errors import ResultTooLarge
from mesh.store import Ledger
from mesh.store.query import LedgerQueries

CAP = 1024 * 1024
QUERIES = {
    "1,000,000 rows of 1 KB": "SELECT repeat('x', 1000) AS s FROM range(1000000)",
    "2,048 rows of 500 KB": "SELECT repeat('x', 500000) AS s FROM range(2048)",
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def refusal(queries: LedgerQueries, sql: str) -> str:
    rss = peak_rss_mb()
    tracemalloc.start()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        queries.sql(sql)
        outcome = "answered"
    except ResultTooLarge:
        outcome = "refused: ResultTooLarge"
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    _, heap = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return (f"| {wall * 1000:.0f} | {cpu * 1000:.0f} | {heap / 1e6:.1f} MB | {rss:.0f} → {peak_rss_mb():.0f} MB | "
            f"{outcome} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.query_limits", description=__doc__.split("\n")[0])
    args = parse_args(parser, argv)
    lines = [(f"Command: `.venv/bin/python -m bench.query_limits` ({os.cpu_count()} shared CPUs, load average "
              f"{os.getloadavg()[0]:.1f} at the start). Result cap {CAP:,} bytes, row limit 2,000,000 (so only the "
              "byte cap stops the query). The rows run in order, in one process: peak RSS only ever grows."), "",
             "| query (each 1 GB as JSON) | ms wall | ms CPU | peak Python heap | peak RSS | outcome |",
             "|---|---:|---:|---:|---:|---|"]
    with tempfile.TemporaryDirectory(prefix="mesh-query-limits-") as tmp, Ledger(Path(tmp) / "l.duckdb") as ledger:
        queries = LedgerQueries(ledger, timeout=60, max_rows=2_000_000, max_bytes=CAP)
        for name, sql in QUERIES.items():
            lines.append(f"| {name} " + refusal(queries, sql))
    finish("query limits", "\n".join(lines), not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
