"""The worker role: pull a task → pack context → route → call the backend with a bounded tool loop →
publish artifacts and events → ack.

Idempotent: a redelivered task whose step is already completed (or superseded) in the goal state is
acked without work, and every event id is derived from the task id, so a re-run inside the dedupe
window publishes nothing twice. A worker's last delivery never just disappears: when retries are
exhausted it publishes ``step.failed`` so the orchestrator can replan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mesh import tracing
from mesh.aio import together
from mesh.backends.base import ChatMessage, ChatRequest, ChatResponse, ToolSpec
from mesh.backends.gateway import BudgetGuard
from mesh.backends.structured import ECHO_CHARS, StructuredFailed, ask_structured, extract_json
from mesh.backends.summarise import EdgeSummariser
from mesh.bus.client import Bus
from mesh.bus.consumer import Delivery
from mesh.bus.outbox import Outbox
from mesh.config import MeshSettings
from mesh.contracts import (
    Artifact,
    ArtifactCreated,
    ArtifactRef,
    RouteDecision,
    StepCompleted,
    StepFailed,
    StepProgress,
    StepQuality,
    StepStarted,
    Task,
    ToolCall,
    Usage,
    prompt,
)
from mesh.contracts.models import fit_freeform, utcnow
from mesh.errors import GoalCancelled, MeshError, OutputInvalid
from mesh.packing import apack, estimate_tokens, messages_tokens
from mesh.roles import spans
from mesh.roles.calls import ModelCaller
from mesh.roles.goalstate import GoalProgressView
from mesh.roles.goalstore import GoalStore
from mesh.roles.spec import RoleSpec
from mesh.tools.cache import BlobCache, MemoryCache
from mesh.tools.merge import resolve_workspace
from mesh.tools.sandbox import select as select_sandbox
from mesh.tools.shell import ShellLimits, ShellPolicy
from mesh.tools.textproto import TextCall, parse_calls, protocol_prompt
from mesh.tools.toolbox import LedgerQueryFn, ToolBox, ToolResult
from mesh.tools.workspace import MANIFEST_MEDIA_TYPE, Workspace

log = logging.getLogger(__name__)

# Bounded (notes, their length) so that a grammar-constrained small model always closes the JSON
# within its output budget instead of listing notes until it is cut off.
VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"verdict": {"enum": ["approve", "changes_requested"]},
                   "notes": {"type": "array", "maxItems": 12, "items": {"type": "string", "maxLength": 400}}},
    "required": ["verdict", "notes"],
}
MAX_INPUT_FILE_CHARS = 20_000
CANCEL_RECHECK_SECONDS = 0.5
# Re-asks for a verdict that did not parse (each quotes the error): a weak model gets two more chances.
VERDICT_REASKS = 2
# What a test-gated role runs when its model (on a tier without function calling) wrote no command
# (pythonpath=src: code in a src/ layout imports as in the sim's and most projects' tests; harmless without one).
DEFAULT_TEST_ARGV = ["python", "-m", "pytest", "-q", "-o", "pythonpath=src"]


def shell_policy(spec: RoleSpec, s: MeshSettings) -> ShellPolicy:
    """What the role's ``shell.run`` may start, within which limits, in which sandbox (probed here, once)."""
    limits = ShellLimits(timeout_seconds=s.shell_timeout, cpu_seconds=s.shell_cpu_seconds,
                         memory_bytes=s.shell_memory_mb << 20, output_bytes=s.shell_output_kb << 10,
                         processes=s.shell_processes, open_files=s.shell_open_files)
    return ShellPolicy(frozenset(spec.shell_allow), limits, network=spec.shell_network,
                       sandbox=select_sandbox(s.sandbox) if "shell.run" in spec.tools else None)


