"""The public event stream: one discriminated union, published on ``<prefix>.event.<goal_id>.<role>.<type>``
(``role``: the role of the node that emitted it — what subject permissions and the planner check)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, TypeAdapter

from mesh.contracts.models import (
    Approval,
    Artifact,
    ArtifactRef,
    Decision,
    FreeForm,
    Gate,
    Goal,
    GoalQuality,
    Plan,
    RouteDecision,
    StepQuality,
    Token,
    Usage,
    Wire,
    new_id,
    utcnow,
)


class EventBase(Wire):
    event_id: str = Field(default_factory=new_id)
    goal_id: Token
    at: datetime = Field(default_factory=utcnow)
    node: str | None = Field(default=None, description="Node id of the publisher.")


class GoalSubmitted(EventBase):
    type: Literal["goal.submitted"] = "goal.submitted"
    goal: Goal


class GoalPlanned(EventBase):
    type: Literal["goal.planned"] = "goal.planned"
    plan: Plan
    source: Literal["model", "fallback"] = Field(
        default="model", description="model: the planner's model wrote the plan; fallback: it could not within its "
                                     "attempts and the plan was built from the role specs (schema 1.1).")
    note: str = Field(default="", max_length=2000, description="Why the planner fell back, or how many of the "
                                                               "model's answers were truncated or invalid first.")


class GoalCompleted(EventBase):
    type: Literal["goal.completed"] = "goal.completed"
    result: ArtifactRef
    workspace: ArtifactRef | None = None
    usage: Usage = Field(default_factory=Usage)
    steps_run: int = 0
    simulated: bool = Field(default=False, description="Some of the goal's model calls were simulated.")
    quality: GoalQuality = Field(default_factory=GoalQuality)


class GoalFailed(EventBase):
    type: Literal["goal.failed"] = "goal.failed"
    reason: str
    usage: Usage = Field(default_factory=Usage)
    simulated: bool = Field(default=False, description="Some of the goal's model calls were simulated.")
    quality: GoalQuality | None = None


class GoalCancelled(EventBase):
    type: Literal["goal.cancelled"] = "goal.cancelled"
    reason: str = "cancelled by user"
    by: str = Field(default="", description="who asked for the cancellation")


class StepEvent(EventBase):
    step_id: Token
    role: Token
    attempt: int = 1


class StepDispatched(StepEvent):
    type: Literal["step.dispatched"] = "step.dispatched"
    task_id: str


class StepStarted(StepEvent):
    type: Literal["step.started"] = "step.started"


class StepProgress(StepEvent):
    type: Literal["step.progress"] = "step.progress"
    message: str
    fraction: float | None = Field(default=None, ge=0, le=1)
    detail: FreeForm = Field(default_factory=dict)


class StepCompleted(StepEvent):
    type: Literal["step.completed"] = "step.completed"
    outputs: list[ArtifactRef] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    verdict: Literal["approve", "changes_requested"] | None = None
    tier: str | None = None
    simulated: bool = Field(default=False, description="Some model call of this step was simulated.")
    quality: StepQuality = Field(default_factory=StepQuality)


class StepFailed(StepEvent):
    type: Literal["step.failed"] = "step.failed"
    error: str
    retryable: bool = False
    usage: Usage = Field(default_factory=Usage, description="What the failed attempts spent.")


class RouteDecided(EventBase):
    type: Literal["route.decided"] = "route.decided"
    step_id: Token
    role: Token
    attempt: int = Field(default=1, description="The step attempt this decision routes (joins its outcome).")
    decision: RouteDecision


class BackendCall(EventBase):
    type: Literal["backend.call"] = "backend.call"
    step_id: Token | None = None
    tier: str
    model: str
    endpoint: str = ""
    usage: Usage = Field(default_factory=Usage)
    latency_ms: float = 0.0
    outcome: str = Field(default="ok", description="ok, or the error class name")
    attempt: int = 1
    thinking: bool = False
    simulated: bool = Field(default=False, description="Answered by a simulator (tier config or sim-server answer).")


class ToolCall(EventBase):
    type: Literal["tool.call"] = "tool.call"
    step_id: Token | None = None
    role: Token | None = None
    tool: str
    arguments: FreeForm = Field(default_factory=dict, description="Arguments, large values truncated.")
    ok: bool = True
    refused: bool = False
    error: str | None = None
    duration_ms: float = 0.0
    sandbox: Literal["bwrap", "fallback"] | None = Field(
        default=None, description="shell.run: the sandbox the command ran in (docs/TOOLS.md); "
                                  "fallback is the weaker one. Since 1.1.")


class ArtifactCreated(EventBase):
    type: Literal["artifact.created"] = "artifact.created"
    artifact: Artifact


class NodeUp(EventBase):
    type: Literal["node.up"] = "node.up"
    role: Token
    host: str = ""
    pid: int = 0
    version: str = ""


class NodeDown(EventBase):
    type: Literal["node.down"] = "node.down"
    role: Token
    reason: str = "shutdown"


class ApprovalRequested(EventBase):
    """A gate waits for a person (docs/APPROVALS.md): ``approval`` says what, and until when."""

    type: Literal["approval.requested"] = "approval.requested"
    approval: Approval


class ApprovalDecided(EventBase):
    """A gate was decided: by a person's command (``command_id``), or by its timeout policy (``timed_out``)."""

    type: Literal["approval.decided"] = "approval.decided"
    gate: Gate
    request: int = Field(ge=1, description="which request of the gate (Approval.request)")
    decision: Decision
    by: str
    note: str = ""
    decided_at: datetime = Field(default_factory=utcnow)
    timed_out: bool = False
    command_id: Token | None = None


