"""`mesh run` as a user runs it: a subprocess that brings up the embedded mesh (nats-server, sim-server,
one process per role), runs the goal and writes the results folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(300)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    # MESH_EDGE_MODEL=off: with the edge extra installed a local mesh would serve the edge tier from
    # SmolLM2; these tests are about the CLI on the sim (tests/test_real_model.py runs the real model)
    env.update(MESH_DATA_DIR=str(tmp_path / ".mesh"), MESH_OUT_DIR=str(tmp_path / "out"),
               MESH_SIM_LATENCY_SCALE="0", MESH_DRAIN_SECONDS="5", MESH_EDGE_MODEL="off", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def test_mesh_run_completes_a_goal_and_writes_results(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mesh", "run", "Build me a login system", "-c", "Use Python 3.11 only"],
        env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "SIMULATED" in out  # no endpoint configured: it says so
    assert "plan v1:" in out and "goal completed" in out and "routed to" in out
    assert re.search(r"nodes up: \d of 7; waiting for [a-z, ]+", out), out[:2000]  # what the start waits for
    results = next((tmp_path / "out").iterdir())
    assert "Use Python 3.11 only" in (results / "synthesis.md").read_text()
    assert any((results / "workspace").rglob("*.py")), "the coder's files are in the final workspace"
    state = json.loads((results / "goal.json").read_text())
    assert state["status"] == "completed"
    assert state["simulated"] is True and "simulated" in (results / "SIMULATED").read_text()
    assert "sim$" in out and "goal completed" in out and "[SIMULATED" in out  # no cost passes as plain dollars
    # the dashboard and the goal's own page on it
    assert re.search(r"^dashboard on http://127\.0\.0\.1:\d+/ ", out, re.MULTILINE), out[:2000]
    assert re.search(rf"^goal {state['goal']['goal_id']}: http://127\.0\.0\.1:\d+/ui/goals/{state['goal']['goal_id']}$",
                     out, re.MULTILINE), out[:2000]
    assert not (tmp_path / ".mesh" / "local.json").exists(), "the local mesh was stopped"


def test_mesh_run_exits_non_zero_when_the_goal_fails(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mesh", "run", "Build me a login system", "--max-steps", "2", "--json"],
        env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert events[-1]["type"] == "goal.failed" and "step budget exceeded" in events[-1]["reason"]


def test_mesh_run_exits_non_zero_when_the_tests_still_fail(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mesh", "run", "Build me a login system", "-o", "sim_tests=fail_always",
         "-o", "sim_review=approve", "--json"],
        env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=280, check=False,
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    end = events[-1]
    assert end["type"] == "goal.failed" and end["reason"] == "tests still failing after 2 revisions"
    assert end["simulated"] is True and end["quality"]["tests"] == "failed"
    assert all(e["simulated"] for e in events if e["type"] == "backend.call")


def test_mesh_run_asks_at_a_gate_in_a_terminal(tmp_path: Path) -> None:
    """stdin a terminal (a pty): `mesh run` asks at each gate; the answers reject plan v1 with a note, then
    approve plan v2 and the final result."""
    import pty

    answers = [b"reject: NOTE-run: a smaller plan please\n", b"approve\n", b"a\n"]
    prompt = b"approve, or reject: <note>? "
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh", "run", "Build me a login system", "-o", "approve=plan,final",
         "-o", "sim_review=approve"], env=_env(tmp_path), cwd=tmp_path, stdin=slave, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    os.close(slave)
    out, asked = b"", 0
    try:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            out += chunk
            while out.count(prompt) > asked:
                os.write(master, answers[asked])
                asked += 1
        assert proc.wait(timeout=60) == 0, out.decode(errors="replace")[-3000:]
    finally:
        proc.kill()
        os.close(master)
    text = out.decode()
    assert asked == 3, text[-3000:]
    assert "waits for approval at gate plan" in text and "gate plan rejected by" in text
    assert "NOTE-run: a smaller plan please" in text and "plan v2:" in text
    assert "gate final approved by" in text and "goal completed" in text


def test_mesh_run_without_a_terminal_names_the_command_that_decides(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mesh", "run", "Build me a login system", "-o", "approve=plan",
         "-o", "approve_timeout=1", "-o", "approve_on_timeout=approve", "-o", "sim_review=approve"],
        env=_env(tmp_path), cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    goal_id = re.search(r"decide with: mesh approve (\S+) plan", proc.stdout)
    assert goal_id is not None, proc.stdout[-3000:]
    assert f"mesh reject {goal_id.group(1)} plan --note" in proc.stdout
    assert "gate plan approved by timeout (deadline passed)" in proc.stdout and "goal completed" in proc.stdout