class Worker:
    def __init__(self, bus: Bus, spec: RoleSpec, caller: ModelCaller, goals: GoalStore, node_id: str, *,
                 feedback_kinds: frozenset[str]) -> None:
        self.bus = bus
        self.spec = spec
        # Outputs (named "<step>/<kind>") that a revision addresses: the kinds of the roles that give
        # feedback (``spec.feedback_kinds``: reviews, test reports).
        self.feedback_kinds = feedback_kinds
        self.caller = caller
        self.goals = goals
        self.node_id = node_id
        s = bus.settings
        # workspace files, by digest: recent ones in memory, the rest on this node's disk
        self.blobs = MemoryCache(BlobCache(s.data_dir / "blobs", bus.get_blob))
        self.shell = shell_policy(spec, s)
        self.ledger = _ledger_query(bus) if "ledger.query" in spec.tools else None

    async def handle(self, delivery: Delivery) -> None:
        task = delivery.message(Task)
        started = time.perf_counter()
        metrics = self.caller.metrics
        # A task on its first delivery, dispatched less than CANCEL_RECHECK_SECONDS ago, comes from a goal
        # state that young (the planner writes the step dispatched, then publishes its task): it stands for
        # the step check as a read that young stands for a cancellation check. Others read the state.
        age = _age(delivery)
        if delivery.attempt > 1 or age is None or age >= CANCEL_RECHECK_SECONDS:
            state = await self.goals.progress(task.goal_id, direct=True)
            if not _awaits(state, task):  # a replica a write behind may say so: only the leader's word skips it
                state = await self.goals.progress(task.goal_id)
            if not _awaits(state, task):
                log.info("skipping task %s: goal or step no longer waiting for this attempt", task.task_id)
                metrics.task_done("skipped", time.perf_counter() - started)
                return
            age = 0.0
        # The step's span, child of the goal span (the task carries the goal's trace context); its events
        # and model/tool spans continue it.
        with tracing.span(f"invoke_agent {self.spec.role}", parent=delivery.envelope.trace.get("traceparent"),
                          attributes=spans.agent(task, self.spec.role, delivery.attempt) if tracing.on() else None) \
                as span:
            outcome = await self._step(task, delivery, started, checked=time.monotonic() - age)
            if tracing.on():
                span.update({"mesh.outcome": outcome, "mesh.simulated": self.caller.current_simulated(),
                             **spans.usage(self.caller.current_usage())})

    async def _step(self, task: Task, delivery: Delivery, started: float, *, checked: float) -> str:
        """Run the step and publish its outcome; returns how it ended (completed, failed, cancelled).
        ``checked``: when (``time.monotonic``) the goal state it runs on was read or written."""
        metrics = self.caller.metrics
        async with Outbox(self.bus) as outbox:  # the step's events; their acks are awaited before its outcome
            await outbox.emit(StepStarted(event_id=f"{task.task_id}.started.{delivery.attempt}", goal_id=task.goal_id,
                                          step_id=task.step.step_id, role=self.spec.role, attempt=task.attempt,
                                          node=self.node_id))
            scope = self.caller.scope(task.goal_id, task.step.step_id, self.spec.role, task.attempt, outbox)
            try:
                completed = await self._execute(task, delivery, outbox, self._cancel_check(task.goal_id, checked))
            except GoalCancelled:
                metrics.task_done("cancelled", time.perf_counter() - started)
                return "cancelled"
            except MeshError as exc:
                metrics.error(type(exc).__name__)
                if not delivery.gives_up(exc):
                    raise  # nak with backoff: another delivery, maybe on another replica
                # Given up: the step fails here, with what it spent (the consumer's give_up knows neither).
                reason = f"gave up after {delivery.attempt} deliveries: {exc}" if exc.retryable else str(exc)
                await self._fail(task, reason, scope.usage, outbox)
                metrics.task_done("failed", time.perf_counter() - started)
                return "failed"
            await outbox.settle()
        await self.bus.emit(completed)
        metrics.task_done("completed", time.perf_counter() - started)
        return "completed"

    async def give_up(self, delivery: Delivery, exc: BaseException) -> None:
        """The consumer gives up on a task the handler could not deal with (a bug, an error no retry
        fixes): the step fails with the reason, so the orchestrator replans instead of the sweep
        re-driving the same failure until the goal's wall budget runs out."""
        task = delivery.message(Task)
        with tracing.adopt(delivery.envelope.trace.get("traceparent")):  # still the goal's trace
            async with Outbox(self.bus) as outbox:
                await self._fail(task, f"gave up after {delivery.attempt} deliveries: {type(exc).__name__}: {exc}",
                                 Usage(), outbox)

    async def _fail(self, task: Task, error: str, usage: Usage, outbox: Outbox) -> None:
        await outbox.settle()
        await self.bus.emit(StepFailed(event_id=f"{task.task_id}.failed", goal_id=task.goal_id,
                                       step_id=task.step.step_id, role=self.spec.role, attempt=task.attempt,
                                       node=self.node_id, error=error[:2000], usage=usage))

    def _cancel_check(self, goal_id: str, checked: float) -> Callable[[], Awaitable[None]]:
        """Raises ``GoalCancelled`` before a model call or tool once the goal is cancelled. A state read
        younger than ``CANCEL_RECHECK_SECONDS`` (the task's own check or dispatch, the last call's) answers
        for the next one: a burst of tool calls costs one read, a cancellation is seen within that long."""

        async def check() -> None:
            nonlocal checked
            if time.monotonic() - checked < CANCEL_RECHECK_SECONDS:
                return
            state = await self.goals.progress(goal_id, direct=True)  # a cancelled goal stays cancelled
            if state is None:  # a replica that has not seen the goal yet: the leader knows
                state = await self.goals.progress(goal_id)
            if state is None or state.status == "cancelled":
                raise GoalCancelled(f"goal {goal_id} was cancelled")
            checked = time.monotonic()
        return check

    # --- the step ----------------------------------------------------------------------------

    async def _execute(self, task: Task, delivery: Delivery, outbox: Outbox,
                       check: Callable[[], Awaitable[None]]) -> StepCompleted:
        step, spec = task.step, self.spec
        workspace_ref, inputs, reviews = await self._load_inputs(task)
        branches = sorted({r.digest for r in task.inputs if r.media_type == MANIFEST_MEDIA_TYPE})
        if workspace_ref is not None and workspace_ref.digest not in branches:  # merged: the ledger's lineage needs it
            await self._announce(outbox, task, workspace_ref, "workspace", branches)
        workspace = await Workspace.open(workspace_ref, self.blobs)
        if workspace_ref is not None:
            inputs.append(("workspace", await workspace.render(MAX_INPUT_FILE_CHARS), -1))
        # A revision addresses the feedback it depends on: packed as its own section, above every other input.
        feedback = [(name, text, len(task.inputs) + priority) for name, text, priority in reviews] \
            if step.revision_of else []
        if feedback:
            inputs = [i for i in inputs if i[0] not in {name for name, _, _ in feedback}]
        instruction = step.instruction
        if spec.prompts and spec.prompts.output:
            instruction += f"\n\nOutput format: {spec.prompts.output}"
        system = prompt.system(spec.role, spec.output_kind, spec.prompts.system if spec.prompts else "")
        needed = estimate_tokens(system + instruction + task.brief + task.memory + "".join(task.constraints)) \
            + sum(estimate_tokens(t) for _, t, _ in inputs + feedback) + spec.limits.max_output_tokens
        decision = await self.caller.route(
            spec, goal_id=task.goal_id, step_id=step.step_id, needed_tokens=needed, difficulty=step.difficulty,
            position=task.position, attempt=task.attempt, prior_failures=task.prior_failures + delivery.attempt - 1,
            budget_fraction_left=task.budget_fraction_left, event_id=f"{task.task_id}.route.{delivery.attempt}",
            instruction=step.instruction, remaining=task.remaining, deadline=task.deadline,
        )
        window = self.caller.gateway.window(decision.tier)
        # what one answer on this tier may write (a small model's reserve, not the role's 8k): packing leaves it free
        max_out = min(spec.limits.max_output_tokens, self.caller.gateway.tiers[decision.tier].output_reserve)
        native = self.caller.gateway.native_tools(decision.tier)
        if not native and (protocol := protocol_prompt(frozenset(spec.tools))):
            instruction += "\n\n" + protocol  # no function calling on this tier: tool use is written as text
        # Inputs that do not fit are summarised by the edge tier (its calls count toward this step).
        summarise = EdgeSummariser(self.caller.gateway,
                                   budget=BudgetGuard(task.remaining, spent=self.caller.current_usage()))
        packed = await apack(system=system, constraints=task.constraints, brief=task.brief, instruction=instruction,
                             acceptance=step.acceptance, inputs=inputs, memory=task.memory, window=window,
                             output_reserve=max_out, summarise=summarise, feedback=feedback)
        if packed.dropped or packed.summarised:
            await outbox.emit(StepProgress(
                event_id=f"{task.task_id}.packed.{delivery.attempt}", goal_id=task.goal_id, step_id=step.step_id,
                role=spec.role, attempt=task.attempt, node=self.node_id,
                message=f"context packed to {packed.tokens} of {window} tokens",
                detail={"dropped": packed.dropped, "summarised": packed.summarised, "tier": decision.tier},
            ))
        async with ToolBox(spec.tools, workspace, shell=self.shell, ledger=self.ledger,
                           artifacts=self.blobs) as toolbox:  # closing it removes the step's temp folder
            request = ChatRequest(
                messages=packed.messages,
                tools=[ToolSpec(name=n, description=d, parameters=p) for n, d, p in toolbox.specs()] if native else [],
                thinking=decision.thinking, max_tokens=max_out,
                json_schema=VERDICT_SCHEMA if spec.verdicts else None,
                metadata={"role": spec.role, "difficulty": step.difficulty, "fan_out": task.position.fan_out,
                          "step_id": step.step_id, **_hints(task.options)},
            )
            response = await self._converse(task, request, decision, toolbox, outbox, check)
            if not native:
                await self._text_tools(task, response, toolbox, outbox, check, request, decision)
            tests_exit = toolbox.last_exit_code
            verdict = await self._verdict(task, request, response, decision, outbox, check) if spec.verdicts \
                else _test_verdict(tests_exit) if spec.verdict_from_tests else None
        text = response.text
        if response.finish_reason == "length":  # said, not hidden: the answer stopped at the output limit
            text += f"\n\n[truncated: the answer reached its output limit of {request.max_tokens} tokens]"
            await self._progress(outbox, task, "truncated", "answer truncated (finish_reason=length)",
                                 {"max_tokens": request.max_tokens, "tier": response.tier})
        await outbox.send()  # the step's events so far travel while its outputs are stored
        outputs = await self._publish_outputs(task, text, workspace, workspace_ref, outbox)
        return StepCompleted(
            event_id=f"{task.task_id}.completed", goal_id=task.goal_id, step_id=step.step_id, role=spec.role,
            attempt=task.attempt, node=self.node_id, outputs=outputs, usage=self.caller.current_usage(),
            verdict=verdict, tier=response.tier or decision.tier,  # type: ignore[arg-type]
            simulated=self.caller.current_simulated(), quality=_quality(spec, verdict, tests_exit, task.inputs),
        )  # tier: the one that answered, after any fallback

    async def _converse(self, task: Task, request: ChatRequest, decision: RouteDecision, toolbox: ToolBox,
                        outbox: Outbox, check: Callable[[], Awaitable[None]]) -> ChatResponse:
        """The bounded tool loop (or a swarm fan-out for wide, tool-less steps)."""
        fan_out = self.spec.router.swarm_fan_out
        if decision.tier == "swarm" and fan_out and not request.tools and task.options.get("swarm", True):
            subtasks = [f"Part {i + 1} of {fan_out}: cover one distinct aspect of: {task.step.instruction}"
                        for i in range(fan_out)]
            return await self.caller.swarm(request, subtasks, decision, task.remaining, check)
        messages = list(request.messages)
        for _round in range(self.spec.limits.max_tool_rounds + 1):
            response = await self.caller.chat(request.model_copy(update={"messages": messages}), decision,
                                              task.remaining, check)
            if not response.tool_calls or _round == self.spec.limits.max_tool_rounds:
                return response
            messages.append(response.as_message())
            for call in response.tool_calls:
                result = await self._tool(task, call.id, call.name, call.arguments, toolbox, outbox, check)
                messages.append(ChatMessage(role="tool", content=result.content, tool_call_id=call.id,
                                            name=call.name))
        raise AssertionError("unreachable: the loop returns on its last round")

    async def _tool(self, task: Task, call_id: str, name: str, arguments: dict[str, Any], toolbox: ToolBox,
                    outbox: Outbox, check: Callable[[], Awaitable[None]]) -> ToolResult:
        await check()
        with tracing.span(f"execute_tool {name}", attributes=spans.tool(name, call_id) if tracing.on() else None) \
                as span:
            result = await toolbox.call(name, arguments)
            if tracing.on():
                span.update({"mesh.tool.ok": result.ok, "mesh.tool.refused": result.refused,
                             **({"mesh.sandbox": result.sandbox} if result.sandbox else {}),
                             **({} if result.ok else {"error.type": "refused" if result.refused else "tool_error"})})
        await outbox.emit(ToolCall(
            event_id=f"{task.task_id}.tool.{call_id}", goal_id=task.goal_id, step_id=task.step.step_id,
            role=self.spec.role, node=self.node_id, tool=name, arguments=result.arguments,
            ok=result.ok, refused=result.refused, error=None if result.ok else result.content,
            duration_ms=result.duration_ms, sandbox=result.sandbox,
        ))
        return result

    async def _text_tools(self, task: Task, response: ChatResponse, toolbox: ToolBox, outbox: Outbox,
                          check: Callable[[], Awaitable[None]], request: ChatRequest, decision: RouteDecision) -> None:
        """A tier without function calling: the edits and commands written in the answer run through the
        same guarded toolbox. A role that revises work (the coder) whose answer held no file is asked once
        more, briefly, for one fenced file (small models lose the protocol in a long prompt). A role whose
        verdict is its tests runs the test command itself when the model wrote none, so its verdict still
        comes from a real run."""
        calls = parse_calls(response.text, toolbox.allowed)
        if self.spec.revises and "fs.write" in toolbox.allowed and not any(c.name == "fs.write" for c in calls):
            again = await self.caller.chat(request.model_copy(update={"messages": [
                request.messages[0], ChatMessage(role="user", content=(
                    f"{task.step.instruction}\n\nYour last answer wrote no file. Answer with ONLY one fenced code "
                    f"block whose first line names the file, like:\n```python main.py\n<the whole file>\n```"))]}),
                decision, task.remaining, check)
            calls = parse_calls(again.text, toolbox.allowed)
            await self._progress(outbox, task, "nofile", f"the answer wrote no file; asked again: "
                                                         f"{len(calls)} edit(s) in the second answer", {})
        if self.spec.verdict_from_tests and not any(c.name == "shell.run" for c in calls) \
                and DEFAULT_TEST_ARGV[0] in self.spec.shell_allow:
            calls.append(TextCall("shell.run", {"argv": DEFAULT_TEST_ARGV}))
        for i, call in enumerate(calls):
            await self._tool(task, f"text-{i}", call.name, call.arguments, toolbox, outbox, check)

    async def _verdict(self, task: Task, request: ChatRequest, response: ChatResponse, decision: Any,
                       outbox: Outbox, check: Callable[[], Awaitable[None]]) -> str | None:
        """The verdict JSON, read leniently; an invalid or truncated one is re-asked (the error quoted).
        A model that never gives one leaves the step without a verdict, and the step says so."""
        try:
            return _verdict_of(extract_json(response.text))
        except MeshError as exc:
            error = str(exc)
        reask = request.model_copy(update={"tools": [], "messages": [
            *request.messages, ChatMessage(role="assistant", content=response.text[:ECHO_CHARS]),
            ChatMessage(role="user", content=f"That review is invalid: {error}. Answer with the verdict JSON only.")]})
        gateway = self.caller.gateway
        try:
            asked = await ask_structured(
                lambda req: self.caller.chat(req, decision, task.remaining, check), reask, _verdict_of,
                attempts=VERDICT_REASKS,
                room=lambda r: gateway.room(r.tier or decision.tier, messages_tokens(reask.messages)),
                what="verdict")
        except StructuredFailed as exc:
            await self._progress(outbox, task, "noverdict", f"no verdict: {exc}", {"errors": [error, *exc.errors]})
            return None
        return asked.value

    async def _progress(self, outbox: Outbox, task: Task, key: str, message: str, detail: dict[str, Any]) -> None:
        await outbox.emit(StepProgress(
            event_id=f"{task.task_id}.{key}", goal_id=task.goal_id,
            step_id=task.step.step_id, role=self.spec.role, attempt=task.attempt, node=self.node_id,
            message=message[:2000], detail=fit_freeform(detail)))  # a model's errors may be anything

    async def _load_inputs(self, task: Task) -> tuple[ArtifactRef | None, list[tuple[str, str, int]],
                                                      list[tuple[str, str, int]]]:
        """Dependency outputs → (the workspace to work on, text inputs with priorities, the feedback among them)."""
        workspace = await resolve_workspace([r for r in task.inputs if r.media_type == MANIFEST_MEDIA_TYPE],
                                            self.blobs, self._store)
        texts = [(p, r) for p, r in enumerate(task.inputs) if r.media_type != MANIFEST_MEDIA_TYPE]
        blobs = await together(*(self.bus.get_blob(ref.digest) for _, ref in texts))
        inputs: list[tuple[str, str, int]] = []
        reviews: list[tuple[str, str, int]] = []
        for (priority, ref), blob in zip(texts, blobs, strict=True):
            item = (ref.name or ref.digest[:12], blob.decode("utf-8", errors="replace"), priority)
            if ref.name.rpartition("/")[2] in self.feedback_kinds:
                reviews.append(item)
            inputs.append(item)
        return workspace, inputs, reviews

    async def _publish_outputs(self, task: Task, text: str, ws: Workspace, ws_in: ArtifactRef | None,
                               outbox: Outbox) -> list[ArtifactRef]:
        step, kind = task.step, self.spec.output_kind
        parents = [r.digest for r in task.inputs]
        put_main = self.bus.put_blob(text.encode(), media_type="text/markdown", name=f"{step.step_id}/{kind}")
        if not ws.dirty:
            main = await put_main
            await self._announce(outbox, task, main, kind, parents)
            return [main] if ws_in is None else [main, ws_in]  # pass the workspace on so dependents still see it
        # The text, the workspace and the change itself (for the reviewer and the tester downstream) are
        # stored concurrently, not one round trip after another; they are announced in this order.
        main, ws_out, diff = await together(put_main, ws.commit(self._store), self._store_diff(ws, step.step_id))
        ws_out = ws_out.model_copy(update={"name": f"{step.step_id}/workspace"})
        await self._announce(outbox, task, main, kind, parents)
        await self._announce(outbox, task, ws_out, "workspace", [ws_in.digest] if ws_in else [])
        await self._announce(outbox, task, diff, "diff", [d.digest for d in (ws_in, ws_out) if d is not None])
        return [main, ws_out, diff]

    async def _store_diff(self, ws: Workspace, step_id: str) -> ArtifactRef:
        return await self.bus.put_blob((await ws.diff()).encode(), media_type="text/x-diff", name=f"{step_id}/diff")

    async def _store(self, data: bytes, media_type: str, name: str) -> ArtifactRef:
        return await self.bus.put_blob(data, media_type=media_type, name=name)

    async def _announce(self, outbox: Outbox, task: Task, ref: ArtifactRef, kind: str, parents: list[str]) -> None:
        artifact = Artifact(ref=ref, goal_id=task.goal_id, producer_step=task.step.step_id,
                            producer_role=self.spec.role, kind=kind, parents=parents)
        await outbox.emit(ArtifactCreated(event_id=f"{task.task_id}.artifact.{ref.digest[:16]}",
                                            goal_id=task.goal_id, node=self.node_id, artifact=artifact))


