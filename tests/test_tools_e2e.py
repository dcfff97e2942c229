"""Workspaces and tools through real role nodes on a real nats-server (sim backend, no latency):
the coder's files land in the final workspace, the reviewer receives the diff, the tester runs the
workspace's tests through shell.run and its report is an artifact; a redelivered step is idempotent;
ledger.query reaches the ledger's query service."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from contextlib import aclosing

import pytest

from mesh.backends.tiers import load_tiers
from mesh.bus import Bus
from mesh.bus.consumer import Delivery, PullConsumer
from mesh.config import MeshSettings
from mesh.contracts import (
    ArtifactCreated,
    ArtifactRef,
    Goal,
    GoalCompleted,
    Plan,
    Step,
    StepCompleted,
    Task,
    ToolCall,
)
from mesh.metrics import Metrics
from mesh.roles.calls import ModelCaller
from mesh.roles.goalstate import GoalState
from mesh.roles.goalstore import GoalStore
from mesh.roles.recorder import Recorder
from mesh.roles.spec import feedback_kinds
from mesh.roles.worker import Worker
from mesh.router.policy import RulePolicy
from mesh.tools.manifest import Manifest
from mesh.tools.toolbox import ToolBox
from mesh.tools.workspace import Workspace
from tests.meshkit import in_process_mesh, role_specs, run_goal

pytestmark = pytest.mark.timeout(120)


async def test_coder_files_reach_the_final_workspace_reviewer_gets_the_diff_tester_runs_the_tests(
        fast: MeshSettings, bus: Bus) -> None:
    goal = Goal(brief="Build me a login system", constraints=["Use Python 3.11 only"])
    async with in_process_mesh(fast):
        events = await run_goal(bus, goal)
    done = events[-1]
    assert isinstance(done, GoalCompleted), done
    artifacts = [e.artifact for e in events if isinstance(e, ArtifactCreated)]

    # the coder's files are in the final workspace, whose lineage goes back through the coder's manifests
    assert done.workspace is not None
    final = Manifest.decode(await bus.get_blob(done.workspace.digest))
    written = {e.arguments["path"] for e in events if isinstance(e, ToolCall) and e.tool == "fs.write" and e.ok}
    assert written and written <= final.files.keys()
    assert any(p.startswith("src/") for p in final.files) and any(p.startswith("tests/test_") for p in final.files)
    coder_manifests = [a for a in artifacts if a.producer_role == "coder" and a.kind == "workspace"]
    assert final.parent in {a.ref.digest for a in coder_manifests} | {None}

    # every coder step published its diff, and each review took that diff as an input
    diffs = {a.producer_step: a for a in artifacts if a.kind == "diff"}
    reviews = [a for a in artifacts if a.producer_role == "reviewer"]
    assert diffs and reviews
    for review in reviews:
        assert any(d.ref.digest in review.parents for d in diffs.values()), review
    first_diff = (await bus.get_blob(diffs["implement-1"].ref.digest)).decode()
    assert "--- /dev/null\n+++ b/src/" in first_diff and "+def handle(value: str) -> str:" in first_diff

    # the tester ran the workspace's tests through shell.run; its report, an artifact, says what happened
    runs = [e for e in events if isinstance(e, ToolCall) and e.tool == "shell.run"]
    assert runs and all(e.role == "tester" and e.ok for e in runs)
    assert runs[0].arguments["argv"][:3] == ["python", "-m", "pytest"]
    reports = [a for a in artifacts if a.kind == "test_report"]
    assert reports
    report = (await bus.get_blob(reports[-1].ref.digest)).decode()
    assert "Result: PASS (pytest exit code 0)" in report and " passed in " in report
    tester_done = [e for e in events if isinstance(e, StepCompleted) and e.role == "tester"]
    assert reports[-1].ref.digest in {r.digest for e in tester_done for r in e.outputs}


async def test_a_failing_test_run_sends_the_code_back_and_the_revision_is_tested_again(
        fast: MeshSettings, bus: Bus) -> None:
    # sim_tests=fail_first: the coder's first version has a bug its own test catches; a revision fixes it.
    goal = Goal(brief="Build me a login system", options={"sim_tests": "fail_first", "sim_review": "approve"})
    async with in_process_mesh(fast):
        events = await run_goal(bus, goal)
    assert isinstance(events[-1], GoalCompleted), events[-1]
    tests = [e for e in events if isinstance(e, StepCompleted) and e.role == "tester"]
    # the verdict is pytest's exit status: the first run failed, the run on the revised code passed
    assert tests[0].verdict == "changes_requested" and tests[-1].verdict == "approve"
    assert tests[-1].step_id.startswith(tests[0].step_id + "-rev")
    coders = [e.step_id for e in events if isinstance(e, StepCompleted) and e.role == "coder"]
    assert any("-rev" in c for c in coders), coders
    reports = [(await bus.get_blob(e.artifact.ref.digest)).decode() for e in events
               if isinstance(e, ArtifactCreated) and e.artifact.kind == "test_report"]
    assert "Result: FAIL (pytest exit code 1)" in reports[0] and "Result: PASS (pytest exit code 0)" in reports[-1]
    final = Manifest.decode(await bus.get_blob(events[-1].workspace.digest))  # type: ignore[union-attr]
    sources = [(await bus.get_blob(d)).decode() for p, d in final.files.items() if p.startswith("src/")]
    assert sources and all("return value.strip()" in src for src in sources)


async def _one_coder_step(bus: Bus, step: Step, inputs: list[ArtifactRef]) -> tuple[Goal, Worker, ModelCaller]:
    """A goal whose plan is ``step`` alone, dispatched (state in KV, task on the bus), and a coder worker."""
    goal = Goal(brief="Build me a login system", options={"sim_quality": 1.0})
    state = GoalState(goal=goal)
    state.apply_plan(Plan(goal_id=goal.goal_id, steps=[step]))
    state.mark_dispatched(step.step_id)
    goals = GoalStore(bus)
    await goals.create(state)
    await bus.dispatch(Task(task_id=Task.make_id(goal.goal_id, step.step_id, 1), goal_id=goal.goal_id, step=step,
                            brief=goal.brief, options=goal.options, inputs=inputs))
    caller = ModelCaller(bus, load_tiers(bus.settings), RulePolicy(), "coder-test", Metrics("coder"))
    specs = role_specs()
    return goal, Worker(bus, specs["coder"], caller, goals, "coder-test", feedback_kinds=feedback_kinds(specs)), caller


async def test_a_redelivered_tool_step_gives_the_same_manifest_and_no_second_artifact(fast: MeshSettings) -> None:
    async with await Bus.connect(fast, name="coder-test", role="coder") as bus:  # the worker's sim reads the bus's settings
        await _redeliver_a_coder_step(bus)


async def _redeliver_a_coder_step(bus: Bus) -> None:
    await bus.provision(["coder"])
    step = Step(step_id="implement", role="coder", instruction="Implement the login system", difficulty=0.8)
    goal, worker, caller = await _one_coder_step(bus, step, [])
    store = await bus.object_store(bus.topology.obj_artifacts)
    objects: list[int] = []

    async def twice(delivery: Delivery) -> None:
        """The first run's ack is lost: the same task comes again, as JetStream would redeliver it."""
        await worker.handle(delivery)
        objects.append(len(await store.list()))
        await worker.handle(dataclasses.replace(delivery, attempt=2))
        objects.append(len(await store.list()))
        consumer.stop()

    consumer = PullConsumer.for_role(bus, "coder", twice)
    await asyncio.wait_for(consumer.run(), 60)
    await caller.gateway.aclose()

    assert objects[0] == objects[1], "the second run stored nothing new"
    counts = (await bus._js.stream_info(bus.topology.events_stream,
                                       subjects_filter=bus.topology.events_filter(goal.goal_id))).state.subjects
    def topic(goal_id: str, type: str) -> str:
        return bus.topology.event_subject(goal_id, "coder", type)

    assert counts is not None
    assert counts[topic(goal.goal_id, "route.decided")] == 2  # the step really ran twice
    assert counts[topic(goal.goal_id, "step.completed")] == 1
    assert counts[topic(goal.goal_id, "artifact.created")] == 3  # summary, workspace, diff: once each
    async with aclosing(bus.watch_events(goal.goal_id)) as stream:
        async for event in stream:
            if isinstance(event, ArtifactCreated) and event.artifact.kind == "workspace":
                files = Manifest.decode(await bus.get_blob(event.artifact.ref.digest)).files
                break
    assert counts[topic(goal.goal_id, "tool.call")] == len(files) >= 2  # one fs.write per file, recorded once


