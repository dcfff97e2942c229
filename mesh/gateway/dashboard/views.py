"""What the dashboard's pages show, computed from a goal's state and its events — plain data for the
templates, no I/O (the handlers in ``pages.py`` read the mesh).
"""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import get_args

from mesh.contracts import (
    ArtifactRef,
    BackendCall,
    Event,
    RouteDecided,
    StepCompleted,
    StepFailed,
    StepStarted,
    ToolCall,
    Usage,
)
from mesh.contracts.models import RouteDecision, utcnow
from mesh.roles.goalstate import GoalState, GoalStatus, StepState
from mesh.router.features import FEATURE_NAMES, FEATURE_VERSION
from mesh.tools.manifest import MANIFEST_MEDIA_TYPE

STATUSES: tuple[str, ...] = get_args(GoalStatus)
TOP_FEATURES = 6
DIFF_LINES = 4000


def money(usage_cost: float, simulated: bool) -> str:
    """A cost as the CLI prints it: ``sim$`` when simulated calls made it, never passed off as real."""
    return f"{'sim$' if simulated else '$'}{usage_cost:.4f}"


def duration(start: datetime | None, end: datetime | None, now: datetime | None = None) -> str:
    if start is None:
        return ""
    seconds = ((end or now or utcnow()) - start).total_seconds()
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def tier_mix(state: GoalState) -> str:
    """Steps per tier that ran them, e.g. ``long_context 5 · edge 2``."""
    counts = Counter(st.tier for st in state.steps.values() if st.tier)
    return " · ".join(f"{tier} {n}" for tier, n in counts.most_common())


@dataclass(frozen=True, slots=True)
class GoalRow:
    goal_id: str
    brief: str
    status: str
    age: str
    steps_done: int
    steps: int
    tokens: int
    cost: str
    simulated: bool
    tiers: str
    submitter: str


def goal_row(state: GoalState) -> GoalRow:
    return GoalRow(goal_id=state.goal.goal_id, brief=state.goal.brief, status=state.status,
                   age=duration(state.started_at, state.finished_at), tokens=state.usage.total_tokens,
                   steps_done=sum(st.status == "completed" for st in state.steps.values()), steps=len(state.steps),
                   cost=money(state.usage.cost_usd, state.simulated), simulated=state.simulated,
                   tiers=tier_mix(state), submitter=state.goal.submitter or "")


def goal_rows(states: list[GoalState], status: str | None) -> list[GoalRow]:
    """Newest first, only ``status`` when given."""
    chosen = [s for s in states if status in (None, "", s.status)]
    return [goal_row(s) for s in sorted(chosen, key=lambda s: s.started_at, reverse=True)]


@dataclass(frozen=True, slots=True)
class StepRow:
    step_id: str
    role: str
    status: str
    tier: str
    attempts: int
    failures: int
    duration: str
    tokens: int
    cost: str
    verdict: str
    revision_of: str
    depends_on: list[str]


def step_rows(state: GoalState) -> list[StepRow]:
    return [StepRow(step_id=sid, role=st.step.role, status=st.status, tier=st.tier or "", attempts=st.attempt,
                    failures=st.failures, duration=duration(st.dispatched_at, st.finished_at) if st.attempt else "",
                    tokens=st.usage.total_tokens, cost=money(st.usage.cost_usd, st.simulated) if st.attempt else "",
                    verdict=st.verdict or _tests(st), revision_of=st.step.revision_of or "",
                    depends_on=st.step.depends_on) for sid, st in state.steps.items()]


def _tests(st: StepState) -> str:
    if st.quality is None or st.quality.source != "tests":
        return ""
    return "tests passed" if st.quality.grade == 1.0 else f"tests failed (exit {st.quality.exit_code})"


@dataclass(frozen=True, slots=True)
class LoopRow:
    """One judgement of the review / test loop: who judged what, the verdict, the revision it caused."""

    judge: str
    role: str
    verdict: str
    judged: list[str]
    revisions: list[str]


def review_loop(state: GoalState) -> list[LoopRow]:
    revised_by: dict[str, list[str]] = {}
    for sid, st in state.steps.items():
        if st.step.revision_of:
            revised_by.setdefault(st.step.revision_of, []).append(sid)
    rows = []
    for sid, st in state.steps.items():
        verdict = st.verdict or _tests(st)
        if not verdict:
            continue
        judged = list(st.quality.judged) if st.quality else []
        revisions = [r for j in judged for r in revised_by.get(j, [])]
        rows.append(LoopRow(judge=sid, role=st.step.role, verdict=verdict, judged=judged, revisions=revisions))
    return rows


@dataclass(frozen=True, slots=True)
class OutputRow:
    step_id: str
    ref: ArtifactRef
    workspace: bool


