"""The replan part of the goal state machine, pure (no bus): what a new plan keeps of the old one."""

from __future__ import annotations

from mesh.contracts import Goal, Plan, Step
from mesh.roles.goalstate import GoalState


def test_a_replan_carries_an_unfinished_revision_and_the_plan_waits_for_it() -> None:
    """A revision that failed (the reason for the replan) is not dropped by a plan that never named it: it runs
    again with its attempts kept, and the plan's steps wait for it instead of the unrevised work."""
    s = GoalState(goal=Goal(brief="b"))
    s.apply_plan(Plan(goal_id=s.goal.goal_id, steps=[
        Step(step_id="code", role="coder", instruction="code"),
        Step(step_id="review", role="reviewer", instruction="review", depends_on=["code"]),
        Step(step_id="sum", role="synthesizer", instruction="sum up", depends_on=["code", "review"])]))
    for sid in ("code", "review"):
        s.steps[sid].status = "completed"
    rev, rev_review = s.add_revision("review", {"coder"}, "review")
    s.steps[rev].status, s.steps[rev].attempt = "failed", 1
    assert s.steps["sum"].step.depends_on == [rev, rev_review]
    replan = Plan(goal_id=s.goal.goal_id, version=2, steps=[
        Step(step_id="code", role="coder", instruction="code"),
        Step(step_id="review", role="reviewer", instruction="review", depends_on=["code"]),
        Step(step_id="sum", role="synthesizer", instruction="sum up", depends_on=["code", "review"])])
    s.apply_plan(replan)
    assert s.steps[rev].status == "pending" and s.steps[rev].attempt == 1, "the failed revision runs again"
    assert s.steps[rev_review].status == "pending"
    assert s.steps["sum"].step.depends_on == [rev, rev_review], "the synthesis waits for the revised work"
    assert replan.steps[2].depends_on == ["code", "review"], "the plan itself is left as written"