class ApprovalRefused(EventBase):
    """A decision the planner did not apply: its gate is not pending (already decided, never requested,
    or the goal has ended). The goal is unchanged; the deciding client waits for this or ``approval.decided``."""

    type: Literal["approval.refused"] = "approval.refused"
    gate: str = Field(max_length=200)
    decision: Decision
    by: str
    reason: str
    command_id: Token


Event = Annotated[
    GoalSubmitted
    | GoalPlanned
    | GoalCompleted
    | GoalFailed
    | GoalCancelled
    | StepDispatched
    | StepStarted
    | StepProgress
    | StepCompleted
    | StepFailed
    | RouteDecided
    | BackendCall
    | ToolCall
    | ArtifactCreated
    | NodeUp
    | NodeDown
    | ApprovalRequested
    | ApprovalDecided
    | ApprovalRefused,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event, config=ConfigDict(defer_build=True))
EVENT_TYPES: tuple[str, ...] = tuple(
    m.model_fields["type"].default
    for m in (GoalSubmitted, GoalPlanned, GoalCompleted, GoalFailed, GoalCancelled, StepDispatched, StepStarted,
              StepProgress, StepCompleted, StepFailed, RouteDecided, BackendCall, ToolCall, ArtifactCreated,
              NodeUp, NodeDown, ApprovalRequested, ApprovalDecided, ApprovalRefused)
)
# Node events are not about a goal; they use this goal id so every event has a subject.
SYSTEM_GOAL_ID = "_system"


def event_subject(prefix: str, goal_id: str, role: str, type: str) -> str:
    """The subject an event travels on: ``<prefix>.event.<goal_id>.<role>.<type>``, ``role`` being the
    emitting node's role. ``type`` is dotted (``step.completed``), so filters like
    ``mesh.event.*.*.step.>`` work, and a role may be granted exactly ``mesh.event.*.<role>.>``."""
    return f"{prefix}.event.{goal_id}.{role}.{type}"


# Who emits what (an event's subject names its emitter's role): a worker reports on its own step
# (STEP_REPORTS, under the step's role) and what it did for it (WORKER_EVENTS); every node announces
# itself (NODE_EVENTS); every other type — goal.*, step.dispatched, approval.*, whatever comes next —
# is the planner's alone.
STEP_REPORTS: frozenset[str] = frozenset({"step.started", "step.progress", "step.completed", "step.failed"})
NODE_EVENTS: frozenset[str] = frozenset({"node.up", "node.down"})
WORKER_EVENTS: frozenset[str] = STEP_REPORTS | NODE_EVENTS | {"tool.call", "artifact.created", "route.decided",
                                                              "backend.call"}


def likely_emitter(event: EventBase, planner: str = "planner") -> str:
    """The role that emits such an event in a mesh whose planner role is ``planner``: the role an event
    names (a worker's step events, tool calls and routes, a node's up/down), except the planner's
    dispatches; otherwise the planner. Only for synthetic histories (benches, tests, the router's sim
    ledgers): a live event's role is the one of the bus that emits it (``Bus.emit``)."""
    role = getattr(event, "role", None)
    return role if isinstance(role, str) and event.type != "step.dispatched" else planner  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class EventAddress:
    """What an event subject says: its goal, the emitting role (``None`` on a schema-1 subject,
    ``<prefix>.event.<goal_id>.<type>``, which named no role) and the event type."""

    goal_id: str
    role: str | None
    type: str


def parse_event_subject(prefix: str, subject: str) -> EventAddress | None:
    """The address of an event subject of either schema major; ``None`` when it is not one. Every event
    type has two tokens (``step.completed``), so the token count tells a schema-1 subject from a schema-2."""
    head = f"{prefix}.event."
    if not subject.startswith(head):
        return None
    tokens = subject[len(head):].split(".")
    if len(tokens) == 3:
        return EventAddress(tokens[0], None, f"{tokens[1]}.{tokens[2]}")
    if len(tokens) == 4:
        return EventAddress(tokens[0], tokens[1], f"{tokens[2]}.{tokens[3]}")
    return None