def outputs(state: GoalState) -> list[OutputRow]:
    """Every step output, in completion order; workspace manifests are the workspace's revisions."""
    done = sorted((st for st in state.steps.values() if st.outputs),
                  key=lambda st: st.finished_at or state.started_at)
    return [OutputRow(st.step.step_id, ref, ref.media_type == MANIFEST_MEDIA_TYPE) for st in done
            for ref in st.outputs]


def workspace_revisions(state: GoalState) -> list[tuple[str, ArtifactRef]]:
    """(label, manifest) of each workspace revision: the goal's initial workspace, then each step's."""
    revs: list[tuple[str, ArtifactRef]] = []
    if state.goal.workspace is not None:
        revs.append(("initial", state.goal.workspace))
    seen = {r.digest for _, r in revs}
    for row in outputs(state):
        if row.workspace and row.ref.digest not in seen:
            seen.add(row.ref.digest)
            revs.append((row.step_id, row.ref))
    return revs


def owned_ref(state: GoalState, digest: str) -> ArtifactRef | None:
    """The goal's artifact with this digest (a step output, the synthesis, a workspace), else None: the
    dashboard shows a goal's own artifacts only, never an arbitrary blob by digest."""
    refs = [r for st in state.steps.values() for r in st.outputs]
    refs += [r for r in (state.result, state.workspace, state.goal.workspace) if r is not None]
    return next((r for r in refs if r.digest == digest), None)


# --- one step, from the goal's events ---------------------------------------------------------------


@dataclass(slots=True)
class Attempt:
    number: int
    node: str = ""
    started: datetime | None = None
    ended: datetime | None = None
    route: RouteDecision | None = None
    calls: list[BackendCall] = field(default_factory=list)
    tools: list[ToolCall] = field(default_factory=list)
    outcome: str = "running"
    error: str = ""
    usage: Usage = field(default_factory=Usage)
    simulated: bool = False

    @property
    def took(self) -> str:
        return duration(self.started, self.ended)

    @property
    def cost(self) -> str:
        return money(self.usage.cost_usd, self.simulated)

    def top_features(self) -> list[tuple[str, float]]:
        return top_features(self.route) if self.route else []


def attempts(step_id: str, events: list[tuple[int, Event]]) -> list[Attempt]:
    """The step's attempts as its events tell them: node, routing decision, model and tool calls, outcome."""
    by: dict[int, Attempt] = {}

    def of(n: int) -> Attempt:
        return by.setdefault(n, Attempt(n))

    for _, event in events:
        if getattr(event, "step_id", None) != step_id:
            continue
        match event:
            case StepStarted():
                a = of(event.attempt)
                a.node, a.started = event.node or "", event.at
            case RouteDecided():
                of(event.attempt).route = event.decision
            case BackendCall():
                a = of(event.attempt if event.attempt in by else max(by, default=1))
                a.calls.append(event)
                a.simulated |= event.simulated
            case ToolCall():
                of(max(by, default=1)).tools.append(event)
            case StepCompleted():
                a = of(event.attempt)
                a.outcome, a.ended, a.usage = "completed", event.at, event.usage
                a.simulated |= event.simulated
            case StepFailed():
                a = of(event.attempt)
                a.outcome, a.ended, a.error, a.usage = "failed", event.at, event.error, event.usage
    return [by[n] for n in sorted(by)]


def top_features(decision: RouteDecision) -> list[tuple[str, float]]:
    """The router input's largest named values (text-hash buckets left out: they name no property), when the
    decision's feature spec is the one this gateway knows."""
    if decision.feature_version != FEATURE_VERSION or len(decision.features) != len(FEATURE_NAMES):
        return []
    named = [(n, v) for n, v in zip(FEATURE_NAMES, decision.features, strict=True)
             if not n.startswith("text_") and v != 0.0]
    return sorted(named, key=lambda item: abs(item[1]), reverse=True)[:TOP_FEATURES]


# --- the workspace file browser ---------------------------------------------------------------------


def is_text(data: bytes) -> bool:
    if b"\0" in data[:8192]:
        return False
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def diff(old: dict[str, bytes], new: dict[str, bytes], path: str | None = None) -> str:
    """A unified diff between two workspace revisions (all files, or one path); binary files by a line."""
    paths = [path] if path else sorted(set(old) | set(new))
    out: list[str] = []
    for p in paths:
        a, b = old.get(p), new.get(p)
        if a == b:
            continue
        if (a is not None and not is_text(a)) or (b is not None and not is_text(b)):
            out.append(f"Binary file {p} differs\n")
            continue
        out += difflib.unified_diff((a or b"").decode().splitlines(keepends=True),
                                    (b or b"").decode().splitlines(keepends=True),
                                    fromfile=f"a/{p}" if a is not None else "/dev/null",
                                    tofile=f"b/{p}" if b is not None else "/dev/null")
        if len(out) > DIFF_LINES:
            out = out[:DIFF_LINES] + ["… (diff cut)\n"]
            break
    return "".join(line if line.endswith("\n") else line + "\n" for line in out)
