"""What every front door (Mesh API, OpenAI, A2A, MCP) does with goals, over ``MeshClient`` only.

Idempotency needs no store of its own: a request with an ``Idempotency-Key`` gets a goal id derived from
(submitter, key). Inside JetStream's duplicate window the goals stream drops a second publish of that id;
after it the goal's state in KV ``mesh_goals`` answers "already submitted" — for as long as the mesh keeps
the goal, which is longer than any 24 h a client may count on. So the gateway needs no write access to
any bucket.
"""

from __future__ import annotations

import getpass
import hashlib
import io
import re
import tarfile
import tempfile
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.contracts import (
    ApprovalDecided,
    ApprovalRequested,
    Decision,
    Event,
    Goal,
    GoalCancelled,
    GoalCompleted,
    GoalFailed,
    GoalPlanned,
    PendingApproval,
    StepCompleted,
    StepFailed,
    StepProgress,
    StepStarted,
)
from mesh.contracts.http import GoalRequest, GoalSummary
from mesh.contracts.options import validate_options
from mesh.errors import ApprovalNotPending, GoalTooLarge, OptionInvalid, RequestRefused
from mesh.gateway.auth import LOCAL, Principal

if TYPE_CHECKING:
    from mesh.client import GoalResults, MeshClient
    from mesh.roles.goalstate import GoalState

TERMINAL = (GoalCompleted, GoalFailed, GoalCancelled)
DECISION_WAIT_SECONDS = 10.0  # how long a decision request waits for the planner to apply it
_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII, as HTTP header values are in practice


def idempotent_goal_id(submitter: str, key: str) -> str:
    if not _KEY.match(key):
        raise RequestRefused("Idempotency-Key must be 1-255 visible ASCII characters", param="Idempotency-Key")
    return hashlib.sha256(f"{submitter}\0{key}".encode()).hexdigest()[:32]


class Desk:
    """The gateway's one view of the mesh."""

    def __init__(self, client: MeshClient) -> None:
        self.client = client

    async def submit(self, who: Principal, request: GoalRequest, *, idempotency_key: str | None = None,
                     workspace: Path | None = None) -> tuple[str, bool]:
        """Submit a goal for ``who``; (goal id, replayed). Budget caps are checked before anything is sent."""
        try:
            options = validate_options(request.options)
        except OptionInvalid as exc:
            raise RequestRefused(str(exc), param="options") from exc
        goal = Goal(brief=request.brief, constraints=request.constraints, budget=who.budget(request.budget),
                    options=options, submitter=who.name)
        if idempotency_key is not None:
            goal.goal_id = idempotent_goal_id(who.name, idempotency_key)
            if await self.client.goal(goal.goal_id) is not None:
                return goal.goal_id, True
        try:
            return await self.client.submit(goal, workspace=workspace), False
        except GoalTooLarge as exc:
            raise RequestRefused(str(exc), status=413, type="request_too_large", code="goal_too_large") from exc

    async def state(self, goal_id: str) -> GoalState:
        state = await self.client.goal(goal_id)
        if state is None:
            raise RequestRefused(f"no goal {goal_id!r}", status=404, type="not_found_error", code="unknown_goal")
        return state

    async def summaries(self) -> list[GoalSummary]:
        states = sorted(await self.client.goals(), key=lambda s: s.started_at, reverse=True)
        return [summary(s) for s in states]

    async def events(self, goal_id: str, after: int = 0) -> AsyncGenerator[tuple[int, Event]]:
        """The goal's events after stream sequence ``after``, in order, ending with its final event."""
        async with aclosing(self.client.watch(goal_id, from_seq=after + 1, until_final=True)) as feed:
            async for seq, event in feed:
                yield seq, event

    async def all_events(self, after: int | None = None) -> AsyncGenerator[tuple[int, Event]]:
        """Every goal's events after stream sequence ``after`` (``None``: from now on), without end."""
        async with aclosing(self.client.watch(None, from_seq=None if after is None else after + 1)) as feed:
            async for seq, event in feed:
                yield seq, event

    async def check_position(self, after: int) -> None:
        """A resume position the event stream no longer keeps (``MESH_EVENTS_MAX_AGE``) is a 410 naming the
        earliest one it has: resuming from there would silently skip what was dropped."""
        if after <= 0:
            return
        earliest, _ = await self.client.event_positions()
        if after + 1 < earliest:
            raise RequestRefused(f"events after sequence {after} are no longer kept (the stream starts at "
                                 f"{earliest}); the goal's state is at its status URL", status=410,
                                 type="position_expired", code="position_expired", earliest_seq=earliest)

    async def cancel(self, who: Principal, goal_id: str, reason: str) -> bool:
        """False when the goal had ended already."""
        await self.state(goal_id)
        return await self.client.cancel(goal_id, by=who.name, reason=reason)

    async def approvals(self, goal_id: str | None = None) -> list[PendingApproval]:
        return await self.client.approvals(goal_id)

    async def decide(self, who: Principal, goal_id: str, gate: str | None, decision: Decision,
                     note: str) -> tuple[str, ApprovalDecided | None]:
        """Send ``who``'s decision and wait a little for the planner to apply it: (the decider's name, the
        ``approval.decided`` event or None if it was not applied yet). 409 when the gate is not pending."""
        await self.state(goal_id)
        by = decider(who)
        try:
            return by, await self.client.decide(goal_id, gate, decision, by=by, note=note, wait=DECISION_WAIT_SECONDS)
        except ApprovalNotPending as exc:
            raise RequestRefused(str(exc), status=409, code="gate_not_pending", param="gate") from exc

    async def results(self, goal_id: str) -> GoalResults:
        await self.state(goal_id)
        return await self.client.results(goal_id)

    async def synthesis(self, goal_id: str) -> str:
        return (await self.results(goal_id)).synthesis or ""


