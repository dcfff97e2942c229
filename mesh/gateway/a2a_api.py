"""A2A v1.0 (``a2a-sdk``, JSON-RPC binding at ``/a2a``): a task is a goal, and nothing about it lives in the
gateway. The SDK's default handler keeps tasks and their event queues in process memory; this one reads
them from the mesh, so a task outlives the connection that created it and any replica serves any task.

    SendMessage            the message's text becomes a goal; the task snapshot (waits for the end, or for
                           an approval gate, unless ``configuration.return_immediately``, up to
                           MESH_GATEWAY_REQUEST_TIMEOUT). A message on an existing task (``task_id``) is a
                           decision on its pending gate (below)
    SendStreamingMessage   the task, then a status update per step and an artifact update per output, until
                           the end or an approval gate (INPUT_REQUIRED)
    GetTask / ListTasks    snapshots from goal state
    CancelTask             a cancel command to the planner; the snapshot
    SubscribeToTask        the current snapshot, then every later update

Resuming without loss (extension ``RESUME_EXTENSION``): every update carries ``metadata["mesh.seq"]``, its
event-stream sequence. A2A 1.0's SubscribeToTaskRequest has no metadata field, so a client sends the last
sequence it saw as the service parameter (HTTP header) ``Mesh-Resume-After``; it then gets exactly the
updates after it — no snapshot, nothing twice, nothing missed.

Approval gates (docs/APPROVALS.md): a goal waiting for a person is a task in INPUT_REQUIRED whose status
message says what waits (text, plus a data part with the gate). The client answers with a message on the
same task: a data part ``{"decision": "approve" | "reject", "gate": …, "note": …}`` (gate optional when one
is pending), or the text "approve" / "reject: <note>". A decision on a gate that is not pending is an
invalid-params error naming why; the decider is the token's name.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from a2a.helpers.proto_helpers import get_data_parts, get_message_text, new_data_part, new_text_message
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.request_handler import RequestHandler
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.routes import create_jsonrpc_routes
from a2a.server.routes.common import DefaultServerCallContextBuilder
from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentExtension,
    AgentInterface,
    AgentSkill,
    Artifact,
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetExtendedAgentCardRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    HTTPAuthSecurityScheme,
    ListTaskPushNotificationConfigsRequest,
    ListTaskPushNotificationConfigsResponse,
    ListTasksRequest,
    ListTasksResponse,
    Message,
    Part,
    Role,
    SecurityRequirement,
    SecurityScheme,
    SendMessageRequest,
    StringList,
    SubscribeToTaskRequest,
    Task,
    TaskArtifactUpdateEvent,
    TaskPushNotificationConfig,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from a2a.utils.errors import (
    ExtendedAgentCardNotConfiguredError,
    InvalidParamsError,
    PushNotificationNotSupportedError,
    TaskNotFoundError,
)
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh.client.decisions import parse_decision
from mesh.config import MeshSettings
from mesh.contracts import (
    Approval,
    ApprovalRequested,
    ArtifactCreated,
    Decision,
    Event,
    GoalCancelled,
    GoalCompleted,
    GoalFailed,
)
from mesh.contracts.http import GoalRequest
from mesh.errors import RequestRefused
from mesh.gateway.auth import Principal
from mesh.gateway.goals import Desk, describe, waiting_text

if TYPE_CHECKING:
    from mesh.roles.goalstate import GoalState

RPC_PATH = "/a2a"
RESUME_EXTENSION = "urn:mesh:a2a:resume:v1"
RESUME_HEADER = "mesh-resume-after"
SEQ = "mesh.seq"
STATES: dict[str, TaskState] = {"planning": TaskState.TASK_STATE_SUBMITTED, "running": TaskState.TASK_STATE_WORKING,
                          "awaiting_approval": TaskState.TASK_STATE_INPUT_REQUIRED,
                          "completed": TaskState.TASK_STATE_COMPLETED, "failed": TaskState.TASK_STATE_FAILED,
                          "cancelled": TaskState.TASK_STATE_CANCELED}
FINAL_STATES: dict[type, TaskState] = {GoalCompleted: TaskState.TASK_STATE_COMPLETED,
                                 GoalFailed: TaskState.TASK_STATE_FAILED,
                                 GoalCancelled: TaskState.TASK_STATE_CANCELED}
# Where a blocking SendMessage returns and a SendStreamingMessage ends: the end, or a gate waiting for a person.
STOPS: tuple[type, ...] = (*FINAL_STATES, ApprovalRequested)


def _agent_text(text: str, task_id: str) -> Message:
    msg = new_text_message(text, role=Role.ROLE_AGENT, context_id=task_id)
    msg.task_id = task_id
    return msg


def _gate_part(approval: Approval) -> Part:
    return new_data_part({"gate": approval.gate, "kind": approval.kind, "step_id": approval.step_id or "",
                          "summary": approval.summary,
                          "deadline": approval.deadline.isoformat() if approval.deadline else "",
                          "on_timeout": approval.on_timeout}, "application/json")


def snapshot(state: GoalState, synthesis: str | None = None) -> Task:
    """A goal as an A2A task (INPUT_REQUIRED, with what waits, while a gate is pending)."""
    gid = state.goal.goal_id
    done = sum(st.status == "completed" for st in state.steps.values())
    pending = [] if state.done else state.pending_approvals()
    text = state.reason or f"{state.status}: {done}/{len(state.steps)} steps completed"
    if pending:
        text = "\n".join(waiting_text(a.gate, a.summary) for a in pending)
    message = _agent_text(text, gid)
    message.parts.extend(_gate_part(a) for a in pending)
    task = Task(id=gid, context_id=gid, status=TaskStatus(state=STATES[state.status], message=message),
                history=[new_text_message(state.goal.brief, role=Role.ROLE_USER, context_id=gid)])
    task.status.timestamp.FromDatetime(state.finished_at or state.started_at)
    if synthesis is not None:
        task.artifacts.append(Artifact(artifact_id=f"{gid}-synthesis", name="synthesis",
                                       parts=[Part(text=synthesis, media_type="text/markdown")]))
    task.metadata.update({"mesh.submitter": state.goal.submitter or "", "mesh.cost_usd": state.usage.cost_usd,
                          "mesh.total_tokens": state.usage.total_tokens})
    return task


class MeshRequestHandler(RequestHandler):
    """The A2A request handler over the mesh (see the module docstring)."""

    def __init__(self, desk: Desk, request_timeout: float) -> None:
        self.desk = desk
        self.request_timeout = request_timeout

    # --- helpers ---------------------------------------------------------------------------------

    async def _task(self, goal_id: str) -> Task:
        try:
            state = await self.desk.state(goal_id)
        except RequestRefused as exc:
            raise TaskNotFoundError(str(exc)) from None
        synthesis = await self.desk.synthesis(goal_id) if state.status == "completed" else None
        return snapshot(state, synthesis)

    async def _submit(self, params: SendMessageRequest, context: ServerCallContext) -> str:
        brief = get_message_text(params.message).strip()
        if not brief:
            raise InvalidParamsError("the message has no text part to take as the goal")
        options = dict(params.message.metadata) if params.message.HasField("metadata") else {}
        try:
            goal_id, _ = await self.desk.submit(context.state["principal"], GoalRequest(brief=brief, options=options),
                                                idempotency_key=params.message.message_id or None)
        except RequestRefused as exc:
            raise InvalidParamsError(str(exc), data={"type": exc.type, "code": exc.code}) from None
        return goal_id

    async def _decide(self, params: SendMessageRequest, context: ServerCallContext) -> tuple[str, int]:
        """A message on an existing task: a decision on its pending gate. (the goal id, the event stream's last
        sequence before the decision was sent)."""
        gid, message = params.message.task_id, params.message
        data = [d for d in get_data_parts(message.parts) if isinstance(d, dict) and "decision" in d]
        gate: str | None = None
        if data:
            decision, gate, note = data[0].get("decision"), data[0].get("gate") or None, data[0].get("note", "")
            if decision not in ("approve", "reject") or not isinstance(note, str) or \
                    not (gate is None or isinstance(gate, str)):
                raise InvalidParamsError('a decision data part is {"decision": "approve" | "reject", "gate": '
                                         '"<gate>" (optional), "note": "<text>"}; got ' + repr(data[0]))
        else:
            parsed = parse_decision(get_message_text(message))
            if parsed is None:
                raise InvalidParamsError("a message on a mesh task decides its pending approval gate: send "
                                         "'approve' or 'reject: <note>' (or a decision data part); a new goal is a "
                                         "new message without a task id")
            decision, note = parsed
        _, after = await self.desk.client.event_positions()
        chosen: Decision = "approve" if decision == "approve" else "reject"
        try:
            await self.desk.decide(context.state["principal"], gid, gate, chosen, note)
        except RequestRefused as exc:
            if exc.status == 404:
                raise TaskNotFoundError(str(exc)) from None
            raise InvalidParamsError(str(exc), data={"type": exc.type, "code": exc.code}) from None
        return gid, after

    async def _start(self, params: SendMessageRequest, context: ServerCallContext) -> tuple[str, int]:
        """A new goal, or a decision on a task's gate: (goal id, the sequence its updates follow)."""
        if params.message.task_id:
            return await self._decide(params, context)
        return await self._submit(params, context), 0

    async def _updates(self, goal_id: str, after: int, *,
                       stop_at_gate: bool = False) -> AsyncGenerator[TaskStatusUpdateEvent | TaskArtifactUpdateEvent]:
        """The goal's events after ``after`` as A2A updates, each tagged with its sequence (``stop_at_gate``:
        ending after an approval request, the INPUT_REQUIRED update)."""
        async for seq, event in self.desk.events(goal_id, after):
            for update in await self._as_updates(goal_id, event):
                update.metadata.update({SEQ: seq, "mesh.type": event.type})
                yield update
            if stop_at_gate and isinstance(event, ApprovalRequested):
                return

    async def _as_updates(self, gid: str, event: Event) -> list[TaskStatusUpdateEvent | TaskArtifactUpdateEvent]:
        if isinstance(event, ArtifactCreated):
            ref, art = event.artifact.ref, event.artifact
            part = new_data_part({"digest": ref.digest, "media_type": ref.media_type, "size": ref.size,
                                  "kind": art.kind, "step_id": art.producer_step or ""}, "application/json")
            return [TaskArtifactUpdateEvent(task_id=gid, context_id=gid, artifact=Artifact(
                artifact_id=ref.digest, name=ref.name or art.kind, description=f"{art.kind} from "
                f"{art.producer_step or 'the goal'}", parts=[part]), last_chunk=True)]
        out: list[TaskStatusUpdateEvent | TaskArtifactUpdateEvent] = []
        if isinstance(event, GoalCompleted):
            out.append(TaskArtifactUpdateEvent(task_id=gid, context_id=gid, last_chunk=True, artifact=Artifact(
                artifact_id=f"{gid}-synthesis", name="synthesis",
                parts=[Part(text=await self.desk.synthesis(gid), media_type="text/markdown")])))
        text = describe(event)
        if text is not None:
            state = FINAL_STATES.get(type(event), TaskState.TASK_STATE_WORKING)
            message = _agent_text(text, gid)
            if isinstance(event, ApprovalRequested):
                state = TaskState.TASK_STATE_INPUT_REQUIRED
                message.parts.append(_gate_part(event.approval))
            out.append(TaskStatusUpdateEvent(task_id=gid, context_id=gid, status=TaskStatus(state=state, message=message)))
        return out

    # --- the A2A methods -------------------------------------------------------------------------

    async def on_message_send(self, params: SendMessageRequest, context: ServerCallContext) -> Task | Message:
        goal_id, after = await self._start(params, context)
        if not params.configuration.return_immediately:
            try:
                async with asyncio.timeout(self.request_timeout):
                    async for _, event in self.desk.events(goal_id, after):
                        if isinstance(event, STOPS):
                            break
            except TimeoutError:
                pass  # the task is returned as it stands; GetTask or SubscribeToTask follow it
        return await self._task(goal_id)

    async def on_message_send_stream(self, params: SendMessageRequest,
                                     context: ServerCallContext) -> AsyncGenerator[Any]:
        goal_id, after = await self._start(params, context)
        if after:  # a decision: the task as it stands, then what follows it
            first = await self._task(goal_id)
        else:
            first = Task(id=goal_id, context_id=goal_id, status=TaskStatus(state=TaskState.TASK_STATE_SUBMITTED),
                         history=[params.message])
        first.metadata.update({SEQ: after})
        yield first
        async for update in self._updates(goal_id, after, stop_at_gate=True):
            yield update

    async def on_subscribe_to_task(self, params: SubscribeToTaskRequest,
                                   context: ServerCallContext) -> AsyncGenerator[Any]:
        resume = context.state.get("headers", {}).get(RESUME_HEADER)
        if resume is not None:
            try:
                after = int(resume)
            except ValueError:
                raise InvalidParamsError(f"{RESUME_HEADER} must be a stream sequence, not {resume!r}") from None
            await self._task(params.id)  # TaskNotFound before the stream
        else:
            # The snapshot reflects at most what the stream holds now; updates go on from there.
            _, after = await self.desk.client.event_positions()
            task = await self._task(params.id)
            task.metadata.update({SEQ: after})
            yield task
            if task.status.state in FINAL_STATES.values():
                return
        async for update in self._updates(params.id, after):
            yield update

    async def on_get_task(self, params: GetTaskRequest, context: ServerCallContext) -> Task | None:
        return await self._task(params.id)

    async def on_list_tasks(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        states = sorted(await self.desk.client.goals(), key=lambda s: s.started_at, reverse=True)
        wanted = [s for s in states if not params.status or STATES[s.status] == params.status]
        if params.context_id:
            wanted = [s for s in wanted if s.goal.goal_id == params.context_id]
        start = int(params.page_token or 0)
        size = params.page_size or 50
        page = wanted[start:start + size]
        more = start + size < len(wanted)
        return ListTasksResponse(tasks=[snapshot(s) for s in page], page_size=len(page), total_size=len(wanted),
                                 next_page_token=str(start + size) if more else "")

    async def on_cancel_task(self, params: CancelTaskRequest, context: ServerCallContext) -> Task | None:
        who: Principal = context.state["principal"]
        try:
            await self.desk.cancel(who, params.id, "cancelled through A2A")
        except RequestRefused as exc:
            raise TaskNotFoundError(str(exc)) from None
        return await self._task(params.id)

    async def on_create_task_push_notification_config(self, params: TaskPushNotificationConfig,
                                                      context: ServerCallContext) -> TaskPushNotificationConfig:
        raise PushNotificationNotSupportedError()

    async def on_get_task_push_notification_config(self, params: GetTaskPushNotificationConfigRequest,
                                                   context: ServerCallContext) -> TaskPushNotificationConfig:
        raise PushNotificationNotSupportedError()

    async def on_list_task_push_notification_configs(
            self, params: ListTaskPushNotificationConfigsRequest,
            context: ServerCallContext) -> ListTaskPushNotificationConfigsResponse:
        raise PushNotificationNotSupportedError()

    async def on_delete_task_push_notification_config(self, params: DeleteTaskPushNotificationConfigRequest,
                                                      context: ServerCallContext) -> None:
        raise PushNotificationNotSupportedError()

    async def on_get_extended_agent_card(self, params: GetExtendedAgentCardRequest,
                                         context: ServerCallContext) -> AgentCard:
        raise ExtendedAgentCardNotConfiguredError()


class _Context(DefaultServerCallContextBuilder):
    """The SDK's call context plus the principal the gateway's guard authenticated."""

    def build(self, request: Request) -> ServerCallContext:
        context = super().build(request)
        context.state["principal"] = request.scope["state"]["principal"]
        return context


def agent_card(base_url: str) -> AgentCard:
    """The card: one skill per role spec, streaming, bearer auth, the resume extension."""
    from mesh.roles.spec import default_nodes_dir, load_specs

    skills = [AgentSkill(id=name, name=name, description=spec.description or f"the {name} role",
                         tags=[spec.kind], input_modes=["text/plain"], output_modes=["text/markdown"])
              for name, spec in sorted(load_specs(default_nodes_dir()).items()) if spec.kind != "recorder"]
    return AgentCard(
        name="Mesh", version="1.0",
        description="An agent mesh for long-running goals: give it a goal, it plans, researches, implements, "
                    "reviews, tests and synthesises. A task is a goal; it runs on when you disconnect.",
        supported_interfaces=[AgentInterface(url=base_url.rstrip("/") + RPC_PATH, protocol_binding="JSONRPC",
                                             protocol_version="1.0")],
        capabilities=AgentCapabilities(streaming=True, push_notifications=False, extensions=[AgentExtension(
            uri=RESUME_EXTENSION, required=False,
            description="Every update carries metadata['mesh.seq'] (its event-stream sequence). SubscribeToTask "
                        "with the service parameter (HTTP header) Mesh-Resume-After: <seq> resumes right after it: "
                        "no snapshot, no update missed, none twice.")]),
        security_schemes={"bearer": SecurityScheme(http_auth_security_scheme=HTTPAuthSecurityScheme(
            scheme="bearer", description="a gateway token (MESH_GATEWAY_TOKENS_FILE); none on a loopback gateway "
                                         "without tokens"))},
        security_requirements=[SecurityRequirement(schemes={"bearer": StringList(list=[])})],
        default_input_modes=["text/plain"], default_output_modes=["text/markdown", "application/json"],
        skills=skills,
    )


class A2aFace:
    def __init__(self, desk: Desk, settings: MeshSettings) -> None:
        self.handler = MeshRequestHandler(desk, settings.gateway_request_timeout)

    async def card(self, request: Request) -> Response:
        return JSONResponse(agent_card_to_dict(agent_card(str(request.base_url))))

    def routes(self) -> list[Route]:
        return [Route("/.well-known/agent-card.json", self.card, methods=["GET"]),
                Route("/.well-known/agent.json", self.card, methods=["GET"]),
                *create_jsonrpc_routes(self.handler, RPC_PATH, context_builder=_Context())]

