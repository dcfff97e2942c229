"""Approval gates (docs/APPROVALS.md): which gates a goal and its steps have, their deadlines and the
text of what waits. Pure helpers of the orchestrator; the gate records live in ``GoalState.approvals``
and change only inside its compare-and-swap transitions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from mesh.contracts import GateKind, Goal, Plan, TimeoutPolicy
from mesh.roles.spec import RoleSpec

PLAN_GATE = "plan"
FINAL_GATE = "final"


@dataclass(frozen=True, slots=True)
class GatePolicy:
    """The deployment's default deadline and timeout policy (``MESH_APPROVAL_TIMEOUT`` /
    ``MESH_APPROVAL_ON_TIMEOUT``); a goal may set its own with options ``approve_timeout`` /
    ``approve_on_timeout``."""

    timeout: float = 24 * 3600
    on_timeout: TimeoutPolicy = "fail"

    def for_goal(self, goal: Goal) -> tuple[float, TimeoutPolicy]:
        timeout = goal.options.get("approve_timeout", self.timeout)
        policy = goal.options.get("approve_on_timeout", self.on_timeout)
        return float(timeout), cast(TimeoutPolicy, policy)


def goal_gates(goal: Goal) -> frozenset[str]:
    """The goal's own gates from option ``approve`` ("plan", "final", "plan,final")."""
    value = goal.options.get("approve", "")
    return frozenset(g.strip() for g in value.split(",") if g.strip()) if isinstance(value, str) else frozenset()


def step_gate(step_id: str, kind: GateKind) -> str:
    return f"{step_id}.{kind}"


def gated_roles(roles: dict[str, RoleSpec], kind: GateKind) -> frozenset[str]:
    """Roles whose spec says ``approve = kind``."""
    return frozenset(r for r, s in roles.items() if s.approve == kind)


def plan_summary(plan: Plan) -> str:
    lines = [f"plan v{plan.version}: {len(plan.steps)} steps"]
    lines += [f"- {s.step_id} ({s.role}) after {', '.join(s.depends_on) or '-'}: {s.instruction[:120]}"
              for s in plan.steps]
    return "\n".join(lines)
