"""Soak: goals run continuously on real node processes (every role, the ledger included); node memory
(RSS) and consumer lag are sampled and must stay flat — least-squares slopes after a warm-up, with
tolerant bounds. 75 s here; 15 minutes with MESH_LONG=1 (as ``python -m bench.soak --minutes 15``,
which also plots them to ``bench/soak.png``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.ledger import chunked, numbered
from bench.soak import PNG, plot, soak
from mesh.config import MeshSettings
from mesh.embedded import EmbeddedNats
from mesh.store import Ledger
from mesh.store.query import LedgerQueries
from mesh.store.synthetic import synthetic_events
from tests.reliability.kit import LONG

SECONDS = 15 * 60 if LONG else 75
pytestmark = pytest.mark.timeout(SECONDS + 240)

# Tolerances. A node that leaks a little per goal (~90 goals/min here) shows up as a steady climb; the
# bounds leave room for allocator noise and for caches that fill early and then stop growing. The
# ledger's WAL grows between checkpoints (a sawtooth); the bug this soak found grew it +120 MB/min.
NODE_RSS_MB_PER_MIN = 2.0 if LONG else 6.0
LEDGER_RSS_MB_PER_MIN = 20.0 if LONG else 40.0
# Lag: messages pending over every role's consumer plus events the ledger has not committed yet (in
# practice the ledger's batch in flight: a few dozen, noisy). A mesh that cannot keep up grows it by
# hundreds a minute.
LAG_PER_MIN = 10.0 if LONG else 60.0
LAG_MAX = 500


async def test_memory_and_consumer_lag_stay_flat_under_continuous_goals(
        settings: MeshSettings, nats_server: EmbeddedNats, tmp_path: Path) -> None:
    result = await soak(settings, SECONDS, tmp_path / "logs", interval=10.0 if LONG else 5.0,
                        server_pid=nats_server.pid)
    plot(result, tmp_path / PNG.name)
    assert (tmp_path / PNG.name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert result.failed == 0 and result.completed >= SECONDS / 60 * 10, (result.completed, result.failed)
    rss = result.slopes("rss_mb")
    lag_slope = result.slopes("lag")["lag"]
    lag_max = max(v for _, v in result.steady(result.series("lag")["lag"]))
    print(f"figure: soak {SECONDS / 60:.1f} min, {result.completed} goals: RSS slopes (MB/min) "
          + ", ".join(f"{n} {s:+.2f}" for n, s in rss.items())
          + f"; lag max {lag_max:.0f}, slope {lag_slope:+.2f}/min")
    for name, per_min in rss.items():
        if name == "nats-server":
            continue  # the server keeps the growing event stream: measured and plotted, not bounded here
        bound = LEDGER_RSS_MB_PER_MIN if name == "ledger" else NODE_RSS_MB_PER_MIN
        assert per_min <= bound, f"{name} RSS grows {per_min:+.2f} MB/min (bound {bound})"
    assert lag_slope <= LAG_PER_MIN, f"consumer lag grows {lag_slope:+.2f} messages/min"
    assert lag_max <= LAG_MAX, f"consumer lag reached {lag_max:.0f} messages"


def test_the_ledger_keeps_checkpointing_while_it_serves_queries(tmp_path: Path) -> None:
    """What the soak found: a query guard's result left unread (``fetchone``) held a transaction open on
    the query service's cursor for good, DuckDB skipped every automatic checkpoint, and the ledger's
    WAL and memory grew without bound (+120 MB/min). With queries served, the WAL must stay short."""
    path = tmp_path / "ledger.duckdb"
    with Ledger(path) as ledger:
        ledger.cursor().execute("SET checkpoint_threshold = '256KB'")  # database-wide; before the lock-down
        queries = LedgerQueries(ledger)
        assert queries.sql("SELECT count(*) FROM events").rows == [(0,)]
        for chunk in chunked(numbered(synthetic_events(3_000, seed=5)), 50):
            ledger.ingest(chunk)
        wal = path.with_name(path.name + ".wal")
        assert not wal.exists() or wal.stat().st_size < 2 * 2**20, f"WAL at {wal.stat().st_size >> 10} KiB"
