"""The state of one goal as the orchestrator keeps it in KV ``mesh_goals``: plan, step states, usage.

Pure data and transitions, no I/O: the orchestrator loads it, applies a transition and writes it back
by compare-and-swap, so two planner replicas never both apply the same transition. Every transition
is idempotent (a second ``complete`` of the same step returns False), which makes redelivered events
and re-driven goals harmless.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Literal

from pydantic import Field

from mesh.contracts.models import (
    Approval,
    ArtifactRef,
    DagPosition,
    Decision,
    GateKind,
    Goal,
    GoalQuality,
    Plan,
    Step,
    StepQuality,
    TimeoutPolicy,
    Usage,
    Wire,
    utcnow,
)

# awaiting_approval (docs/APPROVALS.md): a step behind a "before" gate is not dispatched; one behind an
# "after" gate has its outcome recorded but not counted. A goal is awaiting_approval while any gate is pending.
StepStatus = Literal["pending", "dispatched", "awaiting_approval", "completed", "failed"]
GoalStatus = Literal["planning", "running", "awaiting_approval", "completed", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
WORKSPACE_MEDIA_TYPE = "application/vnd.mesh.workspace+json"
MEMORY_LINES = 24  # a hard bound; compaction keeps the memory well below it
# Past MEMORY_COMPACT_AT lines the orchestrator has the edge tier summarise all but the newest
# MEMORY_KEEP_RECENT into one line (``memory_to_compact`` / ``compact_memory``).
MEMORY_COMPACT_AT = 10
MEMORY_KEEP_RECENT = 5
MEMORY_SUMMARY_CHARS = 1200


class StepState(Wire):
    step: Step
    status: StepStatus = "pending"
    attempt: int = 0
    outputs: list[ArtifactRef] = Field(default_factory=list)
    verdict: str | None = None
    tier: str | None = None
    usage: Usage = Field(default_factory=Usage)
    simulated: bool = False
    quality: StepQuality | None = None
    error: str | None = None
    failures: int = 0
    dispatched_at: datetime | None = None
    finished_at: datetime | None = None


class StepProgressView(Wire):
    """What a worker checks of one step: its status and attempt."""

    status: StepStatus = "pending"
    attempt: int = 0


class GoalProgressView(Wire):
    """The part of a stored ``GoalState`` a worker checks before and during a step. Validating only
    this (the rest of the document is skipped, not turned into models) costs a fraction of the whole
    state, which grows with every step — the full parse was a large share of a step's worker CPU."""

    status: GoalStatus = "planning"
    steps: dict[str, StepProgressView] = Field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class GoalState(Wire):
    goal: Goal
    status: GoalStatus = "planning"
    plan_version: int = 0
    steps: dict[str, StepState] = Field(default_factory=dict)
    usage: Usage = Field(default_factory=Usage)
    steps_run: int = 0
    replans: int = 0
    review_rounds: int = 0
    test_rounds: int = 0  # revisions asked for by failing tests: a budget apart from the reviews'
    simulated: bool = False  # some model call of the goal was simulated
    memory: list[str] = Field(default_factory=list)
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    result: ArtifactRef | None = None
    workspace: ArtifactRef | None = None
    reason: str | None = None
    approvals: dict[str, Approval] = Field(default_factory=dict)  # by gate: pending ones and the last decisions
    approval_requests: int = 0
    # Time spent waiting for a person does not count toward max_wall_seconds (docs/APPROVALS.md).
    waited_seconds: float = 0.0
    waiting_since: datetime | None = None
    replan_note: str | None = None  # a rejected plan's note, until the next plan is installed
    # The goal span's W3C traceparent (trace id + the goal span's id), chosen when the planner first takes
    # the goal: every task and event of the goal continues it, from any process, after any restart;
    # the planner that ends the goal records the goal span under these ids (mesh/tracing.py). None: a
    # state written before traces (its messages start a trace each, as they did then).
    traceparent: str | None = None
    # The span id of the goal span's parent: the submitter's span, when it submitted inside a trace of its own
    # (a traced client through the gateway); None: the goal span is the root of the goal's trace.
    trace_parent: str | None = None

    # --- queries ---------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def ready(self) -> list[str]:
        """Pending steps whose dependencies have all completed, in plan order."""
        return [sid for sid, st in self.steps.items()
                if st.status == "pending" and all(self.steps[d].status == "completed" for d in st.step.depends_on)]

    def all_completed(self) -> bool:
        return bool(self.steps) and all(st.status == "completed" for st in self.steps.values())

    def inputs_for(self, step_id: str) -> list[ArtifactRef]:
        """Composition: the outputs of a step's dependencies, then its own extra inputs. A step that gets
        no workspace from its dependencies starts from the goal's initial workspace, if it has one."""
        st = self.steps[step_id]
        refs = [ref for dep in st.step.depends_on for ref in self.steps[dep].outputs]
        if self.goal.workspace is not None and not any(r.media_type == WORKSPACE_MEDIA_TYPE for r in refs):
            refs.insert(0, self.goal.workspace)
        return refs + st.step.inputs

    def position(self, step_id: str) -> DagPosition:
        depth: dict[str, int] = {}

        def depth_of(sid: str) -> int:
            if sid not in depth:
                deps = self.steps[sid].step.depends_on
                depth[sid] = 1 + max((depth_of(d) for d in deps), default=-1)
            return depth[sid]

        mine = depth_of(step_id)
        return DagPosition(
            depth=mine,
            fan_out=sum(1 for s in self.steps if depth_of(s) == mine),
            dependents=sum(1 for st in self.steps.values() if step_id in st.step.depends_on),
            total_steps=len(self.steps),
        )

    def quality(self) -> GoalQuality:
        """The goal's quality record: its last test run (by finish time), the verdict of the newest review
        of each reviewed line (a revision replaces its original's), and the revisions used."""
        done = sorted((st for st in self.steps.values() if st.status == "completed" and st.quality is not None),
                      key=lambda st: st.finished_at or self.started_at)
        tests = [st for st in done if st.quality and st.quality.source == "tests"]
        reviews: dict[str, str] = {}
        for st in done:
            if st.quality and st.quality.source == "review" and st.verdict:
                reviews[st.step.revision_of or st.step.step_id] = st.verdict
        last = tests[-1] if tests else None
        return GoalQuality(
            tests="not_run" if last is None else "passed" if last.quality and last.quality.grade == 1.0 else "failed",
            tests_exit_code=last.quality.exit_code if last and last.quality else None,
            tests_report=last.outputs[0] if last and last.outputs else None,
            reviews=list(reviews.values()), review_revisions=self.review_rounds, test_revisions=self.test_rounds)

    def budget_breach(self, now: datetime | None = None) -> str | None:
        """Why the goal is over budget, or None."""
        b = self.goal.budget
        if b.max_tokens is not None and self.usage.total_tokens > b.max_tokens:
            return f"token budget exceeded: {self.usage.total_tokens} > {b.max_tokens}"
        if b.max_cost_usd is not None and self.usage.cost_usd > b.max_cost_usd:
            return f"cost budget exceeded: ${self.usage.cost_usd:.4f} > ${b.max_cost_usd:.4f}"
        if b.max_steps is not None and self.steps_run > b.max_steps:
            return f"step budget exceeded: {self.steps_run} steps run > {b.max_steps}"
        elapsed = self.active_seconds(now)
        if b.max_wall_seconds is not None and elapsed > b.max_wall_seconds:
            return f"wall-time budget exceeded: {elapsed:.0f}s > {b.max_wall_seconds:.0f}s"
        return None

    def remaining_budget(self) -> dict[str, float | int | None]:
        b = self.goal.budget
        elapsed = self.active_seconds()
        return {
            "max_tokens": None if b.max_tokens is None else max(1, b.max_tokens - self.usage.total_tokens),
            "max_cost_usd": None if b.max_cost_usd is None else max(0.0, b.max_cost_usd - self.usage.cost_usd),
            "max_steps": None if b.max_steps is None else max(1, b.max_steps - self.steps_run),
            "max_wall_seconds": None if b.max_wall_seconds is None else max(1.0, b.max_wall_seconds - elapsed),
        }

    def active_seconds(self, now: datetime | None = None) -> float:
        """Seconds since the start, less the time any approval gate was pending."""
        now = now or utcnow()
        waiting = self.waited_seconds + ((now - self.waiting_since).total_seconds() if self.waiting_since else 0.0)
        return (now - self.started_at).total_seconds() - waiting

    def pending_approvals(self) -> list[Approval]:
        return [a for a in self.approvals.values() if a.status == "pending"]

    def approved(self, gate: str) -> bool:
        a = self.approvals.get(gate)
        return a is not None and a.status == "approved"

    def trace(self) -> dict[str, str] | None:
        """The trace context the goal's tasks and events carry (children of the goal span)."""
        return {"traceparent": self.traceparent} if self.traceparent else None

    # --- transitions -----------------------------------------------------------------------

    def request_approval(self, gate: str, kind: GateKind, *, timeout: float, on_timeout: TimeoutPolicy,
                         step_id: str | None = None, summary: str = "", plan: Plan | None = None,
                         outputs: list[ArtifactRef] | None = None) -> Approval:
        """Open a gate (a new request replaces the gate's last decision): the goal waits for a person."""
        now = utcnow()
        self.approval_requests += 1
        role = self.steps[step_id].step.role if step_id is not None else None
        approval = Approval(gate=gate, kind=kind, request=self.approval_requests, step_id=step_id, role=role,
                            summary=summary[:4000], plan=plan, outputs=outputs or [], requested_at=now,
                            deadline=now + timedelta(seconds=timeout), on_timeout=on_timeout)
        self.approvals[gate] = approval
        if self.waiting_since is None:
            self.waiting_since = now
        self.status = "awaiting_approval"
        return approval

    def decide(self, gate: str, decision: Decision, by: str, note: str) -> Approval | None:
        """Close a pending gate; None when it is not pending. Its consequence is the caller's (same CAS)."""
        approval = self.approvals.get(gate)
        if self.done or approval is None or approval.status != "pending":
            return None
        now = utcnow()
        approval.status = "approved" if decision == "approve" else "rejected"
        approval.decided_by, approval.note, approval.decided_at = by, note, now
        self._stop_waiting_if_clear(now)
        self.remember(f"gate {gate} {approval.status} by {by}" + (f": {note}" if note else ""))
        return approval

    def _stop_waiting_if_clear(self, now: datetime) -> None:
        if self.pending_approvals():
            return
        if self.waiting_since is not None:
            self.waited_seconds += (now - self.waiting_since).total_seconds()
        self.waiting_since = None
        if self.status == "awaiting_approval":
            self.status = "running"

    def hold_outcome(self, step_id: str) -> None:
        """A completed step whose outcome waits for an "after" gate: recorded, not yet counted."""
        self.steps[step_id].status = "awaiting_approval"

    def add_rejection_revision(self, step_id: str, note: ArtifactRef) -> str:
        """A person rejected a step's outcome: a revision of it by the same role, with the note as the review
        it addresses (``note``: stored under a feedback kind's name). Dependents wait for the revision."""
        st = self.steps[step_id]
        self.review_rounds += 1
        n = self.review_rounds + self.test_rounds
        base = st.step.revision_of or step_id
        new = Step(step_id=f"{base}-rev{n}", role=st.step.role, depends_on=[step_id], inputs=[note],
                   instruction=f"Revise the work of step {step_id}: a person rejected it; address every point of "
                               f"their review.\nOriginal instruction: {st.step.instruction}",
                   acceptance=st.step.acceptance, difficulty=st.step.difficulty, revision_of=base)
        for other in self.steps.values():
            if other.status == "pending":
                other.step.depends_on = [new.step_id if d == step_id else d for d in other.step.depends_on]
        self.steps[new.step_id] = StepState(step=new)
        return new.step_id

    def apply_plan(self, plan: Plan) -> None:
        """Install a (re)plan: completed steps are kept, every other step is replaced by the plan's."""
        # Kept: completed steps and outcomes held by an "after" gate (done work); a step waiting for its
        # "before" gate is replaced like every other unfinished step, and its gate dropped.
        kept = {sid: st for sid, st in self.steps.items() if st.status == "completed"
                or (st.status == "awaiting_approval" and f"{sid}.after" in self.approvals)}
        for gate, a in list(self.approvals.items()):
            if a.kind == "before" and a.status == "pending" and a.step_id not in kept:
                del self.approvals[gate]
        steps = dict(kept)
        for step in plan.steps:
            if step.step_id not in kept:
                previous = self.steps.get(step.step_id)
                steps[step.step_id] = StepState(step=step, attempt=previous.attempt if previous else 0,
                                                failures=previous.failures if previous else 0)
        self._carry_revisions(steps, {step.step_id for step in plan.steps if step.step_id not in kept})
        self.steps = steps
        self.plan_version = plan.version
        self.replan_note = None
        self.status = "awaiting_approval" if self.pending_approvals() else "running"
        self._stop_waiting_if_clear(utcnow())

    def _carry_revisions(self, steps: dict[str, StepState], planned: set[str]) -> None:
        """Revisions a review, the tests or a person asked for are not the plan's to drop: one not completed
        is carried into the new plan (to run again, its attempts kept) while what it revises is still there,
        and the plan's new steps that wait on the revised work wait on the revision instead — else a failed
        revision's replan would complete the goal on the unrevised work."""
        swap: dict[str, str] = {}  # revised step -> the revision carried for it
        for sid, st in self.steps.items():  # in insertion order: a revision after what it depends on
            base = st.step.revision_of
            if base is None or sid in steps or not all(d in steps for d in st.step.depends_on):
                continue
            steps[sid] = StepState(step=st.step, attempt=st.attempt, failures=st.failures)
            for d in st.step.depends_on:
                if d == base or steps[d].step.revision_of == base:
                    swap[d] = sid
        for sid in planned:
            st = steps[sid]
            deps = []
            for d in st.step.depends_on:
                while d in swap:
                    d = swap[d]
                deps.append(d)
            if deps != st.step.depends_on:  # a copy: the plan's own steps stay as the planner wrote them
                st.step = st.step.model_copy(update={"depends_on": list(dict.fromkeys(deps))})

    def mark_dispatched(self, step_id: str) -> int:
        st = self.steps[step_id]
        st.status = "dispatched"
        st.attempt += 1
        st.dispatched_at = utcnow()
        return st.attempt

    def outcome_refusal(self, step_id: str, attempt: int, emitter: str | None) -> str | None:
        """Why a step outcome emitted by role ``emitter`` may not count, or None: the step is unknown
        (``step``), the emitter is not the role the step was dispatched to (``role``), or the attempt is
        not the one dispatched last (``attempt``). An outcome of that attempt for a step already finished
        is no refusal: it is a redelivery of one that counted."""
        st = self.steps.get(step_id)
        if st is None:
            return "step"
        if emitter != st.step.role:
            return "role"
        if attempt != st.attempt:
            return "attempt"
        return None

    def complete(self, step_id: str, attempt: int, outputs: list[ArtifactRef], usage: Usage,
                 verdict: str | None, tier: str | None, summary: str, *, simulated: bool = False,
                 quality: StepQuality | None = None) -> bool:
        """Record a completion; False when the step is unknown, already done, or the attempt is stale."""
        st = self.steps.get(step_id)
        if st is None or st.status != "dispatched" or attempt != st.attempt:
            return False
        st.status, st.outputs, st.usage, st.verdict, st.tier = "completed", outputs, usage, verdict, tier
        st.simulated, st.quality = simulated, quality
        st.finished_at = utcnow()
        self.usage = self.usage + usage
        self.simulated = self.simulated or simulated
        self.steps_run += 1
        workspaces = [r for r in outputs if r.media_type == WORKSPACE_MEDIA_TYPE]
        if workspaces:
            self.workspace = workspaces[-1]
        self.remember(f"{step_id} ({st.step.role}) done: {summary}")
        return True

    def fail_attempt(self, step_id: str, attempt: int, error: str, usage: Usage) -> bool:
        st = self.steps.get(step_id)
        if st is None or st.status != "dispatched" or attempt != st.attempt:
            return False
        st.status, st.error = "failed", error
        st.failures += 1
        st.finished_at = utcnow()
        self.usage = self.usage + usage
        self.steps_run += 1
        self.remember(f"{step_id} ({st.step.role}) FAILED: {error[:160]}")
        return True

    def add_revision(self, review_id: str, revisers: Collection[str], feedback: str, *,
                     tests: bool = False) -> list[str]:
        """Review → revision loop: a revision of the reviewed work and a fresh review of it.

        The reviewed work is the review's latest dependency of a role in ``revisers`` (the roles whose
        spec says ``revises``); its revision is a step of that same role. ``feedback`` names what the
        review produced ("review", "test report"). Dependents of the review (and of the reviewed step)
        are rewired to the new pair, so the rest of the plan waits for the revised, re-reviewed work.
        ``tests``: failing tests asked for it (counted in ``test_rounds``, else in ``review_rounds``).
        Returns the new step ids.
        """
        review = self.steps[review_id].step
        coder_ids = [d for d in review.depends_on if self.steps[d].step.role in revisers]
        if not coder_ids:
            return []
        coder = self.steps[coder_ids[-1]].step
        if tests:
            self.test_rounds += 1
        else:
            self.review_rounds += 1
        n = self.review_rounds + self.test_rounds
        base_coder = coder.revision_of or coder.step_id
        base_review = review.revision_of or review.step_id
        new_coder = Step(
            step_id=f"{base_coder}-rev{n}", role=coder.role, depends_on=[coder.step_id, review_id],
            instruction=f"Revise the work of step {coder.step_id}: address every note of step {review_id}'s "
                        f"{feedback}.\nOriginal instruction: {coder.instruction}",
            acceptance=coder.acceptance, difficulty=coder.difficulty, revision_of=base_coder,
        )
        new_review = Step(
            step_id=f"{base_review}-rev{n}", role=review.role, depends_on=[new_coder.step_id, review_id],
            instruction=review.instruction, acceptance=review.acceptance, difficulty=review.difficulty,
            revision_of=base_review,
        )
        swap = {review_id: new_review.step_id, coder.step_id: new_coder.step_id}
        for st in self.steps.values():
            if st.status == "pending":
                st.step.depends_on = list(dict.fromkeys(swap.get(d, d) for d in st.step.depends_on))
        self.steps[new_coder.step_id] = StepState(step=new_coder)
        self.steps[new_review.step_id] = StepState(step=new_review)
        self.remember(f"{review_id} requested changes: revision round {n}")
        return [new_coder.step_id, new_review.step_id]

    def finish(self, status: GoalStatus, reason: str | None = None) -> None:
        self.status = status
        self.reason = reason
        self.finished_at = utcnow()

    def remember(self, line: str) -> None:
        """The running goal memory: short lines, the newest kept."""
        self.memory = (self.memory + [line.replace("\n", " ")[:240]])[-MEMORY_LINES:]

    def memory_to_compact(self) -> list[str]:
        """The oldest memory lines, once the memory has grown to ``MEMORY_COMPACT_AT`` (else none)."""
        return self.memory[:-MEMORY_KEEP_RECENT] if len(self.memory) >= MEMORY_COMPACT_AT else []

    def compact_memory(self, old: list[str], summary: str, usage: Usage, *, simulated: bool = False) -> bool:
        """Replace ``old`` — if they are still the oldest lines — by one line summarising them, and count
        what the summary cost. False when the memory moved on (another replica compacted it first)."""
        if self.done or not old or self.memory[: len(old)] != old:
            return False
        line = "Earlier: " + " ".join(summary.split())
        self.memory = [line[:MEMORY_SUMMARY_CHARS], *self.memory[len(old):]]
        self.usage = self.usage + usage
        self.simulated = self.simulated or simulated
        return True
