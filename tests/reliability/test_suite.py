"""`mesh bench`: the suite's table of ratios, on one small group, through the real command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.suite import Row, ledger_rows, table
from tests.meshkit import ROOT


def test_a_suite_group_measures_real_ratios_and_renders_the_table() -> None:
    rows = ledger_rows(scale=0.05)  # 10,000 events batched, 200 row by row: a few seconds
    assert [r.target for r in rows] == [20.0, 1.0]
    assert all(r.ratio > 0 for r in rows)
    text = table(rows)
    assert text.count("\n") == len(rows) + 1 and "× row-wise" in text
    assert Row("m", "2", "1", 2.0, "×", 3.0).verdict == "**missed**"
    assert Row("m", "1 ms", "10 ms", 0.1, "× target", 1.0, higher_is_better=False).verdict == "met"


def test_mesh_bench_runs_the_suite_from_the_checkout(tmp_path: Path) -> None:
    """From any directory (the suite is found beside the installed package); --no-write leaves RESULTS alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    results = ROOT / "bench" / "RESULTS.md"
    before = results.read_bytes()
    done = subprocess.run([sys.executable, "-m", "mesh", "bench", "--only", "ledger", "--scale", "0.02",
                           "--no-write"], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "| ledger ingest: `Ledger.ingest` batches of 20,000" in done.stdout
    assert results.read_bytes() == before
