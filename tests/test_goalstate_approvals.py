"""The approval part of the goal state machine, pure (no bus): gates open and close, waiting time is kept
out of the wall-time budget, a replan drops a waiting step's gate, and the text form of a decision."""

from __future__ import annotations

from datetime import timedelta

import pytest

from mesh.client import parse_decision
from mesh.contracts import Budget, Goal, Plan, Step
from mesh.contracts.options import validate_options
from mesh.errors import OptionInvalid
from mesh.roles.gates import GatePolicy, goal_gates
from mesh.roles.goalstate import GoalState


def state(**budget: float) -> GoalState:
    s = GoalState(goal=Goal(brief="b", budget=Budget(**budget)))  # type: ignore[arg-type]
    s.apply_plan(Plan(goal_id=s.goal.goal_id, steps=[Step(step_id="a", role="coder", instruction="do a"),
                                                     Step(step_id="b", role="coder", instruction="do b",
                                                          depends_on=["a"])]))
    return s


def test_a_gate_opens_and_closes_once_and_the_goal_waits_meanwhile() -> None:
    s = state()
    approval = s.request_approval("plan", "plan", timeout=60, on_timeout="fail")
    assert s.status == "awaiting_approval" and approval.request == 1 and approval.deadline is not None
    assert [a.gate for a in s.pending_approvals()] == ["plan"]
    decided = s.decide("plan", "approve", "alice", "ok")
    assert decided is not None and decided.status == "approved" and decided.decided_by == "alice"
    assert s.status == "running" and s.approved("plan") and not s.pending_approvals()
    assert s.decide("plan", "reject", "bob", "late") is None, "a decided gate is not decided again"
    assert s.decide("final", "approve", "bob", "") is None, "nor one never requested"
    s.request_approval("final", "final", timeout=60, on_timeout="fail")
    s.finish("cancelled")
    assert s.decide("final", "approve", "bob", "") is None, "nor one of an ended goal"


def test_time_waiting_for_a_person_does_not_count_toward_max_wall() -> None:
    s = state(max_wall_seconds=100)
    s.started_at -= timedelta(seconds=90)
    s.request_approval("plan", "plan", timeout=3600, on_timeout="fail")
    assert s.waiting_since is not None
    s.waiting_since -= timedelta(seconds=50)  # the gate has been pending for 50 s of the 90
    later = s.waiting_since + timedelta(seconds=200)  # still pending 200 s after it opened
    assert s.budget_breach(later) is None
    s.decide("plan", "approve", "alice", "")
    assert s.waiting_since is None and s.waited_seconds >= 50
    assert 39 <= s.active_seconds() <= 41
    s.started_at -= timedelta(seconds=70)  # 110 s active now: over the 100 s budget
    assert (s.budget_breach() or "").startswith("wall-time budget exceeded")


def test_a_second_gate_keeps_the_goal_waiting_until_both_are_decided() -> None:
    s = state()
    s.request_approval("a.after", "after", timeout=60, on_timeout="fail", step_id="a")
    s.request_approval("b.before", "before", timeout=60, on_timeout="fail", step_id="b")
    s.decide("a.after", "approve", "alice", "")
    assert s.status == "awaiting_approval" and s.waiting_since is not None
    s.decide("b.before", "approve", "alice", "")
    assert s.status == "running" and s.waiting_since is None


def test_a_replan_drops_the_gate_of_a_step_that_never_ran_and_keeps_a_held_outcome() -> None:
    s = state()
    s.steps["a"].status = "awaiting_approval"
    s.steps["a"].dispatched_at = s.started_at
    s.request_approval("a.after", "after", timeout=60, on_timeout="fail", step_id="a")
    s.steps["b"].status = "awaiting_approval"
    s.request_approval("b.before", "before", timeout=60, on_timeout="fail", step_id="b")
    s.apply_plan(Plan(goal_id=s.goal.goal_id, version=2, steps=[
        Step(step_id="a", role="coder", instruction="do a"),
        Step(step_id="c", role="coder", instruction="do c instead", depends_on=["a"])]))
    assert set(s.steps) == {"a", "c"} and s.steps["a"].status == "awaiting_approval"
    assert [a.gate for a in s.pending_approvals()] == ["a.after"] and s.status == "awaiting_approval"


def test_goal_gates_come_from_the_checked_option_and_the_policy_from_the_goal_or_the_default() -> None:
    assert validate_options({"approve": "final, plan,plan"}) == {"approve": "final,plan"}
    with pytest.raises(OptionInvalid, match="comma-separated set of plan, final"):
        validate_options({"approve": "plan,deploy"})
    with pytest.raises(OptionInvalid, match="one of fail, approve, reject"):
        validate_options({"approve_on_timeout": "ignore"})
    goal = Goal(brief="b", options={"approve": "plan,final", "approve_timeout": 5.0})
    assert goal_gates(goal) == {"plan", "final"}
    assert GatePolicy(60, "reject").for_goal(goal) == (5.0, "reject")
    assert goal_gates(Goal(brief="b")) == frozenset()


@pytest.mark.parametrize(("text", "expected"), [
    ("approve", ("approve", "")), ("  Approve: looks good ", ("approve", "looks good")), ("y", ("approve", "")),
    ("reject: use argon2", ("reject", "use argon2")), ("r use argon2", ("reject", "use argon2")),
    ("reject", ("reject", "")), ("maybe later", None), ("", None),
])
def test_a_decision_written_as_text(text: str, expected: tuple[str, str] | None) -> None:
    assert parse_decision(text) == expected
