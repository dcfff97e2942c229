"""Goal options: the registry of every ``Goal.options`` key — its type, bounds, meaning and the
component that reads it — and the one validator the doors (``mesh run -o``, ``mesh submit -o``) and
the planner use, so a misspelt or out-of-range option is refused with a clear error instead of
being silently ignored or clamped.

``Goal.options`` itself stays a free dict on the wire (a newer minor version may add options an
older reader does not know); validation happens where a goal enters the mesh. To add an option,
add one ``GoalOption`` to ``OPTIONS`` (and say in ``reader`` who acts on it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from mesh.errors import OptionInvalid

OptionType = Literal["int", "float", "bool", "str"]


@dataclass(frozen=True, slots=True)
class GoalOption:
    name: str
    type: OptionType
    doc: str
    reader: str  # the component that acts on it, e.g. "sim backend", "planner"
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    several: bool = False  # a comma-separated set of ``choices`` ("plan,final")

    def check(self, value: Any) -> Any:
        """``value`` as this option's type; ``OptionInvalid`` naming the option and what it takes."""
        ok = {"int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, int | float) and not isinstance(value, bool),
              "bool": isinstance(value, bool), "str": isinstance(value, str)}[self.type]
        if not ok:
            raise OptionInvalid(f"goal option {self.name!r} takes {self.describe()}; got {value!r}")
        if self.several and isinstance(value, str):
            picked = [v.strip() for v in value.split(",") if v.strip()]
            if not picked or any(v not in self.choices for v in picked):
                raise OptionInvalid(f"goal option {self.name!r} takes {self.describe()}; got {value!r}")
            return ",".join(dict.fromkeys(picked))
        if self.choices and value not in self.choices:
            raise OptionInvalid(f"goal option {self.name!r} takes {self.describe()}; got {value!r}")
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise OptionInvalid(f"goal option {self.name!r} takes {self.describe()}; got {value!r}")
        return float(value) if self.type == "float" else value

    def describe(self) -> str:
        if self.several:
            return "a comma-separated set of " + ", ".join(self.choices)
        if self.choices:
            return "one of " + ", ".join(self.choices)
        kind = "an int" if self.type == "int" else f"a {self.type}"
        low, high = self.minimum, self.maximum
        if low is not None and high is not None:
            return f"{kind} from {_num(low)} to {_num(high)}"
        if low is not None or high is not None:
            return f"{kind} {'≥ ' + _num(low) if low is not None else '≤ ' + _num(high)}"  # type: ignore[arg-type]
        return kind


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


OPTIONS: dict[str, GoalOption] = {o.name: o for o in (
    GoalOption("swarm", "bool", "false: no swarm fan-out (a step routed to the swarm tier is one call)", "worker"),
    GoalOption("max_revisions", "int", "at most this many revisions after reviews and after failing tests (each "
               "below the planner spec's own limits)", "planner", minimum=0, maximum=10),
    GoalOption("sim_plan_steps", "int", "how many steps the simulated planner plans (the plan limit is 200)",
               "sim backend", minimum=8, maximum=200),
    GoalOption("sim_quality", "float", "forced success probability of every simulated answer", "sim backend",
               minimum=0, maximum=1),
    GoalOption("sim_review", "str", "the simulated reviewer's policy", "sim backend",
               choices=("first_changes", "approve", "changes")),
    GoalOption("sim_tests", "str", "fail_first: the simulated coder's first version fails its tests; fail_always: "
               "every version does", "sim backend", choices=("fail_first", "fail_always")),
    GoalOption("approve", "str", "approval gates of the goal: plan (the plan waits for a person before any step "
               "runs), final (the result waits before the goal completes); docs/APPROVALS.md", "planner",
               choices=("plan", "final"), several=True),
    GoalOption("approve_timeout", "float", "seconds a gate of this goal waits for a decision (default: "
               "MESH_APPROVAL_TIMEOUT)", "planner", minimum=1, maximum=30 * 86400),
    GoalOption("approve_on_timeout", "str", "what a gate of this goal does when its deadline passes (default: "
               "MESH_APPROVAL_ON_TIMEOUT)", "planner", choices=("fail", "approve", "reject")),
    GoalOption("accept_failing_tests", "bool", "complete the goal even though its last test run failed (its quality "
               "record says tests: failed); by default such a goal fails", "planner"),
)}


def validate_options(options: Mapping[str, Any], registry: Mapping[str, GoalOption] = OPTIONS) -> dict[str, Any]:
    """Every option checked against the registry; the first problem raises ``OptionInvalid``."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        option = registry.get(name)
        if option is None:
            raise OptionInvalid(f"unknown goal option {name!r}; known options: {', '.join(sorted(registry))}")
        out[name] = option.check(value)
    return out


def parse_option(item: str, registry: Mapping[str, GoalOption] = OPTIONS) -> tuple[str, Any]:
    """``KEY=VALUE`` from the command line: the value read as the option's type (JSON for numbers and
    booleans, the raw text for strings), then checked."""
    name, sep, raw = item.partition("=")
    if not sep:
        raise OptionInvalid(f"option {item!r} is not KEY=VALUE")
    option = registry.get(name)
    if option is None:
        raise OptionInvalid(f"unknown goal option {name!r}; known options: {', '.join(sorted(registry))}")
    value: Any = raw
    if option.type != "str":
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise OptionInvalid(f"goal option {name!r} takes {option.describe()}; got {raw!r}") from exc
    return name, option.check(value)
