"""Role specs: ``nodes/<role>.toml`` is data, validated here at start with clear errors.

A new worker role is a new TOML file and no Python: the worker runtime reads its subjects (derived
from the role name), tools, prompts, concurrency, tier preferences and limits from the spec. The jobs
the planner hands out are spec fields too, never role names: which role's work is revised when a
review or a failing test requests changes (``revises``), which role ends every plan with the goal's
result (``synthesizes``), which outputs are feedback (those of roles with ``verdicts`` or
``verdict_from_tests``); the orchestrator kind plans. Renaming a role is renaming its file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mesh.config import default_nodes_dir
from mesh.contracts.models import TIERS
from mesh.errors import NodeSpecError
from mesh.tools.catalog import TOOL_NAMES

RoleKind = Literal["orchestrator", "worker", "recorder"]
PLAN_KIND = "plan"  # what an orchestrator produces


def _known(kind: str, names: list[str], known: list[str]) -> list[str]:
    """``names`` when every one is in ``known``; else an error naming the unknown ones and the known."""
    if unknown := [n for n in names if n not in known]:
        raise ValueError(f"unknown {kind}(s) {unknown}; known {kind}s: {known}")
    return names


class _Strict(BaseModel):
    # Specs are written by people: a typo'd key must be an error, not silently ignored.
    model_config = ConfigDict(extra="forbid")


class Prompts(_Strict):
    system: str = Field(min_length=1, description="System prompt; the worker heads it with 'ROLE: <role>' and "
                                                  "'OUTPUT KIND: <kind>'.")
    output: str = Field(default="", description="What the output must look like (appended to the step).")


class RouterPrefs(_Strict):
    preferred: list[str] = Field(default_factory=lambda: ["long_context", "swarm", "edge"])
    thinking: Literal["auto", "on", "off"] = "auto"
    swarm_fan_out: int = Field(default=0, ge=0, le=32, description="Sub-calls when routed to the swarm tier.")

    @field_validator("preferred")
    @classmethod
    def _known_tiers(cls, v: list[str]) -> list[str]:
        return _known("tier", v, list(TIERS))


class Limits(_Strict):
    max_tool_rounds: int = Field(default=6, ge=0, le=64)
    max_output_tokens: int = Field(default=4096, ge=16, le=262_144)
    step_timeout_seconds: float = Field(default=900, gt=0)
    # orchestrator only
    max_plan_attempts: int = Field(default=3, ge=1, le=10)
    max_review_iterations: int = Field(default=2, ge=0, le=10)
    max_test_revisions: int = Field(default=2, ge=0, le=10, description="Revisions failing tests may ask for; "
                                    "a budget apart from the reviews' (max_review_iterations).")
    max_replans: int = Field(default=2, ge=0, le=10)
    max_plan_steps: int = Field(default=200, ge=1, le=2000)
    # recorder only
    batch_size: int = Field(default=2000, ge=1, le=100_000)


class RoleSpec(_Strict):
    role: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    kind: RoleKind
    description: str = ""
    concurrency: int = Field(default=1, ge=1, le=256)
    tools: list[str] = Field(default_factory=list)
    shell_allow: list[str] = Field(default_factory=list, description="Commands shell.run may start.")
    shell_network: bool = Field(default=False, description="shell.run commands may use the network (off: the "
                                                           "sandbox has no network at all).")
    output_kind: str = Field(default="note", pattern=r"^[a-z][a-z0-9_]{0,31}$",
                             description="Artifact kind of the step's main output (an orchestrator's: plan).")
    verdicts: bool = Field(default=False, description="Output is a review verdict (approve / changes requested).")
    verdict_from_tests: bool = Field(
        default=False, description="The step's verdict is the exit status of the last command it ran with "
                                   "shell.run: a failing test run requests changes, like a review does.")
    revises: bool = Field(
        default=False, description="When a review or a failing test run requests changes to a step of this "
                                   "role, a revision step of this role addresses them (and is checked again).")
    synthesizes: bool = Field(
        default=False, description="Every plan ends in a step of this role that depends on all the others; "
                                   "its output is the goal's result.")
    approve: Literal["before", "after"] | None = Field(
        default=None, description="A person approves every step of this role: before it is dispatched, or "
                                  "after it ran, before its outcome counts (docs/APPROVALS.md).")
    prompts: Prompts | None = None
    router: RouterPrefs = Field(default_factory=RouterPrefs)
    limits: Limits = Field(default_factory=Limits)

    @field_validator("tools")
    @classmethod
    def _known_tools(cls, v: list[str]) -> list[str]:
        return _known("tool", v, sorted(TOOL_NAMES))

    @model_validator(mode="after")
    def _kind_needs(self) -> RoleSpec:
        if self.kind != "recorder" and self.prompts is None:
            raise ValueError(f"a {self.kind} role needs a [prompts] table with a system prompt")
        if (self.shell_allow or self.shell_network) and "shell.run" not in self.tools:
            raise ValueError("shell_allow or shell_network is set but shell.run is not in tools")
        if self.verdict_from_tests and ("shell.run" not in self.tools or self.verdicts):
            raise ValueError("verdict_from_tests needs shell.run in tools and excludes verdicts")
        if (self.revises or self.synthesizes) and self.kind != "worker":
            raise ValueError("revises and synthesizes are jobs of worker roles")
        if self.approve is not None and self.kind != "worker":
            raise ValueError("approve gates the steps of worker roles (a goal's plan gate is the goal option approve=plan)")
        if self.kind == "orchestrator" and "output_kind" not in self.model_fields_set:
            self.output_kind = PLAN_KIND
        return self

    @property
    def gives_feedback(self) -> bool:
        """Its output is a verdict on other work (a review, a test report) that a revision addresses."""
        return self.verdicts or self.verdict_from_tests


def load_spec(path: Path) -> RoleSpec:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise NodeSpecError(f"role spec {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise NodeSpecError(f"{path}: not valid TOML: {exc}") from exc
    try:
        spec = RoleSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise NodeSpecError(f"{path}: invalid role spec: {problems}") from exc
    if spec.role != path.stem:
        raise NodeSpecError(f"{path}: role {spec.role!r} must match the file name {path.stem!r}")
    return spec


def load_specs(directory: Path | None = None) -> dict[str, RoleSpec]:
    directory = directory or default_nodes_dir()
    specs = {p.stem: load_spec(p) for p in sorted(directory.glob("*.toml"))}
    if not specs:
        raise NodeSpecError(f"no role specs (*.toml) in {directory}")
    if len(synthesizers := [r for r, s in specs.items() if s.synthesizes]) > 1:
        raise NodeSpecError(f"{directory}: only one role may synthesize; {', '.join(synthesizers)} do")
    if len(planners := [r for r, s in specs.items() if s.kind == "orchestrator"]) > 1:
        raise NodeSpecError(f"{directory}: only one role may plan (kind orchestrator); {', '.join(planners)} do")
    return specs


def synthesizing_role(specs: dict[str, RoleSpec]) -> str:
    """The role that ends every plan (``synthesizes = true``); ``NodeSpecError`` when none does."""
    role = next((r for r, s in specs.items() if s.synthesizes), None)
    if role is None:
        raise NodeSpecError("no role spec has synthesizes = true: a planner needs a role to end every plan")
    return role


def revising_roles(specs: dict[str, RoleSpec]) -> frozenset[str]:
    """Roles whose work a review or a failing test sends back for a revision (``revises = true``)."""
    return frozenset(r for r, s in specs.items() if s.revises)


def feedback_kinds(specs: dict[str, RoleSpec]) -> frozenset[str]:
    """Output kinds that are feedback a revision addresses (reviews, test reports)."""
    return frozenset(s.output_kind for s in specs.values() if s.gives_feedback)


def worker_roles(specs: dict[str, RoleSpec]) -> frozenset[str]:
    return frozenset(r for r, s in specs.items() if s.kind == "worker")
