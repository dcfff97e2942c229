"""MeshClient against real role nodes on a real nats-server: submit (with an initial workspace), watch from
a sequence, goal state, results, cancel as a command the planner applies, nodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.bus import Bus
from mesh.client import MeshClient
from mesh.config import MeshSettings
from mesh.contracts import Goal, GoalCancelled, GoalCompleted, GoalFailed, StepStarted
from mesh.errors import UnknownGoal
from mesh.roles.orchestrator import Orchestrator
from tests.meshkit import in_process_mesh

pytestmark = pytest.mark.timeout(240)


async def test_submit_with_a_workspace_watch_resume_and_results(fast: MeshSettings, bus: Bus, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "app.py").write_text("def main() -> None:\n    print('existing project')\n")
    (project / ".git").mkdir()
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    client = MeshClient(bus)
    async with in_process_mesh(fast):
        goal_id = await client.submit(Goal(brief="Add a login page to the app"), workspace=project)
        seen = [item async for item in client.watch(goal_id, until_final=True)]
        assert isinstance(seen[-1][1], GoalCompleted)
        seqs = [seq for seq, _ in seen]
        assert seqs == sorted(set(seqs)), "sequences strictly increase: no duplicate"

        # Resuming after any seen sequence gives exactly the rest: no gap, no duplicate.
        cut = len(seen) // 2
        rest = [item async for item in client.watch(goal_id, seen[cut][0] + 1, until_final=True)]
        assert [(s, e.event_id) for s, e in rest] == [(s, e.event_id) for s, e in seen[cut + 1:]]

        state = await client.goal(goal_id)
        assert state is not None and state.status == "completed"
        assert state.goal.workspace is not None
        assert goal_id in {s.goal.goal_id for s in await client.goals()}
        results = await client.results(goal_id)
        assert results.synthesis
        assert b"existing project" in results.workspace["src/app.py"], "the steps worked on the uploaded project"
        assert not any(p.startswith(".git") for p in results.workspace)
        results.write(tmp_path / "out")
        assert (tmp_path / "out" / "workspace" / "src" / "app.py").exists()
        assert (tmp_path / "out" / "synthesis.md").read_text() == results.synthesis

        roles = {n.role for n in await client.nodes()}
        assert {"planner", "coder", "reviewer"} <= roles


async def test_cancel_is_a_command_the_planner_applies(fast: MeshSettings, bus: Bus) -> None:
    client = MeshClient(bus)
    async with in_process_mesh(fast.model_copy(update={"sim_latency_scale": 1.0})):
        goal_id = await client.submit(Goal(brief="Build me a login system"))
        async for _, event in client.watch(goal_id):
            if isinstance(event, StepStarted):
                break
        assert await client.cancel(goal_id, by="tester", reason="changed my mind")
        final = [event async for _, event in client.watch(goal_id, until_final=True)][-1]
        assert isinstance(final, GoalCancelled) and final.by == "tester" and final.reason == "changed my mind"
        state = await client.goal(goal_id)
        assert state is not None and state.status == "cancelled"
        assert not await client.cancel(goal_id, by="tester"), "an ended goal is not cancelled again"
    with pytest.raises(UnknownGoal, match="no goal 'nope'"):
        await client.cancel("nope", by="tester")


async def test_a_cancel_the_planner_cannot_apply_still_stops_the_goal(fast: MeshSettings, bus: Bus,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The control consumer has a give-up hook too: a command that fails every delivery ends the goal."""
    async def broken(self: Orchestrator, delivery: object) -> None:
        raise RuntimeError("a command bug")

    monkeypatch.setattr(Orchestrator, "on_command", broken)
    client = MeshClient(bus)
    async with in_process_mesh(fast.model_copy(update={"sim_latency_scale": 1.0, "max_deliver": 2})):
        goal_id = await client.submit(Goal(brief="Build me a login system"))
        async for _, event in client.watch(goal_id):
            if isinstance(event, StepStarted):
                break
        assert await client.cancel(goal_id, by="tester")
        final = [event async for _, event in client.watch(goal_id, until_final=True)][-1]
    assert isinstance(final, GoalFailed)
    assert final.reason == "the cancel command of tester could not be applied: RuntimeError: a command bug"


async def test_connect_owns_its_connection(fast: MeshSettings, bus: Bus) -> None:
    async with MeshClient.connect(fast) as client:
        assert client.bus.connected
        assert await client.goals() == []
    assert not client.bus.connected
