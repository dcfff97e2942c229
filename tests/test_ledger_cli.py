"""`mesh sql` and `mesh ledger ...` as a user runs them: real processes, a real server and ledger."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.roles.ledger_service import LedgerClient
from mesh.store import Ledger, schema
from tests.ledgerkit import Eventually, burst, caught_up, publish_burst, recording, tables

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parent.parent


async def mesh(*argv: str, settings: MeshSettings | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["PYTHONPATH"] = str(ROOT)
    if settings is not None:
        env.update(MESH_NATS_URL=settings.nats_url or "", MESH_DATA_DIR=str(settings.data_dir))
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "mesh", *argv], env=env,
                                   capture_output=True, text=True, timeout=60)


@pytest.fixture
def ledger_file(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.duckdb"
    with Ledger(path) as ledger:
        ledger.ingest([(i + 1, f"mesh.event.{e.goal_id}.{e.type}", e) for i, e in enumerate(burst(400))])
    return path


async def test_sql_on_a_file_prints_table_json_and_csv(ledger_file: Path) -> None:
    query = "SELECT type, count(*) AS n FROM events GROUP BY type ORDER BY n DESC, type LIMIT 3"
    table = await mesh("sql", query, "--file", str(ledger_file))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["type", "n"] and set(lines[1]) == {"-", " "} and lines[-1] == "(3 rows)"
    assert lines[2].split()[0] == "backend.call"

    as_json = json.loads((await mesh("sql", query, "--json", "--file", str(ledger_file))).stdout)
    assert [r["type"] for r in as_json][0] == "backend.call" and all(isinstance(r["n"], int) for r in as_json)

    as_csv = list(csv.reader(io.StringIO((await mesh("sql", query, "--csv", "--file", str(ledger_file))).stdout)))
    assert as_csv[0] == ["type", "n"] and len(as_csv) == 4
    assert [[r["type"], str(r["n"])] for r in as_json] == as_csv[1:]


async def test_sql_refusal_is_an_error_exit(ledger_file: Path) -> None:
    refused = await mesh("sql", "DELETE FROM events", "--file", str(ledger_file))
    assert refused.returncode == 1 and "only read-only SELECT/WITH" in refused.stderr
    files = await mesh("sql", "SELECT * FROM read_csv('/etc/passwd')", "--file", str(ledger_file))
    assert files.returncode == 1 and "read_csv() is not allowed" in files.stderr


async def test_export_writes_every_table(ledger_file: Path, tmp_path: Path) -> None:
    done = await mesh("ledger", "export", "--parquet", str(tmp_path / "pq"), "--file", str(ledger_file))
    assert done.returncode == 0, done.stderr
    assert sorted(Path(p).name for p in done.stdout.split()) == sorted(f"{t}.parquet" for t in schema.TABLES)
    with Ledger(ledger_file, read_only=True) as ledger:
        cursor = ledger.cursor()
        for table in schema.TABLES:
            counts = cursor.execute(f"SELECT (SELECT count(*) FROM {table}), "
                                    f"(SELECT count(*) FROM read_parquet('{tmp_path / 'pq' / table}.parquet'))")
            assert len(set(counts.fetchone())) == 1, table


async def test_sql_status_and_rebuild_through_a_running_mesh(bus: Bus, settings: MeshSettings,
                                                             eventually: Eventually, tmp_path: Path) -> None:
    client = LedgerClient(bus)
    async with recording(bus, settings):
        await publish_burst(bus, burst(300))
        await caught_up(eventually, client, bus)
        answer = await mesh("sql", "SELECT count(*) AS n FROM events", "--json", settings=settings)
        assert answer.returncode == 0, answer.stderr
        assert json.loads(answer.stdout) == [{"n": 300}]
        refused = await mesh("sql", "SELECT 1; DROP TABLE events", settings=settings)
        assert refused.returncode == 1 and "exactly one statement" in refused.stderr
        status = json.loads((await mesh("ledger", "status", "--json", settings=settings)).stdout)
        assert status["last_seq"] == 300 and status["schema_version"] == schema.SCHEMA_VERSION
        text = (await mesh("ledger", "status", settings=settings)).stdout  # for people: one key per line
        assert any(line.split() == ["last_seq", "300"] for line in text.splitlines()), text
    out = tmp_path / "copy.duckdb"
    rebuilt = await mesh("ledger", "rebuild", "--out", str(out), settings=settings)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "rebuilt 300 events" in rebuilt.stdout
    assert tables(out) == tables(settings.ledger_file)


async def test_sql_without_a_ledger_says_so(settings: MeshSettings) -> None:
    answer = await mesh("sql", "SELECT 1", settings=settings)
    assert answer.returncode == 1 and "is the ledger node running" in answer.stderr