async def test_a_step_after_parallel_coder_branches_works_on_their_merge_and_announces_it(fast: MeshSettings) -> None:
    async with await Bus.connect(fast, name="coder-test", role="coder") as bus:
        await bus.provision(["coder"])

        async def store(data: bytes, media_type: str, name: str) -> ArtifactRef:
            return await bus.put_blob(data, media_type=media_type, name=name)

        root = Workspace({}, bus.get_blob)
        root.write("README.md", b"shared\n")
        base = await root.commit(store)
        branches = []
        for name in ("a", "b"):
            ws = await Workspace.open(base, bus.get_blob)
            ws.write(f"{name}.py", f"{name} = 1\n".encode())
            branches.append((await ws.commit(store)).model_copy(update={"name": f"implement-{name}/workspace"}))

        goal, worker, caller = await _one_coder_step(bus, Step(step_id="join", role="coder",
                                                              instruction="Join the two parts"), branches)

        async def once(delivery: Delivery) -> None:
            await worker.handle(delivery)
            consumer.stop()

        consumer = PullConsumer.for_role(bus, "coder", once)
        await asyncio.wait_for(consumer.run(), 60)
        await caller.gateway.aclose()

        workspaces: list[ArtifactCreated] = []
        async with aclosing(bus.watch_events(goal.goal_id)) as stream:
            async for event in stream:
                if isinstance(event, ArtifactCreated) and event.artifact.kind == "workspace":
                    workspaces.append(event)
                if isinstance(event, StepCompleted):
                    break
        merged, written = (w.artifact for w in workspaces)
        assert sorted(merged.parents) == sorted(b.digest for b in branches)  # lineage: the merge of both branches
        assert written.parents == [merged.ref.digest]
        files = Manifest.decode(await bus.get_blob(written.ref.digest)).files
    assert {"README.md", "a.py", "b.py"} <= files.keys() and any(p.startswith("src/") for p in files)