def _age(delivery: Delivery) -> float | None:
    """Seconds since the message was made (its envelope's timestamp), None when that says nothing (no
    zone, or a maker's clock ahead of ours: a clock that skews can only cost a read, never skip one)."""
    made = delivery.envelope.created_at
    age = None if made.tzinfo is None else (utcnow() - made).total_seconds()
    return age if age is not None and age >= 0 else None


def _awaits(state: GoalProgressView | None, task: Task) -> bool:
    """Whether the goal state still waits for this task: its step dispatched with this attempt."""
    current = state.steps.get(task.step.step_id) if state is not None and not state.done else None
    return current is not None and current.status == "dispatched" and current.attempt == task.attempt


def _ledger_query(bus: Bus) -> LedgerQueryFn:
    """``ledger.query`` asks the ledger's NATS service (read-only, time- and row-limited there)."""
    from mesh.roles.ledger_service import LedgerClient  # imports DuckDB: only for roles that query

    client = LedgerClient(bus)

    async def query(sql: str, max_rows: int) -> dict[str, Any]:
        return (await client.sql(sql, max_rows=max_rows)).to_json()
    return query


def _hints(options: dict[str, Any]) -> dict[str, Any]:
    """Goal options that backends may read as hints (the sim's knobs, e.g. sim_plan_steps)."""
    return {k: v for k, v in options.items() if isinstance(v, str | int | float | bool)}


