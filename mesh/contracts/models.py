"""Wire contracts: the messages Mesh processes exchange. Pure pydantic; imports nothing else of Mesh
except the error tree.

Every model tolerates unknown fields (``extra="ignore"``) so a reader keeps working when a newer
*minor* schema version adds fields; a new *major* version is refused by the codec instead.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from mesh.errors import PlanInvalid

# A step or role id is one NATS subject token, so it can appear in subjects and dedupe ids.
Token = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="sha256, lowercase hex")]

# Free-form JSON fields (goal options, step.progress detail, tool.call arguments) are the only places a
# message may nest at will; these bounds keep such a field, and so the heap it decodes into, small.
FREEFORM_MAX_DEPTH = 16
FREEFORM_MAX_BYTES = 64 * 1024  # summed string lengths, plus 8 per value, key and container
_SIZED, _NESTED = (str, bytes), (dict, list, tuple)


def bounded_freeform(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` unchanged, or ``ValueError`` if it nests deeper or holds more than the free-form bounds.
    A container's size is counted before its items are looked at, so refusing a big one is cheap."""
    size = 0
    stack: list[tuple[Any, int]] = [(value, 1)]  # containers still to look into, with their depth
    while stack:
        item, depth = stack.pop()
        if depth > FREEFORM_MAX_DEPTH:
            raise ValueError(f"free-form data nested deeper than {FREEFORM_MAX_DEPTH} levels")
        size += 8 * len(item)
        if size > FREEFORM_MAX_BYTES:
            break
        if isinstance(item, dict):
            for k in item:
                if isinstance(k, str):
                    size += len(k)
            item = item.values()
        for v in item:  # (tuples, not X | Y unions: isinstance is several times faster with them)
            if isinstance(v, _SIZED):
                size += len(v)
            elif isinstance(v, _NESTED):
                stack.append((v, depth + 1))
        if size > FREEFORM_MAX_BYTES:
            break
    if size > FREEFORM_MAX_BYTES:
        raise ValueError(f"free-form data larger than {FREEFORM_MAX_BYTES} bytes")
    return value