async def test_ledger_query_asks_the_ledger_service_read_only(bus: Bus, settings: MeshSettings) -> None:
    spec = role_specs()["reviewer"]
    spec = spec.model_copy(update={"tools": [*spec.tools, "ledger.query"]})
    caller = ModelCaller(bus, load_tiers(settings), RulePolicy(), "reviewer-test", Metrics("reviewer"))
    worker = Worker(bus, spec, caller, GoalStore(bus), "reviewer-test",
                    feedback_kinds=frozenset())
    async with ToolBox(spec.tools, Workspace({}, bus.get_blob), ledger=worker.ledger) as tools:
        down = await tools.call("ledger.query", {"sql": "SELECT 1"})
        assert not down.ok and "LedgerError" in json.loads(down.content)["message"]  # no ledger node yet

        recorder = Recorder(bus, settings, batch_size=100)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(recorder.run())
            await asyncio.wait_for(recorder.ready.wait(), 30)
            try:
                answer = await tools.call("ledger.query", {"sql": "SELECT 40 + 2 AS answer", "max_rows": 5})
                assert answer.ok and json.loads(answer.content)["rows"] == [[42]]
                refused = await tools.call("ledger.query", {"sql": "DELETE FROM events"})
                assert not refused.ok and "QueryRefused" in json.loads(refused.content)["message"]
            finally:
                recorder.stop()
    await caller.gateway.aclose()


async def test_on_tiers_without_function_calling_edits_come_as_text_and_go_through_the_toolbox(
        fast: MeshSettings, bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tier declared tool-less (MESH_TIER_<T>_TOOLS=false): no tools are offered, the coder's fenced
    file blocks become fs.write calls, and the tester, whose model writes no command, runs the test command
    itself — recorded as tool.call events like native calls."""
    for tier in ("EDGE", "LONG_CONTEXT", "SWARM"):
        monkeypatch.setenv(f"MESH_TIER_{tier}_TOOLS", "false")
    goal = Goal(brief="Build me a login system", options={"sim_review": "approve", "max_revisions": 0})
    async with in_process_mesh(fast):
        events = await run_goal(bus, goal)
    tools = [e for e in events if isinstance(e, ToolCall)]
    writes = [e for e in tools if e.role == "coder" and e.tool == "fs.write" and e.ok]
    assert writes and all(".tool.text-" in e.event_id for e in writes)
    assert any(e.arguments["path"].startswith("src/") for e in writes)
    runs = [e for e in tools if e.role == "tester" and e.tool == "shell.run"]
    assert runs and runs[0].arguments["argv"] == ["python", "-m", "pytest", "-q", "-o", "pythonpath=src"]
    done = events[-1]
    assert isinstance(done, GoalCompleted), done
    assert done.quality.tests == "passed" and done.quality.tests_exit_code == 0
    coded = next(e for e in events if isinstance(e, StepCompleted) and e.role == "coder")
    workspace = next(r for r in coded.outputs if r.name.endswith("/workspace"))
    assert {e.arguments["path"] for e in writes} <= set(Manifest.decode(await bus.get_blob(workspace.digest)).files)