def _test_verdict(exit_code: int | None) -> str | None:
    """A tester's verdict from what really ran, not from what the model says about it: changes are
    requested when the last test command failed (pytest's 5, "no tests collected", counts as failed)."""
    if exit_code is None:
        return None
    return "approve" if exit_code == 0 else "changes_requested"


def _quality(spec: RoleSpec, verdict: str | None, tests_exit: int | None, inputs: list[ArtifactRef]) -> StepQuality:
    """The step's grade and its source: a review's verdict or the last test run, about the work of the
    steps that produced the workspace it judged (named ``<step>/workspace``); nothing judged, no grade."""
    if verdict is None:
        return StepQuality()
    judged = list(dict.fromkeys(r.name.split("/")[0] for r in inputs
                                if r.media_type == MANIFEST_MEDIA_TYPE and "/" in r.name))
    return StepQuality(grade=1.0 if verdict == "approve" else 0.0, source="review" if spec.verdicts else "tests",
                       exit_code=None if spec.verdicts else tests_exit, judged=judged)


def _verdict_of(doc: Any) -> str:
    """Strict: an object whose ``verdict`` is approve or changes_requested (notes, if any, a list)."""
    if not isinstance(doc, dict) or "verdict" not in doc:
        raise OutputInvalid('the review must be a JSON object with a "verdict"')
    verdict = doc["verdict"]
    if verdict not in ("approve", "changes_requested"):
        raise OutputInvalid(f'"verdict" must be "approve" or "changes_requested", not {verdict!r}')
    if not isinstance(doc.get("notes", []), list):
        raise OutputInvalid('"notes" must be a list of strings')
    return str(verdict)
