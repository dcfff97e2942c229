"""`mesh bench` (= `make bench`): every group of the suite runs, at a tiny scale, through the command a user
types. The figures are not asserted (they belong in bench/RESULTS.md); that each group produces its rows is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.orchestration import model_only_specs

ROOT = Path(__file__).resolve().parent.parent
# One row title per group, as the suite prints them.
GROUP_ROWS = {
    "bus": "bus, JetStream: `Bus.publish` + `PullConsumer` vs raw nats-py",
    "router": "router decision p50",
    "ledger": "ledger ingest: `Ledger.ingest` batches",
    "orchestration": "orchestration: steps/s with 2 vs 1 node process per worker role",
    "backends": "model call: `ModelGateway.chat` vs a bare `AsyncOpenAI`",
    "cli": "CLI start-up: `mesh goals` wall time",
    "codec": "decoding, hostile corpus (14 messages ≤ 1 MB): worst peak heap",
}


def test_the_orchestration_groups_specs_are_specs_a_node_accepts() -> None:
    specs = model_only_specs(concurrency=1)
    assert all("shell.run" not in s.tools and not s.verdict_from_tests for s in specs.values())
    assert {s.concurrency for s in specs.values() if s.kind == "worker"} == {1}


@pytest.mark.timeout(420)
def test_every_bench_group_runs_at_a_tiny_scale_without_writing() -> None:
    results = ROOT / "bench" / "RESULTS.md"
    before = results.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mesh", "bench", "--scale", "0.01", "--replicas", "2", "--no-write"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for group, row in GROUP_ROWS.items():
        assert row in proc.stdout, f"no {group} row:\n{proc.stdout}\n{proc.stderr[-3000:]}"
        assert f"{group}: " in proc.stderr  # the group's own timing line
    assert results.read_bytes() == before  # --no-write
