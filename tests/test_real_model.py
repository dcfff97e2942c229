"""One goal end to end with EVERY tier on a real model: SmolLM2-135M-Instruct served by llama-cpp-python
(the edge extra), through `mesh run --all-tiers local` as a user runs it.

A 135M model writes poor plans and poor code; the point is that every role gets through on whatever it
answers: a plan is accepted (the model's or the fallback built from the role specs), the coder writes at
least one file (the text tool protocol: the server does no function calling), the tester runs the real test
command, the synthesis is written, and the goal ends completed or failed with a quality record saying what
passed — without hanging or crashing a node. Deterministic (temperature 0, seed 42), one replica per role,
swarm fan-out off, at most one revision, a wall-time budget. Skipped without the edge extra (`make edge`);
`.ci/run` installs it. The model's own share (plan, verdicts, files) is printed (pytest -s shows it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mesh.contracts import TIERS
from mesh.embedded.edge import MODEL_ALIAS, missing_modules

ROOT = Path(__file__).resolve().parent.parent
GOAL = "Write a Python function that checks whether a string is a palindrome, with pytest tests"
WALL_SECONDS = 1200  # the goal's budget; the process gets a margin on top to drain and write results

pytestmark = [
    pytest.mark.skipif(bool(missing_modules()), reason=f"the edge extra is not installed (missing: "
                       f"{', '.join(missing_modules())}); install it with `make edge`"),
    pytest.mark.timeout(WALL_SECONDS + 240),
]


def test_a_goal_runs_end_to_end_with_every_tier_on_smollm2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(MESH_DATA_DIR=str(tmp_path / ".mesh"), MESH_OUT_DIR=str(tmp_path / "out"), MESH_DRAIN_SECONDS="5",
               MESH_ROUTER_MODEL=str(tmp_path / "no-router.onnx"),  # rules: each role's preferred tier
               PYTHONPATH=str(ROOT))
    for tier in TIERS:
        env[f"MESH_TIER_{tier.upper()}_TEMPERATURE"] = "0"
        env[f"MESH_TIER_{tier.upper()}_SEED"] = "42"
    proc = subprocess.run(
        [sys.executable, "-m", "mesh", "run", GOAL, "--all-tiers", "local", "--json", "--max-wall", str(WALL_SECONDS),
         "-o", "swarm=false", "-o", "max_revisions=1"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=WALL_SECONDS + 180, check=False)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert events, proc.stderr[-3000:]
    last = events[-1]
    assert last["type"] in ("goal.completed", "goal.failed"), (last, proc.stderr[-3000:])
    assert proc.returncode == (0 if last["type"] == "goal.completed" else 1)
    assert "every tier: SmolLM2" in proc.stderr

    calls = [e for e in events if e["type"] == "backend.call"]
    planned = [e for e in events if e["type"] == "goal.planned"]
    tools = [e for e in events if e["type"] == "tool.call"]
    writes = [e for e in tools if e["tool"] == "fs.write" and e["ok"]]
    runs = [e for e in tools if e["tool"] == "shell.run" and e["role"] == "tester"]
    completed = [e for e in events if e["type"] == "step.completed"]
    verdicts = Counter(e["verdict"] for e in completed if e["role"] == "reviewer")
    no_verdict = [e for e in events if e["type"] == "step.progress" and e["message"].startswith("no verdict")]
    print(json.dumps({  # the model's own share, printed first so a failing run still shows it
        "outcome": last["type"], "reason": last.get("reason", ""), "quality": last.get("quality"),
        "plan_source": [p["source"] for p in planned], "plan_steps": [len(p["plan"]["steps"]) for p in planned],
        "files_written": sorted({e["arguments"]["path"] for e in writes}), "tools": [(e["role"], e["tool"], e["ok"])
                                                                                    for e in tools],
        "verdicts_by_model": dict(verdicts), "verdicts_missing": len(no_verdict),
        "steps": [(e["type"], e.get("step_id"), e.get("role"), e.get("error", "")[:200]) for e in events
                  if e["type"] in ("step.completed", "step.failed", "step.progress")],
        "calls": len(calls), "completion_tokens": sum(e["usage"]["completion_tokens"] for e in calls),
    }))
    assert calls and all(e["model"] == MODEL_ALIAS for e in calls), "every call went to the real model"
    assert planned and planned[0]["source"] in ("model", "fallback")
    assert writes, "the coder wrote no file"
    assert runs and runs[-1]["arguments"]["argv"][0] in ("python", "pytest"), "the tester ran no test command"
    assert any(e["role"] == "synthesizer" for e in completed) or last["type"] == "goal.failed"
    assert last.get("quality") is not None and last["quality"]["tests"] in ("passed", "failed"), last.get("quality")
    if last["type"] == "goal.completed":
        assert (tmp_path / "out" / last["goal_id"] / "synthesis.md").is_file()
    assert "restarting in" not in proc.stderr, "a node died and was restarted by the local mesh's supervisor"
