"""`mesh submit` for scripts: --file (many goals, one connection), --wait (exit code from the outcome),
--workspace (an existing project as the goal's first workspace)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh.bus import Bus
from mesh.client import MeshClient
from mesh.config import MeshSettings
from tests.meshkit import in_process_mesh
from tests.test_cli_commands import mesh_cli

pytestmark = pytest.mark.timeout(240)


async def test_submit_file_wait_and_workspace(fast: MeshSettings, bus: Bus, tmp_path: Path) -> None:
    goals = tmp_path / "goals.jsonl"
    goals.write_text(json.dumps({"brief": "Build me a login system"}) + "\n\n"
                     + json.dumps({"brief": "Write a CSV parser", "constraints": ["Python only"]}) + "\n")
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("an existing project\n")
    async with in_process_mesh(fast):
        code, out, err = await mesh_cli(fast, "submit", "--file", str(goals), "--wait", "--workspace", str(project))
        assert code == 0, err
        ids = out.split()
        assert len(ids) == 2 and all(f"goal {i}: completed" in err for i in ids)
        client = MeshClient(bus)
        for goal_id in ids:
            results = await client.results(goal_id)
            assert results.state.status == "completed"
            assert results.workspace["README.md"] == b"an existing project\n"

        # A goal that cannot complete (its token budget is spent by the first call): exit code 1.
        code, out, err = await mesh_cli(fast, "submit", "Build me a login system", "--max-tokens", "1", "--wait")
        assert code == 1 and f"goal {out.strip()}: failed" in err


async def test_submit_refuses_bad_input(fast: MeshSettings, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"brief": "fine"}) + "\n" + json.dumps({"constraints": []}) + "\n")
    code, _, err = await mesh_cli(fast, "submit", "--file", str(bad))
    assert code == 1 and f"{bad}:2: not a goal" in err
    # Read as strictly as the gateway reads a request: a misspelt field or an unknown option is refused
    # before anything is sent, naming the line and the field (the wire model alone would ignore the field).
    for line, says in (({"brief": "x", "budget": {"max_step": 5}}, "unknown field budget.'max_step'"),
                       ({"brief": "x", "constraint": ["y"]}, "unknown field 'constraint'"),
                       ({"brief": "x", "options": {"bogus": 1}}, "unknown goal option 'bogus'"),
                       ({"brief": "x", "options": {"sim_plan_steps": 201}}, "from 8 to 200")):
        bad.write_text(json.dumps({"brief": "fine"}) + "\n" + json.dumps(line) + "\n")
        code, out, err = await mesh_cli(fast, "submit", "--file", str(bad))
        assert code == 1 and f"{bad}:2: not a goal" in err and says in err and out == "", err
    # Near the server's max_payload (1 MiB): the goal message would travel by claim-check, but its goal state
    # could never be stored and the goal would be lost after submission: refused before anything is sent.
    code, out, err = await mesh_cli(fast, "submit", "x" * 100_000, *(["-c", "c" * 120_000] * 8))
    assert code == 1 and "a goal may be at most 524,288" in err and out == "", err
    code, _, err = await mesh_cli(fast, "submit")
    assert code == 1 and "give either a goal's brief or --file" in err
    code, _, err = await mesh_cli(fast, "submit", "x", "--workspace", str(tmp_path / "missing"))
    assert code == 1 and "is not a folder" in err


async def test_a_goal_too_large_for_its_state_fails_with_the_reason(fast: MeshSettings, bus: Bus) -> None:
    """A sender that skips MeshClient's size check (a hand-made message): the goal travels by claim-check but
    its state cannot be stored; the planner gives up and fails it with the reason instead of losing it."""
    from mesh.contracts import Goal, GoalFailed

    goal = Goal(brief="x" * 100_000, constraints=["c" * 120_000] * 8)
    async with in_process_mesh(fast):
        await bus.submit_goal(goal)
        final = None
        async for _, final in MeshClient(bus).watch(goal.goal_id, until_final=True):
            pass
        assert isinstance(final, GoalFailed) and "MaxPayloadError" in final.reason
        state = await MeshClient(bus).goal(goal.goal_id)
        assert state is not None and state.status == "failed" and state.goal.brief == "x" * 2000
