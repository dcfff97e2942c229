"""Approval gates end to end (docs/APPROVALS.md) on a real nats-server, real role nodes and the sim-server:
plan and final gates, a rejected plan's note in plan v2's prompt, a rejected coder outcome revised with the
note as its review, deadlines and their policies, and decisions on gates that are not pending."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from mesh.backends.sim.server import SimServer
from mesh.bus import Bus
from mesh.client import MeshClient
from mesh.config import MeshSettings
from mesh.contracts import (
    ApprovalDecided,
    ApprovalRefused,
    ApprovalRequested,
    EventBase,
    Goal,
    GoalCommand,
    GoalCompleted,
    GoalFailed,
    GoalPlanned,
    Plan,
    Step,
    StepCompleted,
    StepDispatched,
    utcnow,
)
from mesh.errors import ApprovalNotPending
from mesh.roles.goalstate import GoalState
from mesh.roles.goalstore import GoalStore
from mesh.roles.spec import RoleSpec
from tests.meshkit import TERMINAL, EventLog, in_process_mesh, role_specs, sim_tiers
from tests.test_cli_commands import mesh_cli

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
async def sim_server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SimServer]:
    """Every model call over HTTP to a sim-server, whose log of received prompts the tests read."""
    async with sim_tiers(monkeypatch, seed=3) as server:
        yield server


@asynccontextmanager
async def following(bus: Bus, goal: Goal, specs: dict[str, RoleSpec] | None = None,
                    settings: MeshSettings | None = None) -> AsyncIterator[tuple[MeshClient, EventLog]]:
    """A mesh (when ``settings``) and the goal submitted, its events followed."""
    client = MeshClient(bus)
    log = EventLog(client, goal.goal_id)
    async with asyncio.TaskGroup() as tg:
        follower = tg.create_task(log.follow())
        try:
            if settings is None:
                await client.submit(goal)
                yield client, log
            else:
                async with in_process_mesh(settings, specs=specs):
                    await client.submit(goal)
                    yield client, log
        finally:
            follower.cancel()


def requested(gate: str | None = None, **fields: Any) -> Any:
    def match(e: EventBase) -> bool:
        return isinstance(e, ApprovalRequested) and (gate is None or e.approval.gate == gate) and all(
            getattr(e.approval, k) == v for k, v in fields.items())
    return match


async def received(server: SimServer) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/_sim/requests") as resp:
        return list(await resp.json())


async def test_plan_and_final_gates_hold_the_goal_until_a_person_approves(fast: MeshSettings, bus: Bus) -> None:
    goal = Goal(brief="Build me a login system", options={"approve": "plan,final", "sim_review": "approve"})
    gid = goal.goal_id
    async with following(bus, goal, settings=fast) as (client, log):
        plan_request = await log.wait(requested("plan"))
        assert isinstance(plan_request, ApprovalRequested) and plan_request.approval.plan is not None
        state = await client.goal(gid)
        assert state is not None and state.status == "awaiting_approval"
        assert {st.status for st in state.steps.values()} == {"pending"}, "nothing dispatched at the plan gate"
        inbox = await client.approvals()
        assert [(p.goal_id, p.approval.gate, p.approval.kind) for p in inbox] == [(gid, "plan", "plan")]
        assert inbox[0].approval.deadline is not None

        decided = await client.approve(gid, by="alice", note="looks right")
        assert decided is not None and decided.gate == "plan" and decided.by == "alice" and decided.decision == "approve"

        final_request = await log.wait(requested("final"), timeout=120)
        assert isinstance(final_request, ApprovalRequested) and final_request.approval.outputs
        state = await client.goal(gid)
        assert state is not None and state.status == "awaiting_approval" and state.all_completed()
        assert not log.of(GoalCompleted)
        # a second decision on the plan gate is refused by the client, before anything is sent
        with pytest.raises(ApprovalNotPending, match="already approved by alice"):
            await client.reject(gid, "plan", by="mallory", note="too late")

        await client.approve(gid, by="bob")
        done = await log.wait(lambda e: isinstance(e, TERMINAL))
        assert isinstance(done, GoalCompleted), done

    # every dispatch came after the plan's approval; the goal completed only after the final approval
    first_dispatch = min(log.seq(e) for e in log.of(StepDispatched))
    approvals = log.of(ApprovalDecided)
    assert [(a.gate, a.by) for a in approvals] == [("plan", "alice"), ("final", "bob")]
    assert log.seq(approvals[0]) < first_dispatch
    assert log.seq(approvals[1]) < log.seq(done) and log.seq(final_request) > max(log.seq(e) for e in
                                                                                   log.of(StepCompleted))
    assert not await client.approvals(), "the inbox is empty once the goal ended"


async def test_a_decision_on_a_gate_that_is_not_pending_is_refused_and_changes_nothing(
        fast: MeshSettings, bus: Bus) -> None:
    goal = Goal(brief="Build me a login system", options={"approve": "plan"})
    gid = goal.goal_id
    async with following(bus, goal, settings=fast) as (client, log):
        await log.wait(requested("plan"))
        with pytest.raises(ApprovalNotPending, match="no gate 'final'.*pending gates: plan"):
            await client.approve(gid, "final", by="alice")
        # A decision that reaches the planner for a gate that is not pending (another client's stale view):
        # the planner refuses it with an event naming the reason, and the goal is unchanged.
        before = await client.goal(gid)
        stale = GoalCommand(goal_id=gid, action="approve", by="mallory", gate="final")
        await bus.publish(bus.topology.control_subject(gid), stale, msg_id=stale.command_id)
        refused = await log.wait(lambda e: isinstance(e, ApprovalRefused))
        assert isinstance(refused, ApprovalRefused) and refused.command_id == stale.command_id
        assert "no gate 'final'" in refused.reason
        after = await client.goal(gid)
        assert before is not None and after is not None
        assert after.model_dump(exclude={"memory"}) == before.model_dump(exclude={"memory"})

        await client.cancel(gid, by="alice")
        await log.wait(lambda e: isinstance(e, TERMINAL))
        with pytest.raises(ApprovalNotPending, match="has ended"):
            await client.approve(gid, "plan", by="alice")
        late = GoalCommand(goal_id=gid, action="approve", by="mallory", gate="plan")
        await bus.publish(bus.topology.control_subject(gid), late, msg_id=late.command_id)
        refused = await log.wait(lambda e: isinstance(e, ApprovalRefused) and e.command_id == late.command_id)
        assert isinstance(refused, ApprovalRefused) and "has ended (cancelled)" in refused.reason
    assert not log.of(ApprovalDecided) and not log.of(StepDispatched)


async def test_a_rejected_plan_is_planned_again_with_the_note_in_the_prompt(
        fast: MeshSettings, bus: Bus, sim_server: SimServer) -> None:
    goal = Goal(brief="Build me a login system", options={"approve": "plan"})
    gid = goal.goal_id
    note = "NOTE-7f3a: keep the sessions in SQLite, no Redis"
    async with following(bus, goal, settings=fast) as (client, log):
        await log.wait(requested("plan"))
        decided = await client.reject(gid, by="alice", note=note)
        assert decided is not None and decided.decision == "reject" and decided.note == note
        second = await log.wait(requested("plan"), after=await log.position(decided))
        assert isinstance(second, ApprovalRequested) and second.approval.plan is not None
        assert second.approval.plan.version == 2
        state = await client.goal(gid)
        assert state is not None and state.plan_version == 2 and state.status == "awaiting_approval"
        await client.cancel(gid, by="alice")
        await log.wait(lambda e: isinstance(e, TERMINAL))

    planned = [e.plan.version for e in log.of(GoalPlanned)]
    assert planned == [1, 2]
    plans = [r["prompt"] for r in await received(sim_server) if r["hints"].get("role") == "planner"]
    assert len(plans) >= 2
    assert note not in plans[0] and note in plans[-1]
    assert not log.of(StepDispatched)


async def test_a_rejected_coder_outcome_becomes_a_revision_with_the_note_as_its_review(
        fast: MeshSettings, bus: Bus, sim_server: SimServer) -> None:
    specs = role_specs()
    specs["coder"] = specs["coder"].model_copy(update={"approve": "after"})
    goal = Goal(brief="Build me a login system", options={"sim_review": "approve", "max_revisions": 1})
    gid = goal.goal_id
    note = "NOTE-91c2: hash the passwords with argon2"
    async with following(bus, goal, specs=specs, settings=fast) as (client, log):
        first = await log.wait(requested(kind="after", role="coder"))
        assert isinstance(first, ApprovalRequested)
        coder = first.approval.step_id
        assert coder is not None and first.approval.outputs
        state = await client.goal(gid)
        assert state is not None and state.steps[coder].status == "awaiting_approval"
        waiting = [sid for sid, st in state.steps.items() if coder in st.step.depends_on]
        assert all(state.steps[sid].status == "pending" for sid in waiting), "dependents wait for the gate"

        decided = await client.reject(gid, first.approval.gate, by="alice", note=note)
        assert decided is not None
        revision_request = await log.wait(requested(kind="after", role="coder"), after=await log.position(decided))
        assert isinstance(revision_request, ApprovalRequested)
        revision = revision_request.approval.step_id
        assert revision is not None
        state = await client.goal(gid)
        assert state is not None
        rev = state.steps[revision].step
        assert rev.revision_of == coder and coder in rev.depends_on
        assert all(revision in state.steps[sid].step.depends_on for sid in waiting), "dependents wait for it"
        # the revision's prompt carries the note as the review it addresses
        prompts = [r["prompt"] for r in await received(sim_server) if r["hints"].get("step_id") == revision]
        assert prompts and all(note in p and "## Previous review" in p for p in prompts)
        # within the revision budget (max_revisions=1): a second rejection fails the goal with the note
        await client.reject(gid, revision_request.approval.gate, by="alice", note="still not argon2")
        end = await log.wait(lambda e: isinstance(e, TERMINAL))
    assert isinstance(end, GoalFailed) and "still not argon2" in end.reason and "revision budget" in end.reason
    assert sum(1 for e in log.of(StepCompleted) if e.step_id == coder) == 1


async def test_a_gate_past_its_deadline_follows_its_policy(fast: MeshSettings, bus: Bus) -> None:
    options = {"approve": "plan", "approve_timeout": 1.0, "sim_review": "approve"}
    approve = Goal(brief="Build me a login system", options=options | {"approve_on_timeout": "approve"})
    fail = Goal(brief="Build me a login system", options=options)  # the default policy: fail
    reject = Goal(brief="Build me a login system", options=options | {"approve_on_timeout": "reject"})
    client = MeshClient(bus)
    logs = {g.goal_id: EventLog(client, g.goal_id) for g in (approve, fail, reject)}
    async with asyncio.TaskGroup() as tg, in_process_mesh(fast):
        followers = [tg.create_task(log.follow()) for log in logs.values()]
        for goal in (approve, fail, reject):
            await client.submit(goal)
        # the sweep (every 5 s) applies the policy once the 1 s deadline has passed
        approved = await logs[approve.goal_id].wait(lambda e: isinstance(e, ApprovalDecided), timeout=30)
        failed = await logs[fail.goal_id].wait(lambda e: isinstance(e, TERMINAL), timeout=30)
        rejected = await logs[reject.goal_id].wait(lambda e: isinstance(e, ApprovalDecided), timeout=30)
        replanned = await logs[reject.goal_id].wait(requested("plan"), after=await logs[reject.goal_id].position(rejected))
        completed = await logs[approve.goal_id].wait(lambda e: isinstance(e, TERMINAL), timeout=120)
        # unattended, a rejecting deadline does not replan for ever: its rejections count as replans
        unattended = await logs[reject.goal_id].wait(lambda e: isinstance(e, TERMINAL), timeout=120)
        for follower in followers:
            follower.cancel()
    assert isinstance(approved, ApprovalDecided) and approved.timed_out and approved.decision == "approve"
    assert approved.by == "timeout"
    assert isinstance(completed, GoalCompleted)
    assert isinstance(failed, GoalFailed) and "deadline" in failed.reason
    assert isinstance(rejected, ApprovalDecided) and rejected.timed_out and rejected.decision == "reject"
    assert isinstance(replanned, ApprovalRequested) and replanned.approval.plan is not None
    assert replanned.approval.plan.version == 2
    assert isinstance(unattended, GoalFailed) and "deadline passed 3 times" in unattended.reason
    assert [e.plan.version for e in logs[reject.goal_id].of(GoalPlanned)] == [1, 2, 3]
    # waiting does not count toward max_wall: the approved goal's active time excludes the wait
    state = await client.goal(approve.goal_id)
    assert state is not None and state.waited_seconds >= 1.0


async def test_the_cli_lists_approves_and_rejects_gates(fast: MeshSettings, bus: Bus) -> None:
    goal = Goal(brief="Build me a login system", options={"approve": "plan,final", "sim_review": "approve"})
    gid = goal.goal_id
    async with following(bus, goal, settings=fast) as (_, log):
        await log.wait(requested("plan"))
        code, out, err = await mesh_cli(fast, "approvals", "--json")
        assert code == 0, err
        assert [(p["goal_id"], p["approval"]["gate"]) for p in json.loads(out)] == [(gid, "plan")]
        code, out, _ = await mesh_cli(fast, "goals")
        assert f"{gid}  awaiting_approval" in out
        code, out, _ = await mesh_cli(fast, "goals", "--json")
        assert [g["pending_gates"] for g in json.loads(out)] == [["plan"]]
        code, out, _ = await mesh_cli(fast, "show", gid)
        assert code == 0 and "waiting for approval: gate plan (plan) until" in out and f"mesh approve {gid} plan" in out
        code, _, err = await mesh_cli(fast, "reject", gid)
        assert code == 2 and "--note" in err, "a rejection needs its note"
        code, _, err = await mesh_cli(fast, "approve", gid, "final")
        assert code == 1 and "no gate 'final'" in err and "pending gates: plan" in err
        code, out, err = await mesh_cli(fast, "approve", gid, "--note", "go")
        assert code == 0 and f"gate plan of goal {gid}: approved" in out, err

        await log.wait(requested("final"), timeout=120)
        code, out, err = await mesh_cli(fast, "reject", gid, "final", "--note", "NOTE-e5: the summary is wrong")
        assert code == 0 and "rejected" in out, err
        end = await log.wait(lambda e: isinstance(e, TERMINAL))
    assert isinstance(end, GoalFailed) and "NOTE-e5: the summary is wrong" in end.reason
    decided = log.of(ApprovalDecided)
    assert [d.gate for d in decided] == ["plan", "final"] and all("(mesh " in d.by for d in decided)


async def test_a_before_gate_holds_a_risky_roles_step_undispatched_and_a_rejection_replans_with_the_note(
        fast: MeshSettings, bus: Bus, sim_server: SimServer) -> None:
    specs = role_specs()
    specs["tester"] = specs["tester"].model_copy(update={"approve": "before"})
    goal = Goal(brief="Build me a login system", options={"sim_review": "approve"})
    gid = goal.goal_id
    note = "NOTE-b41: run the tests in the staging sandbox only"
    async with following(bus, goal, specs=specs, settings=fast) as (client, log):
        first = await log.wait(requested(kind="before", role="tester"))
        assert isinstance(first, ApprovalRequested)
        tester = first.approval.step_id
        assert tester is not None
        state = await client.goal(gid)
        assert state is not None and state.steps[tester].status == "awaiting_approval"
        assert state.steps[tester].attempt == 0, "a step at its before gate was never dispatched"
        decided = await client.reject(gid, first.approval.gate, by="alice", note=note)
        assert decided is not None
        # the step fails as rejected and the goal replans around it, with the reason in the prompt
        cursor = await log.position(decided)
        replanned = await log.wait(lambda e: isinstance(e, GoalPlanned) and e.plan.version == 2, after=cursor)
        assert isinstance(replanned, GoalPlanned)
        while True:  # approve every tester step of the new plan
            event = await log.wait(lambda e: isinstance(e, (ApprovalRequested, *TERMINAL)), after=cursor)
            cursor = log.seq(event)
            if isinstance(event, TERMINAL):
                break
            assert isinstance(event, ApprovalRequested)
            await client.approve(gid, event.approval.gate, by="alice")
    assert isinstance(event, GoalCompleted), event
    rejected_dispatches = [e for e in log.of(StepDispatched) if e.step_id == tester and log.seq(e) < log.seq(decided)]
    assert not rejected_dispatches
    plans = [r["prompt"] for r in await received(sim_server) if r["hints"].get("role") == "planner"]
    assert any(note in p for p in plans[1:]) and note not in plans[0]


async def test_the_sweep_replans_after_a_rejection_whose_replan_was_lost(fast: MeshSettings, bus: Bus) -> None:
    """A planner that died between a rejection's write and its replan (a deadline's rejection has no command
    to redeliver): the goal state alone tells the sweep to replan — a rejected plan, a step rejected before
    it ran."""
    store = GoalStore(bus)
    long_ago = utcnow() - timedelta(hours=1)
    planned, stepped = Goal(brief="Build me a login system"), Goal(brief="Build me a login system")
    for goal, kind in ((planned, "plan"), (stepped, "before")):
        s = GoalState(goal=goal)
        s.apply_plan(Plan(goal_id=goal.goal_id, steps=[Step(step_id="t", role="tester", instruction="test it")]))
        gate = "plan" if kind == "plan" else "t.before"
        s.request_approval(gate, kind, timeout=60, on_timeout="fail", step_id=None if kind == "plan" else "t")
        s.decide(gate, "reject", "timeout", "no decision before the deadline")
        s.approvals[gate].decided_at = long_ago
        if kind == "plan":
            s.status, s.replan_note = "planning", "no decision before the deadline"
        else:
            st = s.steps["t"]
            st.status, st.error, st.failures = "failed", "rejected before it ran by timeout", 1
        assert await store.create(s)
    client = MeshClient(bus)
    logs = [EventLog(client, g.goal_id) for g in (planned, stepped)]
    async with asyncio.TaskGroup() as tg, in_process_mesh(fast):
        followers = [tg.create_task(log.follow()) for log in logs]
        for log in logs:
            replanned = await log.wait(lambda e: isinstance(e, GoalPlanned), timeout=30)
            assert isinstance(replanned, GoalPlanned) and replanned.plan.version == 2
        for follower in followers:
            follower.cancel()
    state = await client.goal(stepped.goal_id)
    assert state is not None and state.replans == 1
