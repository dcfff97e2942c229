"""The orchestrator (planner role): goal → plan DAG → dispatch ready steps → compose → finish.

Two inputs, each a durable pull consumer shared by every planner replica:
- goals (``MESH_GOALS``): plan the goal (bounded re-asks on an invalid plan), store it, dispatch;
- step outcomes (``step.completed`` / ``step.failed`` on ``MESH_EVENTS``): record, compose, dispatch
  what became ready, run review → revision loops, replan failed work, enforce budgets, finish.

Every change to a goal is a pure transition of ``GoalState`` applied by compare-and-swap
(``GoalStore.mutate``); side effects (task publishes, events) follow the successful write and are
idempotent (dedupe ids derived from goal, step and attempt), so a replica that crashes (or loses its
server) between the write and the publish is repaired when its input is redelivered: the transition is
found applied and its side effects are issued again (``_resume``). The reconciliation sweep re-drives
stale dispatches.

After each step outcome the goal's running memory is kept short: once it grows, the edge tier
summarises its oldest lines into one (the model call runs before, outside, the CAS transition,
which only swaps the summary in if those lines are still the oldest).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from mesh import tracing
from mesh.aio import together
from mesh.backends.base import ChatMessage, ChatRequest
from mesh.backends.gateway import BudgetGuard
from mesh.backends.structured import StructuredFailed, ask_structured
from mesh.backends.summarise import EdgeSummariser
from mesh.bus.client import Bus
from mesh.bus.consumer import Delivery
from mesh.contracts import (
    Approval,
    ApprovalDecided,
    ApprovalRefused,
    ApprovalRequested,
    ArtifactRef,
    Budget,
    DagPosition,
    Decision,
    Goal,
    GoalCancelled,
    GoalCommand,
    GoalCompleted,
    GoalFailed,
    GoalPlanned,
    GoalSubmitted,
    Plan,
    Step,
    StepCompleted,
    StepDispatched,
    StepFailed,
    Task,
    prompt,
    utcnow,
)
from mesh.contracts.options import validate_options
from mesh.errors import BackendError, BusError, GoalNotFound, OptionInvalid, PlanInvalid, SimulationNotAllowed
from mesh.packing import estimate_tokens, messages_tokens
from mesh.roles import spans
from mesh.roles.calls import ModelCaller
from mesh.roles.gates import (
    FINAL_GATE,
    PLAN_GATE,
    GatePolicy,
    gated_roles,
    goal_gates,
    plan_summary,
    step_gate,
)
from mesh.roles.goalstate import GoalState
from mesh.roles.goalstore import GoalStore
from mesh.roles.plans import fallback_plan, plan_from_doc
from mesh.roles.spec import RoleSpec, feedback_kinds, revising_roles, synthesizing_role

log = logging.getLogger(__name__)

PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "rationale": {"type": "string"},
        "steps": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "properties": {
                "step_id": {"type": "string"}, "role": {"type": "string"}, "instruction": {"type": "string"},
                "depends_on": {"type": "array", "items": {"type": "string"}},
                "acceptance": {"type": "array", "items": {"type": "string"}},
                "difficulty": {"type": "number"},
            },
            "required": ["step_id", "role", "instruction", "depends_on"],
        }},
    },
    "required": ["steps"],
}
SWEEP_SECONDS = 5.0
_REFUSALS = {"goal": "no such goal", "step": "no such step", "role": "not the role the step was dispatched to",
             "attempt": "not the attempt in flight"}
# A memory summary is at most a third of the lines it replaces, within these bounds.
MEMORY_SUMMARY_TOKENS = (32, 200)


class Orchestrator:
    def __init__(self, bus: Bus, spec: RoleSpec, roles: dict[str, RoleSpec], caller: ModelCaller,
                 goals: GoalStore, node_id: str, gates: GatePolicy | None = None) -> None:
        self.bus = bus
        self.spec = spec
        self.roles = {r: s for r, s in roles.items() if s.kind == "worker"}
        # The jobs the plan hands out, by what the role specs say (never by role name).
        self.synthesizer = synthesizing_role(self.roles)
        self.revisers = revising_roles(self.roles)
        self.gates = gates or GatePolicy()
        self.before_roles, self.after_roles = gated_roles(self.roles, "before"), gated_roles(self.roles, "after")
        # A rejected outcome's note is stored under a feedback kind's name, so the revision packs it as a review.
        kinds = feedback_kinds(self.roles)
        self.note_kind = "review" if "review" in kinds or not kinds else min(kinds)
        self.caller = caller
        self.goals = goals
        self.node_id = node_id
        self.limits = spec.limits
        # A dispatched step with no outcome for this long is re-driven (its task re-published under the
        # same dedupe id): longer than every delivery of the task could take.
        topo = bus.topology
        self.stale_after = timedelta(seconds=topo.ack_wait * (topo.max_deliver + 1) + 60)

    # --- goals ---------------------------------------------------------------------------------

    async def on_goal(self, delivery: Delivery) -> None:
        goal = delivery.message(Goal)
        gid = goal.goal_id
        fresh = _new_state(goal, delivery)
        if await self.goals.create(fresh):
            await self.bus.emit(GoalSubmitted(event_id=f"{gid}.submitted", goal_id=gid, goal=goal, node=self.node_id),
                                trace=fresh.trace())
        state = await self.goals.get(gid)
        assert state is not None
        if state.status == "planning":
            try:
                validate_options(goal.options)
            except OptionInvalid as exc:  # a door that did not check (a client library, a hand-made message)
                await self._fail_goal(gid, str(exc), planning=True)
                return
            await self._plan(state, delivery=delivery)
        else:
            await self.redrive(gid)  # a redelivered goal: make sure its dispatches went out

    async def give_up_goal(self, delivery: Delivery, exc: BaseException) -> None:
        """The consumer gives up on a goal message (a bug, an error no retry fixes): the goal fails with
        the reason. Nothing else would end it: the sweep leaves goals that are still planning alone."""
        goal = delivery.message(Goal)
        state = _new_state(goal, delivery)
        if len(state.model_dump_json()) > self.bus.max_payload:
            # a goal too large for its state (a sender that skipped MeshClient's size check): a shortened copy
            # carries the failure, or the goal would be lost without a trace
            state.goal = goal.model_copy(update={"brief": goal.brief[:2000], "constraints": []})
        await self.goals.create(state)
        # only while planning: a running goal is the sweep's to look after
        await self._fail_goal(goal.goal_id, f"planning failed: {type(exc).__name__}: {exc}"[:2000], planning=True)

    async def on_command(self, delivery: Delivery) -> None:
        """A client's command (``mesh.control.<goal>``), applied by CAS like every other transition.
        Cancelling a goal that has ended, or that does not exist, changes nothing."""
        command = delivery.message(GoalCommand)
        if command.action != "cancel":
            await self._on_decision(command)
            return
        gid, reason = command.goal_id, command.reason or f"cancelled by {command.by}"

        def cancel(s: GoalState) -> bool:
            if s.done:
                return False
            s.finish("cancelled", reason)
            return True

        if await self.goals.get(gid) is None:
            log.info("command %s for unknown goal %s ignored", command.action, gid)
            return
        state, changed = await self.goals.mutate(gid, cancel)
        if changed:
            spans.record_goal(state)
        if changed or state.status == "cancelled":  # a redelivery after the write re-announces (deduped by id)
            await self.bus.emit(GoalCancelled(event_id=f"{gid}.cancelled", goal_id=gid, reason=state.reason or reason,
                                              by=command.by), trace=state.trace())

    # --- approvals -----------------------------------------------------------------------------

    async def _on_decision(self, command: GoalCommand) -> None:
        """A person's decision on a gate, applied by CAS. One that finds its gate not pending is refused with
        an ``approval.refused`` event (the deciding client waits for it or for ``approval.decided``); a
        redelivery of a decision already applied re-issues its effects instead."""
        decision: Decision = "approve" if command.action == "approve" else "reject"
        outcome = await self._decide(command.goal_id, command.gate or "", decision, command.by, command.note,
                                     command_id=command.command_id)
        if isinstance(outcome, str):
            log.info("goal %s: %s of gate %s by %s refused: %s", command.goal_id, decision, command.gate,
                     command.by, outcome)
            await self.bus.emit(ApprovalRefused(event_id=f"{command.command_id}.refused", goal_id=command.goal_id,
                                                gate=command.gate or "", decision=decision, by=command.by,
                                                reason=outcome, command_id=command.command_id, node=self.node_id))

    async def _decide(self, goal_id: str, gate: str, decision: Decision, by: str, note: str, *,
                      command_id: str | None = None, timed_out: bool = False,
                      fail: bool = False) -> Approval | str:
        """Decide a pending gate and act on it in the same CAS; the decided gate, or why it was not pending.
        ``fail``: the gate's timeout policy fails the goal."""
        state = await self.goals.get(goal_id)
        current = state.approvals.get(gate) if state is not None else None
        if state is not None and current is not None and command_id is not None and current.command_id == command_id:
            await self._after_decision(state, current)  # a redelivery: this command was applied already
            return current
        if refused := _not_pending(state, gate):
            return refused
        note_ref: ArtifactRef | None = None
        if decision == "reject" and current is not None and current.kind == "after" and not fail:
            text = f"# Review by {by}\n\nA person rejected the output of step {current.step_id}:\n\n{note or '(no note)'}\n"
            note_ref = await self.bus.put_blob(text.encode(), media_type="text/markdown",
                                               name=f"{gate}/{self.note_kind}")
        decided: list[Approval] = []

        def apply(s: GoalState) -> bool:
            decided.clear()
            a = s.decide(gate, decision, by, note)
            if a is None:
                return False
            a.command_id = command_id
            decided.append(a)
            self._consequence(s, a, note_ref, fail=fail, timed_out=timed_out)
            return True

        async def announce(s: GoalState) -> None:
            a = decided[0]
            await self.bus.emit(ApprovalDecided(event_id=f"{goal_id}.approval.{a.request}.decided", goal_id=goal_id,
                                                gate=gate, request=a.request, decision=decision, by=by, note=note,
                                                decided_at=a.decided_at or utcnow(), timed_out=timed_out,
                                                command_id=command_id, node=self.node_id), trace=s.trace())

        state, changed = await self._advance(goal_id, apply, prelude=announce)
        if not changed:
            return _not_pending(state, gate) or f"gate {gate} of goal {goal_id} is not pending"
        await self._after_decision(state, decided[0])
        return decided[0]

    def _consequence(self, s: GoalState, a: Approval, note_ref: ArtifactRef | None, *, fail: bool,
                     timed_out: bool) -> None:
        """What a decision does to the goal, inside the deciding CAS (dispatches follow in ``_forward``).
        A person may reject plans without limit; a deadline's rejections count as replans (``max_replans``),
        or an unattended goal would plan again and again, paying for every plan."""
        rejected = a.status == "rejected"
        by_note = f"{a.decided_by}" + (f": {a.note}" if a.note else "")
        if fail:
            s.finish("failed", f"approval gate {a.gate} got no decision before its deadline")
        elif a.kind == "plan" and rejected and timed_out and s.replans >= self.limits.max_replans:
            s.finish("failed", f"the plan gate's deadline passed {s.replans + 1} times without a decision")
        elif a.kind == "plan" and rejected:
            s.replans += int(timed_out)
            s.status, s.replan_note = "planning", a.note or "(no note)"
        elif a.kind == "final" and rejected:
            s.finish("failed", f"the final result was rejected by {by_note}")
        elif a.kind == "before" and a.step_id is not None:
            st = s.steps[a.step_id]
            if rejected:
                st.status, st.error, st.finished_at = "failed", f"rejected before it ran by {by_note}", utcnow()
                st.failures += 1
            else:
                st.status = "pending"  # approved: _forward dispatches it
        elif a.kind == "after" and a.step_id is not None:
            s.steps[a.step_id].status = "completed"
            if not rejected:
                self._act_on_verdict(s, a.step_id)
            elif s.review_rounds < self._revision_budget(s) and note_ref is not None:
                s.add_rejection_revision(a.step_id, note_ref)
            else:
                s.finish("failed", f"step {a.step_id} was rejected by {by_note} and the revision budget "
                                   f"({self._revision_budget(s)}) is spent")

    async def _after_decision(self, state: GoalState, a: Approval) -> None:
        """Effects a decision leaves to after its CAS: a rejected plan is planned again with the note, a step
        rejected before it ran is replanned around. Both find their work done on a second run."""
        if state.done or a.status != "rejected":
            return
        if a.kind == "plan" and state.status == "planning":
            await self._plan(state, delivery=None)
        elif a.kind == "before" and a.step_id is not None and state.steps.get(a.step_id) is not None \
                and state.steps[a.step_id].status == "failed":
            await self._replan_or_fail(state, a.step_id, state.steps[a.step_id].error or "rejected")

    async def _finish_rejections(self, state: GoalState) -> None:
        """The sweep's part: a rejection whose replan was lost with its planner (a command's redelivery
        redoes it, but a deadline's rejection has none) is replanned once it is older than a stale dispatch."""
        old = utcnow() - self.stale_after
        for a in list(state.approvals.values()):
            if a.status == "rejected" and a.decided_at is not None and a.decided_at < old:
                await self._after_decision(state, a)

    async def _enforce_deadlines(self, state: GoalState) -> None:
        """The sweep's part: every pending gate past its deadline follows its policy."""
        now = utcnow()
        for a in state.pending_approvals():
            if a.deadline is None or a.deadline > now:
                continue
            note = f"no decision before the deadline {a.deadline.isoformat(timespec='seconds')}"
            decision: Decision = "approve" if a.on_timeout == "approve" else "reject"
            await self._decide(state.goal.goal_id, a.gate, decision, "timeout", note, timed_out=True,
                               fail=a.on_timeout == "fail")

    async def give_up_command(self, delivery: Delivery, exc: BaseException) -> None:
        """The consumer gives up on a client's command it could not apply: the client asked the goal to
        stop, so it stops — failed, with the reason — rather than running on as if nobody had asked."""
        command = delivery.message(GoalCommand)
        await self._fail_goal(command.goal_id, f"the {command.action} command of {command.by} could not be "
                                               f"applied: {type(exc).__name__}: {exc}"[:2000])

    async def give_up_outcome(self, delivery: Delivery, exc: BaseException) -> None:
        """The consumer gives up on a step outcome it could not record (a bug, an error no retry fixes):
        the goal fails with the reason instead of waiting on a step whose outcome will never count."""
        event: object = delivery.envelope.message()
        if isinstance(event, StepCompleted | StepFailed):
            await self._fail_goal(event.goal_id, f"the outcome of step {event.step_id} could not be recorded: "
                                                 f"{type(exc).__name__}: {exc}"[:2000])

    async def _plan(self, state: GoalState, *, delivery: Delivery | None, failed: str | None = None) -> None:
        """Plan (``failed``: replan) the goal. ``delivery`` is the goal message's, retried by re-raising
        while its consumer would retry it; a replan (None) is never retried that way."""
        goal = state.goal
        version = state.plan_version + 1
        try:
            with tracing.span(f"plan {self.spec.role}", parent=state.traceparent,
                              attributes=spans.planning(state, self.spec.role, version) if tracing.on() else None):
                plan, source, note = await self._ask_for_plan(state, version=version, failed=failed)
        except PlanInvalid as exc:  # not even a fallback plan: no role can take any phase
            await self._fail_goal(goal.goal_id, f"no plan: {exc}")
            return
        except (BackendError, SimulationNotAllowed) as exc:  # the latter: never retried (not retryable)
            if delivery is not None and not delivery.gives_up(exc):
                raise  # nak: plan again later
            await self._fail_goal(goal.goal_id, f"planning failed: {exc}")
            return

        planning = self.caller.current_usage()
        simulated = self.caller.current_simulated()

        def install(s: GoalState) -> tuple[Approval, ...] | None:  # () is a write: mutate skips only None/[]/False
            if s.done or s.plan_version >= plan.version:
                return None
            if failed is not None:
                s.replans += 1
            s.usage = s.usage + planning
            s.simulated = s.simulated or simulated
            s.apply_plan(plan)
            if PLAN_GATE not in goal_gates(s.goal):
                return ()
            timeout, policy = self.gates.for_goal(s.goal)
            return (s.request_approval(PLAN_GATE, "plan", timeout=timeout, on_timeout=policy, plan=plan,
                                       summary=plan_summary(plan)),)

        state, requested = await self.goals.mutate(goal.goal_id, install)
        if requested is not None:
            await self.bus.emit(GoalPlanned(event_id=f"{goal.goal_id}.planned.{plan.version}", goal_id=goal.goal_id,
                                            plan=plan, node=self.node_id, source=source, note=note[:2000]),
                                trace=state.trace())
            await self._announce_requests(state, requested)
        await self._advance(goal.goal_id)

    async def _ask_for_plan(self, state: GoalState, *, version: int,
                            failed: str | None) -> tuple[Plan, Literal["model", "fallback"], str]:
        """The model's plan (re-asked with room when truncated, with the exact error when invalid), else
        after ``max_plan_attempts`` the fallback plan built from the role specs: the goal goes on."""
        goal = state.goal
        roles = prompt.bullets(prompt.role_line(r, s.output_kind, s.description) for r, s in sorted(self.roles.items()))
        sections = [(prompt.CONSTRAINTS, prompt.bullets(goal.constraints or [prompt.NONE])), (prompt.GOAL, goal.brief),
                    (prompt.ROLES, roles)]
        if failed is not None:
            done = [f"{sid} ({st.step.role}): completed" for sid, st in state.steps.items()
                    if st.status == "completed"]
            why = state.steps[failed].error if failed in state.steps else None
            sections.append((prompt.REPLAN, "Step " + failed + " failed after retries" + (f" ({why[:1000]})" if why
                             else "") + ". Completed steps (keep their "
                             "ids, they will not run again):\n" + prompt.bullets(done or [prompt.NONE]) +
                             "\nPlan the remaining work; you may change or replace the failed step."))
        if state.replan_note is not None:
            sections.append((prompt.REPLAN, (f"A person rejected plan v{state.plan_version} with this note:\n"
                             f"{state.replan_note}\nPlan again, addressing the note.")))
        sections.append((prompt.OUTPUT, self.spec.prompts.output if self.spec.prompts else ""))
        messages = [ChatMessage(role="system", content=prompt.system(self.spec.role, self.spec.output_kind,
                                                                     self.spec.prompts.system)),  # type: ignore[union-attr]
                    ChatMessage(role="user", content=prompt.render(sections))]
        self.caller.scope(goal.goal_id, "plan", self.spec.role, version)
        decision = await self.caller.route(
            self.spec, goal_id=goal.goal_id, step_id="plan",
            needed_tokens=messages_tokens(messages) + self.limits.max_output_tokens,
            difficulty=0.7, position=DagPosition(),
            attempt=version, prior_failures=state.replans, budget_fraction_left=1.0,
            event_id=f"{goal.goal_id}.route.plan.{version}", instruction=goal.brief, remaining=_remaining(state),
        )
        request = ChatRequest(messages=messages, thinking=decision.thinking, json_schema=PLAN_SCHEMA,
                              max_tokens=self.limits.max_output_tokens,
                              metadata={"role": self.spec.role, **{k: v for k, v in goal.options.items()
                                                             if isinstance(v, str | int | float | bool)}})
        gateway = self.caller.gateway

        def validate(doc: object) -> Plan:
            plan = _with_synthesis(plan_from_doc(doc, goal_id=goal.goal_id, version=version), self.synthesizer)
            plan.check(frozenset(self.roles), max_steps=self.limits.max_plan_steps)
            return plan

        try:
            asked = await ask_structured(
                lambda req: self.caller.chat(req, decision, _remaining(state), _no_check), request, validate,
                attempts=self.limits.max_plan_attempts, what="plan",
                room=lambda resp: gateway.room(resp.tier or decision.tier, messages_tokens(messages)))
        except StructuredFailed as exc:
            log.warning("goal %s: %s; falling back to a plan built from the role specs", goal.goal_id, exc)
            plan = _with_synthesis(fallback_plan(goal, self.roles, version=version, reason=str(exc)), self.synthesizer)
            plan.check(frozenset(self.roles), max_steps=self.limits.max_plan_steps)
            return plan, "fallback", f"the model gave no valid plan: {exc}"
        note = f"accepted on attempt {asked.attempts} after: " + "; ".join(asked.errors) if asked.errors else ""
        return asked.value, "model", note

    # --- step outcomes -------------------------------------------------------------------------

    async def on_step_event(self, delivery: Delivery) -> None:
        """A step outcome counts only when the role named in its subject is the role the step was
        dispatched to and its attempt is the one in flight; anything else is refused — logged, counted
        (``mesh_outcomes_refused_total``) and acked — and changes nothing."""
        event: object = delivery.envelope.message()
        if not isinstance(event, StepCompleted | StepFailed):
            return
        address = self.bus.topology.event_address(delivery.subject)
        emitter = address.role if address else None
        try:
            if isinstance(event, StepCompleted):
                state = await self._on_completed(event, emitter)
            else:
                state = await self._on_failed(event, emitter)
        except GoalNotFound:  # the planner writes a goal's state before it dispatches any step of it
            self._refuse(event, emitter, "goal")
            return
        if state is not None:
            await self._compact_memory(state)

    def _refuse(self, ev: StepCompleted | StepFailed, emitter: str | None, reason: str) -> None:
        log.warning("refused %s of goal %s step %s attempt %d emitted by role %s: %s", ev.type, ev.goal_id,
                    ev.step_id, ev.attempt, emitter, _REFUSALS[reason])
        self.caller.metrics.outcome_refused(reason)

    async def _on_completed(self, ev: StepCompleted, emitter: str | None) -> GoalState | None:
        summary = f"{len(ev.outputs)} output(s)" + (f", verdict {ev.verdict}" if ev.verdict else "")

        def record(s: GoalState) -> bool:
            if s.done or s.outcome_refusal(ev.step_id, ev.attempt, emitter) or not s.complete(
                    ev.step_id, ev.attempt, ev.outputs, ev.usage, ev.verdict, ev.tier, summary,
                    simulated=ev.simulated, quality=ev.quality):
                return False
            if ev.role in self.after_roles:  # recorded; it counts (and its verdict acts) once a person approves
                s.hold_outcome(ev.step_id)
                timeout, policy = self.gates.for_goal(s.goal)
                s.request_approval(step_gate(ev.step_id, "after"), "after", timeout=timeout, on_timeout=policy,
                                   step_id=ev.step_id, outputs=ev.outputs,
                                   summary=f"the outcome of step {ev.step_id} ({ev.role}): {summary}")
                return True
            self._act_on_verdict(s, ev.step_id)
            return True

        state, recorded = await self._advance(ev.goal_id, record)
        if not recorded:
            # decided on the state ``_advance`` read last, the same one ``record`` refused
            if reason := state.outcome_refusal(ev.step_id, ev.attempt, emitter):
                self._refuse(ev, emitter, reason)
                return None
            await self._resume(state)
        return state

    def _act_on_verdict(self, s: GoalState, step_id: str) -> None:
        """Review → revision: a completed step's "changes requested" verdict (a review's, or failing tests')
        adds a revision while the goal's revision budget lasts."""
        st = s.steps[step_id]
        tests = st.quality is not None and st.quality.source == "tests"
        used, budget = (s.test_rounds, self.limits.max_test_revisions) if tests else \
            (s.review_rounds, self.limits.max_review_iterations)
        budget = min(budget, s.goal.options.get("max_revisions", budget))  # a goal may cap its revisions
        if st.verdict == "changes_requested" and used < budget:
            reviewer = self.roles.get(st.step.role)
            s.add_revision(step_id, self.revisers,
                           reviewer.output_kind.replace("_", " ") if reviewer else "review", tests=tests)

    def _revision_budget(self, s: GoalState) -> int:
        return int(min(self.limits.max_review_iterations,
                       s.goal.options.get("max_revisions", self.limits.max_review_iterations)))

    async def _on_failed(self, ev: StepFailed, emitter: str | None) -> GoalState | None:
        def record(s: GoalState) -> bool:
            return (not s.done and not s.outcome_refusal(ev.step_id, ev.attempt, emitter)
                    and s.fail_attempt(ev.step_id, ev.attempt, ev.error, ev.usage))

        state, changed = await self.goals.mutate(ev.goal_id, record)
        if not changed:
            if reason := state.outcome_refusal(ev.step_id, ev.attempt, emitter):
                self._refuse(ev, emitter, reason)
                return None
            st = state.steps[ev.step_id]
            if state.done or st.status != "failed":
                await self._resume(state)  # recorded and replanned (or finished) before: re-issue the effects
                return state
            # recorded before, but that delivery died before it replanned: replan now
        await self._replan_or_fail(state, ev.step_id, ev.error)
        return state

    async def _replan_or_fail(self, state: GoalState, step_id: str, error: str) -> None:
        if state.replans >= self.limits.max_replans:
            await self._fail_goal(state.goal.goal_id, f"step {step_id} failed and the replan limit "
                                                      f"({self.limits.max_replans}) is reached: {error}")
            return
        await self._plan(state, delivery=None, failed=step_id)

    async def _compact_memory(self, state: GoalState) -> None:
        """Summarise the oldest memory lines on the edge tier (its calls are the goal's step "memory").
        Runs after the outcome's dispatches, so a slow edge never holds the goal up. ``state`` may be a
        step behind: the swap below only applies while those lines are still the oldest."""
        if state.done or not (old := state.memory_to_compact()):
            return
        goal_id = state.goal.goal_id
        scope = self.caller.scope(goal_id, "memory", self.spec.role, len(state.memory))
        summarise = EdgeSummariser(self.caller.gateway, budget=BudgetGuard(_remaining(state)), extractive_share=1.0,
                                   label=False)
        text = "\n".join(old)
        low, high = MEMORY_SUMMARY_TOKENS
        with tracing.adopt(state.traceparent):  # the summary's model calls belong to the goal's trace
            summary = await summarise(text, min(max(estimate_tokens(text) // 3, low), high))
        await self.goals.mutate(goal_id, lambda s: s.compact_memory(old, summary, scope.usage,
                                                                    simulated=scope.simulated))

    # --- driving ---------------------------------------------------------------------------------

    async def _advance(self, goal_id: str, record: Callable[[GoalState], bool] | None = None, *,
                       prelude: Callable[[GoalState], Awaitable[None]] | None = None) -> tuple[GoalState, bool]:
        """In one compare-and-swap: ``record`` (an outcome's transition, when given), then budgets,
        completion, approval gates and the dispatch of every step that became ready; then their side
        effects (``prelude`` first, when the write happened). Returns the state and whether anything was
        written (``record`` applied)."""

        def move(s: GoalState) -> _Moves | None:
            asked = s.approval_requests
            if record is not None and not record(s):
                return None
            moves = self._forward(s) or (_Moves([]) if record is not None else None)
            if moves is not None:
                moves.requested = [a for a in s.approvals.values() if a.request > asked]
                moves.finished = moves.finished or s.done
            return moves

        state, moves = await self.goals.mutate(goal_id, move)
        if moves is not None and prelude is not None:
            await prelude(state)
        if moves is not None and moves.finished:
            await self._announce_end(state)
        elif moves is not None:  # the tasks go out together, each followed by its event
            await self._announce_requests(state, moves.requested)
            await together(*(self._publish_task(state, sid) for sid in moves.ready))
        return state, moves is not None

    def _forward(self, s: GoalState) -> _Moves | None:
        """Budgets, completion, then every ready step marked dispatched; None when nothing changed. Nothing
        is dispatched while the plan waits for approval (or a rejected plan for its successor); a step of a
        "before" role waits at its gate instead; a complete goal with a final gate waits at it."""
        if s.done:
            return None
        if breach := s.budget_breach():
            s.finish("failed", breach)
            return _Moves([], finished=True)
        plan_gate = s.approvals.get(PLAN_GATE)
        if s.status == "planning" or (plan_gate is not None and plan_gate.status == "pending"):
            return None
        if s.all_completed():
            s.result = _final_output(s, self.synthesizer)
            if s.quality().tests == "failed" and not _accepts_failing_tests(s.goal.options):
                s.finish("failed", f"tests still failing after {s.test_rounds} revisions")
                return _Moves([], finished=True)  # nothing to sign off
            if FINAL_GATE in goal_gates(s.goal) and not s.approved(FINAL_GATE):
                final = s.approvals.get(FINAL_GATE)
                if final is not None and final.status == "pending":
                    return None
                timeout, policy = self.gates.for_goal(s.goal)
                s.request_approval(FINAL_GATE, "final", timeout=timeout, on_timeout=policy,
                                   outputs=[s.result] if s.result is not None else [],
                                   summary=f"the goal's result after {s.steps_run} steps")
                return _Moves([])
            s.finish("completed")
            return _Moves([], finished=True)
        ready, held = [], False
        for sid in s.ready():
            st = s.steps[sid]
            if st.step.role in self.before_roles and not s.approved(step_gate(sid, "before")):
                timeout, policy = self.gates.for_goal(s.goal)
                st.status = "awaiting_approval"
                s.request_approval(step_gate(sid, "before"), "before", timeout=timeout, on_timeout=policy,
                                   step_id=sid, summary=f"step {sid} ({st.step.role}) is ready to run: "
                                                        f"{st.step.instruction[:600]}")
                held = True
                continue
            s.mark_dispatched(sid)
            ready.append(sid)
        return _Moves(ready) if ready or held else None

    async def _announce_requests(self, state: GoalState, requested: list[Approval] | tuple[Approval, ...]) -> None:
        gid = state.goal.goal_id
        for a in requested:
            await self.bus.emit(ApprovalRequested(event_id=f"{gid}.approval.{a.request}", goal_id=gid, approval=a,
                                                  node=self.node_id), trace=state.trace())

    async def _publish_task(self, state: GoalState, step_id: str) -> None:
        st, goal = state.steps[step_id], state.goal
        task = Task(
            task_id=Task.make_id(goal.goal_id, step_id, st.attempt), goal_id=goal.goal_id, step=st.step,
            attempt=st.attempt, brief=goal.brief, constraints=goal.constraints, inputs=state.inputs_for(step_id),
            memory="\n".join(state.memory), position=state.position(step_id), remaining=_remaining(state),
            budget_fraction_left=_fraction_left(state), prior_failures=st.failures, options=goal.options,
        )
        # The task and its event in one write, their acks awaited together: a round trip less on every
        # step's path. A re-published task (a duplicate) re-publishes the event under its same dedupe id,
        # which the stream drops just as it drops the task.
        trace = state.trace()
        await together(self.bus.dispatch(task, trace=trace), self.bus.emit(StepDispatched(
            event_id=f"{task.task_id}.dispatched", goal_id=goal.goal_id, step_id=step_id, role=st.step.role,
            attempt=st.attempt, task_id=task.task_id, node=self.node_id), trace=trace))

    async def _resume(self, state: GoalState) -> None:
        """An outcome whose transition is already in the goal state: mostly a redelivery whose first
        delivery wrote the state and then failed (a crash, a restarting server, a timed-out reply) before
        its side effects went out. (A server that crashed may redeliver it as a first delivery: its
        delivery count is not to be trusted, so this runs for every such outcome.) Issue the effects
        again, or the goal waits forever on steps nobody dispatched: what became ready, and — only when
        they are younger than half the duplicate window, so the stream is sure to drop a copy — the
        final event and the tasks dispatched (older tasks are the sweep's business; re-publishing them
        could start a second run, and a straggler's outcome must not announce an old goal's end twice)."""
        recent = utcnow() - timedelta(seconds=self.bus.topology.duplicate_window / 2)
        if state.done:
            if state.finished_at is not None and state.finished_at > recent:
                await self._announce_end(state, ended_here=False)
            return
        for sid, st in state.steps.items():
            if st.status == "dispatched" and st.dispatched_at is not None and st.dispatched_at > recent:
                await self._publish_task(state, sid)
        await self._announce_requests(state, [a for a in state.pending_approvals() if a.requested_at > recent])
        await self._advance(state.goal.goal_id)

    async def _fail_goal(self, goal_id: str, reason: str, *, planning: bool = False) -> None:
        """Fail the goal (with ``planning``: only if it is still planning), in the same CAS as the check."""
        def close(s: GoalState) -> bool:
            if s.done or (planning and s.status != "planning"):
                return False
            s.finish("failed", reason)
            return True

        state, changed = await self.goals.mutate(goal_id, close)
        if changed:
            await self._announce_end(state)

    async def _announce_end(self, state: GoalState, *, ended_here: bool = True) -> None:
        """The final event of a finished goal (a cancellation is announced where its command is applied).
        ``ended_here``: this call's transition ended the goal (not a re-issue), so the goal span is recorded."""
        goal_id = state.goal.goal_id
        if ended_here:
            spans.record_goal(state)
        if state.status == "completed" and state.result is not None:
            await self.bus.emit(GoalCompleted(event_id=f"{goal_id}.completed", goal_id=goal_id, result=state.result,
                                              workspace=state.workspace, usage=state.usage,
                                              steps_run=state.steps_run, node=self.node_id,
                                              simulated=state.simulated, quality=state.quality()),
                                trace=state.trace())
        elif state.status != "cancelled":
            await self.bus.emit(GoalFailed(event_id=f"{goal_id}.failed", goal_id=goal_id, node=self.node_id,
                                           reason=state.reason or "failed", usage=state.usage,
                                           simulated=state.simulated, quality=state.quality()),
                                trace=state.trace())

    async def redrive(self, goal_id: str) -> None:
        """Re-publish every dispatched task (dedupe drops the ones that exist) and advance."""
        state = await self.goals.get(goal_id)
        if state is None or state.done:
            return
        for sid, st in state.steps.items():
            if st.status == "dispatched":
                await self._publish_task(state, sid)
        await self._advance(goal_id)

    async def sweep(self, stop: asyncio.Event) -> None:
        """Reconciliation: wall-time budgets (less the time spent waiting for approvals), stale dispatches
        (never a step whose outcome waits at its "after" gate: it is not dispatched any more), gate
        deadlines, and the replan after a rejection whose planner died."""
        # Goals seen finished: a finished goal never runs again, so it is not read (and parsed) again every
        # sweep: the bucket keeps every goal, so reading them all cost more with every goal ever run.
        finished: set[str] = set()
        while not stop.is_set():
            try:
                keys = await self.goals.keys()
                finished.intersection_update(keys)  # bounded by the bucket
                for gid in keys:
                    if gid in finished:
                        continue
                    state = await self.goals.get(gid)
                    if state is not None and state.done:
                        finished.add(gid)
                    if state is None or state.done:
                        continue
                    await self._finish_rejections(state)
                    if state.status == "planning":
                        continue
                    await self._enforce_deadlines(state)
                    now = utcnow()
                    stale = any(st.status == "dispatched" and st.dispatched_at is not None
                                and now - st.dispatched_at > self.stale_after for st in state.steps.values())
                    if stale or state.budget_breach(now):
                        await self.redrive(gid)
            except BusError as exc:
                log.warning("reconciliation sweep failed: %s", exc)
            try:
                await asyncio.wait_for(stop.wait(), SWEEP_SECONDS)
            except TimeoutError:
                pass


@dataclass(slots=True)
class _Moves:
    """What one advance did to a goal: the steps it dispatched, the gates it opened, or that it finished
    the goal."""

    ready: list[str]
    finished: bool = False
    requested: list[Approval] = field(default_factory=list)  # gates opened


def _not_pending(state: GoalState | None, gate: str) -> str:
    """Why ``gate`` cannot be decided now ("" when it is pending)."""
    if state is None:
        return "no such goal"
    if state.done:
        return f"goal {state.goal.goal_id} has ended ({state.status}); its gates are closed"
    a = state.approvals.get(gate)
    if a is None:
        pending = ", ".join(p.gate for p in state.pending_approvals()) or "none"
        return f"goal {state.goal.goal_id} has no gate {gate!r} (pending: {pending})"
    if a.status != "pending":
        return f"gate {gate} of goal {state.goal.goal_id} was already {a.status} by {a.decided_by}"
    return ""


def _accepts_failing_tests(options: dict[str, Any]) -> bool:
    """Goal option ``accept_failing_tests`` (a bool, checked by the options registry): complete even though
    the last test run failed."""
    return options.get("accept_failing_tests") is True


def _with_synthesis(plan: Plan, role: str) -> Plan:
    """Every plan ends in one step of the synthesizing ``role`` that depends on all sinks: the goal's
    final artifact."""
    if any(s.role == role for s in plan.steps):
        return plan
    needed = {d for s in plan.steps for d in s.depends_on}
    sinks = [s.step_id for s in plan.steps if s.step_id not in needed]
    synth = Step(step_id="synthesis", role=role, depends_on=sinks,
                 instruction="Compose every output into the final deliverable for the goal.")
    return plan.model_copy(update={"steps": [*plan.steps, synth]})


def _final_output(state: GoalState, synthesizer: str) -> Any:
    """The main output of the last completed step of the ``synthesizer`` role (else of the last completed step)."""
    done = [st for st in state.steps.values() if st.status == "completed" and st.outputs]
    done.sort(key=lambda st: (st.step.role == synthesizer, st.finished_at or utcnow()))
    return done[-1].outputs[0] if done else None


def _new_state(goal: Goal, delivery: Delivery) -> GoalState:
    """A goal's first state: its trace continues the submitting message's trace (the goal span's ids
    chosen now, for the goal's whole life)."""
    traceparent, parent = tracing.goal_traceparent(delivery.envelope.trace)
    return GoalState(goal=goal, traceparent=traceparent, trace_parent=parent)


def _remaining(state: GoalState) -> Budget:
    return Budget.model_validate(state.remaining_budget())


def _fraction_left(state: GoalState) -> float:
    b, left = state.goal.budget, state.remaining_budget()
    fractions = [float(left[k]) / float(v) for k, v in  # type: ignore[arg-type]
                 (("max_tokens", b.max_tokens), ("max_cost_usd", b.max_cost_usd), ("max_steps", b.max_steps))
                 if v]
    return max(0.0, min([1.0, *fractions]))


async def _no_check() -> None:
    return None