def summary(s: GoalState) -> GoalSummary:
    return GoalSummary(goal_id=s.goal.goal_id, status=s.status, brief=s.goal.brief, submitter=s.goal.submitter,
                       steps=len(s.steps), steps_completed=sum(st.status == "completed" for st in s.steps.values()),
                       total_tokens=s.usage.total_tokens, cost_usd=s.usage.cost_usd, started_at=s.started_at,
                       finished_at=s.finished_at)


def decider(who: Principal) -> str:
    """Who decides, for the record: the gateway token's name, or on a loopback gateway without tokens the
    local user it runs as."""
    if who is not LOCAL:
        return who.name
    try:
        return f"{getpass.getuser()} (local gateway)"
    except (OSError, KeyError):  # no login name in this environment
        return "local gateway"


def event_json(event: Event) -> dict[str, Any]:
    return event.model_dump(mode="json", exclude_none=True)


def unpack_workspace(data: bytes, into: Path) -> Path:
    """A client's tar.gz as a folder: regular files and folders only, every path inside ``into``."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar.getmembers():
                if not (member.isfile() or member.isdir()):
                    raise RequestRefused(f"workspace entry {member.name!r} is not a regular file or folder",
                                         param="workspace")
            tar.extractall(into, filter="data")  # the data filter refuses absolute paths and ../ escapes
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise RequestRefused(f"workspace is not a readable tar.gz: {exc}", param="workspace") from exc
    return into


def pack_folder(files: dict[str, bytes]) -> bytes:
    """``{path: bytes}`` as a tar.gz (the goal's final workspace, for download)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for path, data in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="mesh-gateway-")


def describe(event: Event) -> str | None:
    """One line of progress for people (chat clients, A2A status messages); None for bookkeeping events."""
    match event:
        case GoalPlanned():
            return f"plan v{event.plan.version}: " + ", ".join(f"{s.step_id} ({s.role})" for s in event.plan.steps)
        case StepStarted():
            return f"{event.step_id} ({event.role}) started"
        case StepProgress():
            return f"{event.step_id} ({event.role}): {event.message}"
        case StepCompleted():
            verdict = f", verdict {event.verdict}" if event.verdict else ""
            return f"{event.step_id} ({event.role}) completed{verdict}"
        case StepFailed():
            return f"{event.step_id} ({event.role}) failed: {event.error[:200]}"
        case GoalCompleted():
            return f"goal completed: {event.steps_run} steps, {event.usage.total_tokens} tokens"
        case GoalFailed():
            return f"goal failed: {event.reason}"
        case GoalCancelled():
            return f"goal cancelled: {event.reason}"
        case ApprovalRequested():
            return waiting_text(event.approval.gate, event.approval.summary)
        case ApprovalDecided():
            verb = "approved" if event.decision == "approve" else "rejected"
            return f"gate {event.gate} {verb} by {event.by}" + (f": {event.note}" if event.note else "")
    return None


def waiting_text(gate: str, summary: str) -> str:
    """What a waiting gate tells a person (A2A's input-required message, chat progress)."""
    return (f"waiting for approval at gate {gate}: {summary}\nAnswer with 'approve' or 'reject: <note>' "
            f"(A2A: a message on this task with a data part {{\"decision\": \"approve\" | \"reject\", \"gate\": "
            f"\"{gate}\", \"note\": \"…\"}}).")