def fit_freeform(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` if it is within the free-form bounds, else a note of why it was left out: for producers that
    record data they do not control (a model's tool arguments, its errors), so their event stays valid."""
    try:
        return bounded_freeform(value)
    except ValueError as exc:
        return {"elided": f"not recorded: {exc}"}


FreeForm = Annotated[dict[str, Any], AfterValidator(bounded_freeform), Field(
    description=f"Free-form JSON: at most {FREEFORM_MAX_DEPTH} levels deep and about {FREEFORM_MAX_BYTES // 1024} "
                "KiB.")]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    """A compact unique id (uuid4 hex) usable as a subject token."""
    return uuid.uuid4().hex


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Wire(BaseModel):
    """Base of every contract model."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, validate_default=False, defer_build=True)


class Usage(Wire):
    """Tokens and money spent by one call, one step or one goal."""

    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    cached_tokens: int = Field(default=0, ge=0, description="Prompt tokens served from the provider's cache.")
    reasoning_tokens: int = Field(default=0, ge=0)
    cost_usd: float = Field(default=0.0, ge=0)
    calls: int = Field(default=0, ge=0)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            cost_usd=self.cost_usd + other.cost_usd,
            calls=self.calls + other.calls,
        )


class Budget(Wire):
    """Limits that stop a runaway goal. ``None`` means unlimited."""

    max_tokens: int | None = Field(default=2_000_000, ge=1)
    max_cost_usd: float | None = Field(default=10.0, ge=0)
    max_steps: int | None = Field(default=200, ge=1)
    max_wall_seconds: float | None = Field(default=4 * 3600, gt=0)


class ArtifactRef(Wire):
    """A pointer to content-addressed bytes in the object store."""

    digest: Digest
    media_type: str = "text/plain"
    size: int = Field(ge=0)
    name: str = Field(default="", max_length=512)


class Goal(Wire):
    """A vague, high-level goal and the constraints pinned to every step of it."""

    goal_id: Token = Field(default_factory=new_id)
    brief: str = Field(min_length=1, max_length=100_000)
    constraints: list[str] = Field(
        default_factory=list, description="Pinned constraints: packed into every step's context, never dropped."
    )
    budget: Budget = Field(default_factory=Budget)
    options: FreeForm = Field(default_factory=dict)
    submitted_at: datetime = Field(default_factory=utcnow)
    submitter: str | None = Field(default=None, max_length=128,
                                  description="Who submitted it: the gateway token's name, when it came that way.")
    workspace: ArtifactRef | None = Field(
        default=None, description="A workspace manifest the goal starts from (an existing project); every step "
        "works on it or on a newer workspace derived from it.")


GATE_PATTERN = r"^(plan|final|[A-Za-z0-9_-]{1,64}\.(before|after))$"
Gate = Annotated[str, Field(pattern=GATE_PATTERN, description="plan, final, or <step_id>.before / <step_id>.after")]
GateKind = Literal["plan", "before", "after", "final"]
Decision = Literal["approve", "reject"]
TimeoutPolicy = Literal["fail", "approve", "reject"]


class GoalCommand(Wire):
    """A client's request to change a goal, sent on ``mesh.control.<goal>``. The planner applies it to the
    goal state by compare-and-swap like every other transition: clients never write goal state.
    ``approve`` / ``reject`` decide the pending approval ``gate`` (docs/APPROVALS.md)."""

    command_id: Token = Field(default_factory=new_id)
    goal_id: Token
    action: Literal["cancel", "approve", "reject"]
    by: str = Field(min_length=1, max_length=200, description="who asks (user or service name)")
    reason: str = Field(default="", max_length=2000)
    issued_at: datetime = Field(default_factory=utcnow)
    gate: Gate | None = Field(default=None, description="approve / reject: the gate decided")
    note: str = Field(default="", max_length=4000, description="approve / reject: the decider's note (a rejection's "
                                                                "feedback)")


class StepQuality(Wire):
    """How good a step's work was judged to be when it completed, and by what.

    ``tests``: the step ran tests (grade 1 when the last run exited 0, else 0; ``exit_code`` says how it
    ended); ``review``: a reviewer's verdict (approve 1, changes requested 0); ``none``: nothing judged
    it (grade None). A verdict grades the work under review: ``judged`` names the steps whose output it
    judged (the producers of the workspace it looked at), so the router can credit the right decision."""

    grade: float | None = Field(default=None, ge=0, le=1)
    source: Literal["tests", "review", "none"] = "none"
    exit_code: int | None = None
    judged: list[str] = Field(default_factory=list, description="Step ids whose work this grade is about.")


class GoalQuality(Wire):
    """What a finished goal's work was checked against: its last test run, its last reviews, revisions."""

    tests: Literal["passed", "failed", "not_run"] = "not_run"
    tests_exit_code: int | None = None
    tests_report: ArtifactRef | None = Field(default=None, description="The last test run's report.")
    reviews: list[str] = Field(default_factory=list, description="Verdicts of the last review of each reviewed line.")
    review_revisions: int = Field(default=0, ge=0, description="Revisions asked for by reviews.")
    test_revisions: int = Field(default=0, ge=0, description="Revisions asked for by failing tests.")


class Artifact(Wire):
    """An artifact's metadata and lineage; its bytes live in the object store under ``ref.digest``."""

    ref: ArtifactRef
    goal_id: Token
    producer_step: Token | None = None
    producer_role: Token | None = None
    kind: str = Field(default="note", description="note | plan | code | workspace | review | test_report | synthesis")
    parents: list[Digest] = Field(default_factory=list, description="Digests this artifact was derived from.")
    created_at: datetime = Field(default_factory=utcnow)


class Step(Wire):
    """One node of a plan DAG."""

    step_id: Token
    role: Token
    instruction: str = Field(min_length=1, max_length=50_000)
    depends_on: list[Token] = Field(default_factory=list)
    inputs: list[ArtifactRef] = Field(default_factory=list, description="Extra inputs beyond the dependencies' outputs.")
    acceptance: list[str] = Field(default_factory=list, description="Acceptance criteria for the output.")
    difficulty: float = Field(default=0.5, ge=0, le=1)
    revision_of: Token | None = Field(default=None, description="The step this one revises (review loop).")

    @field_validator("depends_on")
    @classmethod
    def _unique_deps(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


class Plan(Wire):
    """A DAG of steps for one goal; ``version`` counts replans."""

    goal_id: Token
    steps: list[Step] = Field(min_length=1)
    version: int = Field(default=1, ge=1)
    rationale: str = ""

    def check(self, known_roles: set[str] | frozenset[str], *, max_steps: int = 200) -> list[list[str]]:
        """Validate the DAG and return its steps in topological layers.

        Raises ``PlanInvalid`` naming the first problem: too many steps, duplicate ids, unknown roles,
        unknown dependencies or a cycle (with the steps on it).
        """
        if len(self.steps) > max_steps:
            raise PlanInvalid(f"plan has {len(self.steps)} steps; the limit is {max_steps}")
        ids = [s.step_id for s in self.steps]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise PlanInvalid(f"duplicate step ids: {', '.join(dupes)}")
        for s in self.steps:
            if s.role not in known_roles:
                raise PlanInvalid(
                    f"step {s.step_id!r} names unknown role {s.role!r}; known roles: {', '.join(sorted(known_roles))}"
                )
            missing = [d for d in s.depends_on if d not in ids]
            if missing:
                raise PlanInvalid(f"step {s.step_id!r} depends on unknown steps: {', '.join(missing)}")
            if s.step_id in s.depends_on:
                raise PlanInvalid(f"step {s.step_id!r} depends on itself")
        deps = {s.step_id: set(s.depends_on) for s in self.steps}
        layers: list[list[str]] = []
        done: set[str] = set()
        while len(done) < len(ids):
            ready = [i for i in ids if i not in done and deps[i] <= done]
            if not ready:
                cycle = sorted(i for i in ids if i not in done)
                raise PlanInvalid(f"plan has a dependency cycle among steps: {', '.join(cycle)}")
            layers.append(ready)
            done.update(ready)
        return layers


class DagPosition(Wire):
    """Where a step sits in its plan; router features read this."""

    depth: int = Field(default=0, ge=0)
    fan_out: int = Field(default=1, ge=0, description="Width of the step's layer.")
    dependents: int = Field(default=0, ge=0)
    total_steps: int = Field(default=1, ge=0)


class Task(Wire):
    """A step handed to a worker role: everything the worker needs, no chat history."""

    task_id: str = Field(description="goal_id.step_id.attempt: the JetStream dedupe id.")
    goal_id: Token
    step: Step
    attempt: int = Field(default=1, ge=1)
    brief: str = ""
    constraints: list[str] = Field(default_factory=list)
    inputs: list[ArtifactRef] = Field(default_factory=list, description="Outputs of the dependencies + step inputs.")
    memory: str = Field(default="", description="The running goal memory: a short summary of progress so far.")
    position: DagPosition = Field(default_factory=DagPosition)
    remaining: Budget = Field(default_factory=Budget)
    budget_fraction_left: float = Field(default=1.0, ge=0, le=1, description="Least left of any budget dimension.")
    prior_failures: int = Field(default=0, ge=0)
    deadline: datetime | None = None
    options: FreeForm = Field(default_factory=dict, description="The goal's options (hints for backends).")

    @staticmethod
    def make_id(goal_id: str, step_id: str, attempt: int) -> str:
        return f"{goal_id}.{step_id}.{attempt}"


Tier = Literal["edge", "long_context", "swarm"]
TIERS: tuple[Tier, ...] = ("edge", "long_context", "swarm")


class RouteDecision(Wire):
    """Which backend tier a step uses, and why."""

    tier: Tier
    thinking: bool = False
    probabilities: dict[str, float] = Field(default_factory=dict, description="Per tier, from the router.")
    thinking_probability: float = Field(default=0.0, ge=0, le=1)
    propensity: float = Field(default=1.0, ge=0, le=1, description="Probability the policy chose this tier.")
    explored: bool = False
    overridden_by: str | None = Field(default=None, description="Hard constraint that overrode the model, if any.")
    model_version: str = "rules-1"
    feature_version: str = ""
    features: list[float] = Field(default_factory=list)


class Approval(Wire):
    """One approval gate of a goal: what waits for a person, until when, and how it was decided.

    ``plan``: the planned DAG waits before any step is dispatched; ``before``: a step of a role whose spec
    says ``approve = "before"`` waits before it is dispatched; ``after``: such a step's outcome is recorded
    but does not count until approved; ``final``: the goal's result waits before the goal completes."""

    gate: Gate
    kind: GateKind
    request: int = Field(ge=1, description="the goal's n-th approval request (the ledger's key with the goal)")
    status: Literal["pending", "approved", "rejected"] = "pending"
    step_id: Token | None = None
    role: Token | None = None
    summary: str = Field(default="", max_length=4000, description="what is being approved, in a line or a few")
    plan: Plan | None = Field(default=None, description="plan gate: the plan that waits")
    outputs: list[ArtifactRef] = Field(default_factory=list, description="after: the step's outputs (its text, "
                                       "workspace and diff); final: the goal's result")
    requested_at: datetime = Field(default_factory=utcnow)
    deadline: datetime | None = None
    on_timeout: TimeoutPolicy = "fail"
    decided_by: str | None = None
    note: str = ""
    decided_at: datetime | None = None
    command_id: Token | None = Field(default=None, description="the command that decided it (none: its timeout)")


class PendingApproval(Wire):
    """One entry of the approvals inbox (``MeshClient.approvals``, ``GET /v1/approvals``): a pending gate and
    the goal it holds."""

    goal_id: Token
    brief: str
    submitter: str | None = None
    approval: Approval
