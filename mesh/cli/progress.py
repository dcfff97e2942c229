"""Render the event stream for people (one line per event worth seeing) or machines (--json)."""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from mesh.contracts import (
    EVENT_ADAPTER,
    ApprovalDecided,
    ApprovalRefused,
    ApprovalRequested,
    BackendCall,
    EventBase,
    GoalCancelled,
    GoalCompleted,
    GoalFailed,
    GoalPlanned,
    GoalSubmitted,
    RouteDecided,
    StepCompleted,
    StepDispatched,
    StepFailed,
    StepProgress,
    StepStarted,
    ToolCall,
    Usage,
)


class Progress:
    def __init__(self, out: TextIO = sys.stdout, *, as_json: bool = False, verbose: bool = False) -> None:
        self.out = out
        self.as_json = as_json
        self.verbose = verbose
        self.color = out.isatty() and not as_json
        self.started = time.monotonic()
        self.usage = Usage()
        self.simulated = False
        self.tiers: dict[tuple[str, int], str] = {}

    def _c(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def show(self, event: EventBase) -> None:
        if self.as_json:
            self.out.write(EVENT_ADAPTER.dump_json(event).decode() + "\n")  # type: ignore[arg-type]
            self.out.flush()
            return
        line = self._line(event)
        if line:
            elapsed = time.monotonic() - self.started
            self.out.write(f"{self._c('2', f'[{elapsed:7.1f}s]')} {line}\n")
            self.out.flush()

    def _line(self, e: EventBase) -> str | None:
        match e:
            case GoalSubmitted():
                return f"goal {e.goal_id} submitted: {e.goal.brief[:80]}"
            case GoalPlanned():
                ids = ", ".join(f"{s.step_id}({s.role})" for s in e.plan.steps)
                return self._c("1", f"plan v{e.plan.version}: {len(e.plan.steps)} steps") + f" — {ids}"
            case StepDispatched():
                return f"  → {e.step_id:<22} {e.role:<12} dispatched (attempt {e.attempt})" if self.verbose else None
            case RouteDecided():
                self.tiers[(e.step_id, 0)] = e.decision.tier
                think = " +thinking" if e.decision.thinking else ""
                why = f" [{e.decision.overridden_by}]" if e.decision.overridden_by else ""
                return f"  ↳ {e.step_id:<22} {e.role:<12} routed to {e.decision.tier}{think}{why}"
            case StepStarted():
                return f"  ▶ {e.step_id:<22} {e.role:<12} started" if self.verbose else None
            case StepProgress():
                return f"  … {e.step_id:<22} {e.role:<12} {e.message}"
            case ToolCall():
                status = "ok" if e.ok else ("REFUSED" if e.refused else "error")
                arg = e.arguments.get("path", "")
                return f"    🔧 {e.tool} {arg} {status}" if self.verbose or not e.ok else None
            case BackendCall():
                self.simulated = self.simulated or e.simulated
                if e.outcome == "ok":
                    self.usage = self.usage + e.usage
                    return None
                return self._c("33", f"    ! {e.tier} {e.model}: {e.outcome} (attempt {e.attempt})")
            case StepCompleted():
                verdict = f" verdict={e.verdict}" if e.verdict else ""
                self.simulated = self.simulated or e.simulated
                return self._c("32", f"  ✓ {e.step_id:<22} {e.role:<12}") + \
                    f" {e.tier or '-'}  {e.usage.total_tokens:,} tok  {cost(e.usage, e.simulated)}{verdict}  " \
                    f"(total {self.usage.total_tokens:,} tok {cost(self.usage, self.simulated)})"
            case StepFailed():
                return self._c("31", f"  ✗ {e.step_id:<22} {e.role:<12} failed: {e.error[:160]}")
            case GoalCompleted():
                tests = f", tests {e.quality.tests}" if e.quality.tests != "not_run" else ""
                return self._c("1;32", f"goal completed: {e.steps_run} steps, {e.usage.total_tokens:,} tokens, "
                                       f"{cost(e.usage, e.simulated)}{tests}") + (SIM_NOTE if e.simulated else "")
            case GoalFailed():
                return self._c("1;31", f"goal failed: {e.reason}") + (SIM_NOTE if e.simulated else "")
            case GoalCancelled():
                return self._c("1;33", f"goal cancelled: {e.reason}")
            case ApprovalRequested():
                deadline = e.approval.deadline.isoformat(timespec="seconds") if e.approval.deadline else "-"
                return self._c("1;35", f"⏸ awaiting approval: gate {e.approval.gate}") + \
                    f" (until {deadline}, then {e.approval.on_timeout})"
            case ApprovalDecided():
                verb = "approved" if e.decision == "approve" else "rejected"
                how = " (deadline passed)" if e.timed_out else ""
                return self._c("35", f"  gate {e.gate} {verb} by {e.by}{how}") + (f": {e.note}" if e.note else "")
            case ApprovalRefused():
                return self._c("33", f"  {e.decision} of gate {e.gate} by {e.by} refused: {e.reason}")
        return None


SIM_NOTE = "  [SIMULATED: outputs came from the sim backend, not a real model]"


def cost(usage: Usage, simulated: bool) -> str:
    """A cost for people: dollars, or — when simulated calls are in it — marked as simulated, since no
    money was spent (the figure is the sim's price model)."""
    return f"sim${usage.cost_usd:.4f}" if simulated else f"${usage.cost_usd:.4f}"


def dump_json(obj: object) -> str:
    return json.dumps(obj, indent=2, default=str)
