"""``MeshClient``: the one library door to a running mesh — for the CLI, the gateway, tests and scripts.

It submits goals (optionally with a local folder as the goal's starting workspace), follows a goal's
events from a stream sequence (resumable without gap or duplicate), reads goal state, results and
live nodes, lists the approval gates waiting for a person, and asks for a cancellation or a gate's
decision. It never writes goal state: a cancel or a decision is a ``GoalCommand`` on
``mesh.control.<goal>`` that the planner applies by compare-and-swap like every other transition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from mesh.bus.client import Bus, ConsumerState
from mesh.config import MeshSettings, get_settings
from mesh.contracts import (
    ApprovalDecided,
    ApprovalRefused,
    ArtifactRef,
    Decision,
    Event,
    Goal,
    GoalCancelled,
    GoalCommand,
    GoalCompleted,
    GoalFailed,
    PendingApproval,
)
from mesh.errors import ApprovalNotPending, GoalTooLarge, MeshError, UnknownGoal
from mesh.roles.goalstate import GoalState
from mesh.roles.goalstore import GoalStore
from mesh.tools.manifest import MANIFEST_MEDIA_TYPE
from mesh.tools.workspace import Workspace

if TYPE_CHECKING:
    from mesh.roles.ledger_service import LedgerClient

FINAL_EVENTS = (GoalCompleted, GoalFailed, GoalCancelled)
# the most of the server's max_payload a goal may take: the rest of its goal state is the plan and the steps
GOAL_SHARE_OF_MAX_PAYLOAD = 0.5
SIMULATED_NOTE = ("Some or all of this goal's model calls were answered by the simulated backend (mesh sim-server), "
                  "not a real model: the outputs and costs are simulated.\n")
# Folders an uploaded workspace leaves out: version control and caches, never the project itself.
SKIPPED_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache",
                          "node_modules", ".venv"})


class NodeInfo(BaseModel):
    """A live node, from its heartbeat in KV ``mesh_nodes`` (what else the beat says is kept, e.g. its time)."""

    model_config = ConfigDict(extra="allow")

    node: str
    role: str
    host: str = ""
    pid: int = 0
    version: str = ""
    in_flight: int = 0
    breakers: dict[str, str] = Field(default_factory=dict, description="tier → circuit state, in nodes that call "
                                     "models (closed, half_open, open)")


@dataclass(slots=True)
class GoalResults:
    """What a goal produced: the synthesis text, the final workspace's files and the steps' text outputs."""

    state: GoalState
    synthesis: str | None = None
    workspace: dict[str, bytes] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)  # file name → bytes of each text output

    def write(self, folder: Path) -> None:
        """``synthesis.md``, ``workspace/``, ``artifacts/`` and ``goal.json`` under ``folder`` (and ``SIMULATED``
        when simulated model calls made any of it)."""
        folder.mkdir(parents=True, exist_ok=True)
        if self.state.simulated:
            (folder / "SIMULATED").write_text(SIMULATED_NOTE)
        if self.synthesis is not None:
            (folder / "synthesis.md").write_text(self.synthesis)
        for path, data in self.workspace.items():
            target = folder / "workspace" / path  # manifest paths are canonical: relative, no '..'
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        if self.artifacts:
            (folder / "artifacts").mkdir(exist_ok=True)
        for name, data in self.artifacts.items():
            (folder / "artifacts" / name).write_bytes(data)
        (folder / "goal.json").write_text(self.state.model_dump_json(indent=2))


class MeshClient:
    """Talks to a mesh over a connected ``Bus`` (which the caller owns), or ``async with
    MeshClient.connect(settings)`` for one that owns its connection."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._goals = GoalStore(bus)

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, settings: MeshSettings | None = None, *, name: str = "mesh-client",
                      check: bool = True) -> AsyncIterator[MeshClient]:
        """``check``: that the mesh is provisioned (``Bus.connect``); a user that may not ask every stream's
        info, such as the generated observer, connects with ``check=False``."""
        async with await Bus.connect(settings or get_settings(), name=name, check=check) as bus:
            yield cls(bus)

    # --- goals ---------------------------------------------------------------------------------

    async def submit(self, goal: Goal, *, workspace: Path | None = None) -> str:
        """Publish ``goal`` (deduplicated by its id); with ``workspace``, that folder is uploaded first and
        the goal's steps start from it. Returns the goal id."""
        self._check_size(goal)
        if workspace is not None:
            goal = goal.model_copy(update={"workspace": await self.upload_workspace(workspace)})
        await self.bus.submit_goal(goal)
        return goal.goal_id

    def _check_size(self, goal: Goal) -> None:
        """The goal message itself travels by claim-check when large, but the planner keeps the goal inside the
        goal's state (KV ``mesh_goals``), one message with the plan and every step: a goal above a share of
        the server's ``max_payload`` could never be stored, and would be lost after submission."""
        size, limit = len(goal.model_dump_json()), int(self.bus.max_payload * GOAL_SHARE_OF_MAX_PAYLOAD)
        if size > limit:
            raise GoalTooLarge(
                f"the goal is {size:,} bytes as JSON; a goal may be at most {limit:,} (half the server's max_payload "
                f"of {self.bus.max_payload:,} bytes: its state holds it beside the plan and steps) — shorten the brief "
                "or constraints, or put long material in files of the goal's workspace")

    async def upload_workspace(self, folder: Path) -> ArtifactRef:
        """Store a local folder's files and their manifest; the manifest's reference."""
        if not folder.is_dir():
            raise MeshError(f"workspace {folder} is not a folder")
        ws = await Workspace.open(None, self.bus.get_blob)
        ws.apply({path: file.read_bytes() for path, file in _files(folder)})  # checks paths, sizes, counts
        return await ws.commit(self._store)

    async def _store(self, data: bytes, media_type: str, name: str) -> ArtifactRef:
        return await self.bus.put_blob(data, media_type=media_type, name=name)

    async def watch(self, goal_id: str | None, from_seq: int | None = 0, *,
                    until_final: bool = False) -> AsyncGenerator[tuple[int, Event]]:
        """(stream sequence, event) of one goal (``None``: every goal) with sequence ≥ ``from_seq``
        (0: from the start; ``None``: only new events). Resume after sequence ``n`` with ``from_seq=n + 1``.
        Runs until the caller stops — or, with ``until_final``, after the goal's final event."""
        start = None if from_seq is None else max(from_seq, 1)
        async with contextlib.aclosing(self.bus.events(goal_id, from_seq=start)) as events:
            async for seq, event in events:
                yield seq, event
                if until_final and goal_id is not None and isinstance(event, FINAL_EVENTS):
                    return

    async def history(self, goal_id: str) -> list[tuple[int, Event]]:
        """(stream sequence, event) of every event the goal has now, in order — a snapshot, not a watch."""
        return await self.bus.history(goal_id)

    async def blob(self, ref: ArtifactRef) -> bytes:
        """An artifact's bytes (a step output, a synthesis, a workspace manifest)."""
        return await self.bus.get_blob(ref.digest)

    async def workspace(self, ref: ArtifactRef) -> dict[str, bytes]:
        """The files of one workspace revision (a manifest reference), by canonical path."""
        ws = await Workspace.open(ref, self.bus.get_blob)
        return {path: await ws.read(path) for path in ws.paths}

    async def goal(self, goal_id: str) -> GoalState | None:
        return await self._goals.get(goal_id)

    async def goals(self) -> list[GoalState]:
        """Every goal the mesh holds state for, oldest first."""
        return sorted(await self._goals.all(), key=lambda s: s.started_at)

    async def cancel(self, goal_id: str, *, by: str, reason: str = "") -> bool:
        """Ask the planner to cancel the goal; False when it has ended already (nothing is sent).
        ``UnknownGoal`` when the mesh has no such goal. Workers stop before their next model or tool call."""
        state = await self.goal(goal_id)
        if state is None:
            raise UnknownGoal(f"no goal {goal_id!r}")
        if state.done:
            return False
        command = GoalCommand(goal_id=goal_id, action="cancel", by=by, reason=reason)
        await self.bus.publish(self.bus.topology.control_subject(goal_id), command, msg_id=command.command_id)
        return True

    # --- approvals (docs/APPROVALS.md) ----------------------------------------------------------

    async def approvals(self, goal_id: str | None = None) -> list[PendingApproval]:
        """The inbox: every pending gate of every running goal (or of one goal), oldest request first."""
        if goal_id is not None:
            state = await self.goal(goal_id)
            states = [state] if state is not None else []
        else:
            states = await self.goals()
        items = [PendingApproval(goal_id=s.goal.goal_id, brief=s.goal.brief, submitter=s.goal.submitter, approval=a)
                 for s in states if not s.done for a in s.pending_approvals()]
        return sorted(items, key=lambda p: p.approval.requested_at)

    async def approve(self, goal_id: str, gate: str | None = None, *, by: str, note: str = "",
                      wait: float = 30.0) -> ApprovalDecided | None:
        """Approve a pending gate (``None``: the goal's only pending one). See ``decide``."""
        return await self.decide(goal_id, gate, "approve", by=by, note=note, wait=wait)

    async def reject(self, goal_id: str, gate: str | None = None, *, by: str, note: str = "",
                     wait: float = 30.0) -> ApprovalDecided | None:
        """Reject a pending gate; ``note`` is the feedback (the next plan's prompt, a revision's review)."""
        return await self.decide(goal_id, gate, "reject", by=by, note=note, wait=wait)

    async def decide(self, goal_id: str, gate: str | None, decision: Decision, *, by: str, note: str = "",
                     wait: float = 30.0) -> ApprovalDecided | None:
        """Send the planner a decision on a gate, and wait up to ``wait`` seconds for its answer.

        Refused with ``ApprovalNotPending`` — and nothing sent — when the goal's state shows the gate is not
        pending; the planner checks again in its compare-and-swap, and a decision that lost a race (another
        decider, the deadline) comes back as an ``approval.refused`` event, raised here as the same error.
        Returns the ``approval.decided`` event, or None when no planner answered within ``wait`` (the
        command is durable: a planner applies it when it is back). ``wait=0`` sends without waiting."""
        state = await self.goal(goal_id)
        if state is None:
            raise UnknownGoal(f"no goal {goal_id!r}")
        if state.done:
            raise ApprovalNotPending(f"goal {goal_id} has ended ({state.status}); its gates are closed")
        pending = [a.gate for a in state.pending_approvals()]
        if gate is None:
            if len(pending) != 1:
                raise ApprovalNotPending(f"goal {goal_id} has {len(pending)} pending gates"
                                         + (f" ({', '.join(pending)}): name one" if pending else ""))
            gate = pending[0]
        if gate not in pending:
            known = state.approvals.get(gate)
            why = (f"gate {gate} was already {known.status} by {known.decided_by}" if known is not None else
                   f"goal {goal_id} has no gate {gate!r}")
            raise ApprovalNotPending(f"{why}; pending gates: {', '.join(pending) or 'none'}")
        command = GoalCommand(goal_id=goal_id, action=decision, by=by, gate=gate, note=note)
        _, last = await self.event_positions()
        await self.bus.publish(self.bus.topology.control_subject(goal_id), command, msg_id=command.command_id)
        if wait <= 0:
            return None
        try:
            async with asyncio.timeout(wait):
                async for _, event in self.watch(goal_id, last + 1):
                    if isinstance(event, ApprovalDecided) and event.command_id == command.command_id:
                        return event
                    if isinstance(event, ApprovalRefused) and event.command_id == command.command_id:
                        raise ApprovalNotPending(event.reason)
        except TimeoutError:
            return None
        return None  # not reached: a watch without until_final runs until the timeout

    async def results(self, goal_id: str) -> GoalResults:
        """The goal's synthesis, final workspace and text outputs, as far as it got."""
        state = await self.goal(goal_id)
        if state is None:
            raise UnknownGoal(f"no goal {goal_id!r}")
        results = GoalResults(state=state)
        if state.result is not None:
            results.synthesis = (await self.bus.get_blob(state.result.digest)).decode(errors="replace")
        ref = state.workspace or state.goal.workspace
        if ref is not None:
            results.workspace = await self.workspace(ref)
        for sid, st in state.steps.items():
            for ref in st.outputs:
                if ref.media_type.startswith("text/") and ref.media_type != MANIFEST_MEDIA_TYPE:
                    name = ref.name.replace("/", "__") or f"{sid}-{ref.digest[:16]}"
                    results.artifacts[f"{name}.md"] = await self.bus.get_blob(ref.digest)
        return results

    async def event_positions(self) -> tuple[int, int]:
        """(first, last) sequence the event stream holds now: the oldest a watch can resume from (older events
        are gone once ``MESH_EVENTS_MAX_AGE`` passes), and the newest event."""
        state = await self.bus.stream_state(self.bus.topology.events_stream)
        return state.first_seq, state.last_seq

    # --- the mesh ------------------------------------------------------------------------------

    async def nodes(self) -> list[NodeInfo]:
        """Live nodes (their heartbeats), by role then node id."""
        entries = await self.bus.kv_entries(self.bus.topology.kv_nodes)
        nodes = [NodeInfo.model_validate(_json(e.value)) for e in entries if e.value]
        return sorted(nodes, key=lambda n: (n.role, n.node))

    def ledger(self) -> LedgerClient:
        """Read-only queries on the ledger through its NATS service (docs/LEDGER.md)."""
        from mesh.roles.ledger_service import LedgerClient  # imports DuckDB: not at every client's start

        return LedgerClient(self.bus)

    async def dead_letters(self) -> dict[str, int]:
        """Messages in the dead-letter stream per role (``mesh.dlq.<role>``)."""
        topo = self.bus.topology
        counts = await self.bus.subject_counts(topo.dlq_stream, topo.dlq_subject(">"))
        prefix = topo.dlq_subject("")
        return {subject.removeprefix(prefix): n for subject, n in sorted(counts.items())}

    async def backlog(self) -> dict[str, ConsumerState]:
        """Every role consumer's backlog (goals and tasks), by consumer name."""
        topo = self.bus.topology
        states = [*await self.bus.consumers(topo.tasks_stream), *await self.bus.consumers(topo.goals_stream)]
        return {c.name: c for c in states}


def _files(folder: Path) -> Iterator[tuple[str, Path]]:
    """(canonical path, file) of every regular file under ``folder``, skipping ``SKIPPED_DIRS``."""
    for file in sorted(folder.rglob("*")):
        rel = file.relative_to(folder)
        if any(part in SKIPPED_DIRS for part in rel.parts[:-1]) or not file.is_file() or file.is_symlink():
            continue
        yield rel.as_posix(), file


def _json(value: bytes) -> Any:
    try:
        return json.loads(value)
    except ValueError as exc:
        raise MeshError(f"unreadable heartbeat in the nodes bucket: {exc}") from exc
