"""The sim world as a routing environment: goals planned as the sim planner plans them, every step
attempt routed by a policy and scored by the sim world's quality, price and latency models.

It exists to make routers without a live mesh: the default model is trained on a ledger written
here (``scripts/make_default_router.py``), and ``mesh router simulate`` writes ledgers for
``train``/``eval`` experiments. What it models, per step attempt:

* the plan: ``mesh.backends.sim.roles.plan_steps`` (8–20 steps, difficulty 0.2–0.8), DAG
  positions from the plan's topological layers;
* the context: a base prompt, the outputs of the step's dependencies, a workspace that grows with
  each implement/review/test phase, and — on some goals — a large corpus given to the research
  steps (20k–600k tokens); ``needed_tokens`` adds the role's output reserve, as the worker does;
* the outcome: success with the sim world's ``success_probability`` (tier quality, difficulty,
  window fill, swarm fan-out bonus, thinking bonus); a failed attempt is retried (up to
  ``max_attempts``) with one more prior failure, as the orchestrator does. Cost from the tier's
  prices: a step with tools makes two calls (a tool round and the answer), a swarm-capable step on
  the swarm tier fans out into sub-agents plus a composing call. Latency from the tier's time to
  first token and tokens/s.

What the ledger of a real mesh run lacks and this adds: a weak answer from the sim completes its
step like a good one, so a real run's ledger cannot tell them apart; here a weak answer fails its
attempt (``step.failed``), which is the outcome signal training needs.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from mesh.backends.base import ChatRequest
from mesh.backends.sim import roles as sim_roles
from mesh.backends.sim.world import PROFILES, SimWorld
from mesh.backends.tiers import TierConfig
from mesh.contracts import (
    TIERS,
    BackendCall,
    DagPosition,
    Event,
    Plan,
    RouteDecided,
    RouteDecision,
    Step,
    StepCompleted,
    StepFailed,
    StepStarted,
    Task,
    Usage,
)
from mesh.contracts.events import event_subject
from mesh.router.features import FEATURE_VERSION, RouteContext, call_costs, deadline_pressure, featurize
from mesh.router.policy import RoutePolicy, allowed_tiers, thinking_forced
from mesh.store.ledger import Ledger


class _Limits(Protocol):
    @property
    def max_output_tokens(self) -> int: ...


class _RouterPrefs(Protocol):
    @property
    def preferred(self) -> Sequence[str]: ...
    @property
    def thinking(self) -> str: ...
    @property
    def swarm_fan_out(self) -> int: ...


class RoleSpec(Protocol):
    """What the routing environment reads of a role spec (``mesh.roles.spec.RoleSpec`` is one; the router
    layer stays below the roles)."""

    @property
    def kind(self) -> str: ...
    @property
    def output_kind(self) -> str: ...
    @property
    def tools(self) -> Sequence[str]: ...
    @property
    def limits(self) -> _Limits: ...
    @property
    def router(self) -> _RouterPrefs: ...

TOPICS = (
    "Build me a login system", "Write a CSV to Parquet converter", "Add rate limiting to the public API",
    "Design a billing service with invoices", "Migrate the user table to a new schema",
    "Build a search page with filters", "Write a Slack bot that posts build results",
    "Add two-factor authentication", "Build an inventory tracker for a small shop",
    "Refactor the payment module for testability", "Create a data pipeline for clickstream events",
    "Write a command-line tool to rename photos by date",
)
REASONING_TOKENS = 80  # the sim's reasoning text is a short template: ~70-80 tokens
# Output tokens of a step, by its role's output kind.
COMPLETION = {"note": (300, 900), "code": (800, 2500), "review": (150, 400), "test_report": (200, 500),
              "synthesis": (400, 1200)}
_PHASED = frozenset({"code", "review", "test_report"})  # kinds whose steps come in implement → review → test phases
_START = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class SimCase:
    """One step attempt to route, with what the sim world needs to score it."""

    goal_id: str
    step_id: str
    role: str
    attempt: int
    ctx: RouteContext
    prompt_tokens: int
    completion_tokens: int
    calls: int  # model calls on a plain tier (a tool round, then the answer)
    swarm_fan_out: int  # sub-agents on the swarm tier; 0 = a plain call there too


@dataclass(frozen=True, slots=True)
class Expected:
    p_success: float
    cost_usd: float
    latency_s: float


@dataclass(frozen=True, slots=True)
class Attempt:
    case: SimCase
    decision: RouteDecision
    success: bool
    usage: Usage
    latency_s: float
    started_s: float  # seconds into the goal


Decide = Callable[[SimCase], RouteDecision]


class SimRouting:
    def __init__(self, specs: Mapping[str, RoleSpec], *, seed: int = 0, max_attempts: int = 3,
                 tiers: Mapping[str, TierConfig] | None = None) -> None:
        self.specs = {r: s for r, s in specs.items() if s.kind == "worker"}
        self.team = {s.output_kind: r for r, s in sorted(self.specs.items(), reverse=True)}  # kind → (first) role
        self.world = SimWorld(seed=seed)
        self.tiers = dict(tiers or self.world.tiers)
        self.seed = seed
        self.max_attempts = max_attempts

    # --- the sim world's verdict on one attempt ---------------------------------------------------

    def expected(self, case: SimCase, tier: str, thinking: bool) -> Expected:
        cfg = self.tiers[tier]
        if case.prompt_tokens > cfg.context_window:
            return Expected(0.0, 0.0, 0.0)  # refused by the endpoint: ContextTooLong
        fan_out = case.ctx.position.fan_out
        req = ChatRequest(messages=[], thinking=thinking, metadata={"difficulty": case.ctx.difficulty,
                                                                     "fan_out": fan_out})
        p = self.world.success_probability(req, cfg, case.prompt_tokens)
        out = case.completion_tokens + (REASONING_TOKENS if thinking else 0)
        fan = case.swarm_fan_out if tier == "swarm" else 0
        calls = fan + 1 if fan else case.calls
        cost = calls * cfg.prices.cost(prompt_tokens=case.prompt_tokens, cached_tokens=0, completion_tokens=out)
        prof = PROFILES[tier]
        one = prof.first_token_seconds(case.prompt_tokens) + out / prof.tokens_per_s
        return Expected(p, cost, (2 if fan else calls) * one)

    def _outcome(self, case: SimCase, decision: RouteDecision, rng: random.Random,
                 started_s: float) -> Attempt:
        exp = self.expected(case, decision.tier, decision.thinking)
        fan = case.swarm_fan_out if decision.tier == "swarm" else 0
        calls = fan + 1 if fan else case.calls
        reasoning = REASONING_TOKENS if decision.thinking else 0
        usage = Usage(prompt_tokens=calls * case.prompt_tokens,
                      completion_tokens=calls * (case.completion_tokens + reasoning),
                      reasoning_tokens=calls * reasoning, cost_usd=exp.cost_usd, calls=calls)
        return Attempt(case, decision, rng.random() < exp.p_success, usage, exp.latency_s, started_s)

    # --- goals ------------------------------------------------------------------------------------

    def goal_id(self, index: int) -> str:
        return hashlib.sha256(f"sim-routing/{self.seed}/{index}".encode()).hexdigest()[:32]

    def run_goal(self, index: int, decide: Decide) -> list[Attempt]:
        """Plan goal ``index`` and route every step attempt with ``decide``, in dependency order."""
        rng = random.Random(f"{self.seed}/{index}")
        goal_id = self.goal_id(index)
        topic = rng.choice(TOPICS)
        steps = [Step(**s) for s in sim_roles.plan_steps(rng.randint(8, 20), topic, rng, self.team)]
        layers = Plan(goal_id=goal_id, steps=steps).check(set(self.specs))
        by_id = {s.step_id: s for s in steps}
        budget = rng.uniform(0.5, 5.0)
        deadline = rng.uniform(600, 7200) if rng.random() < 0.25 else None
        corpus = int(rng.uniform(20_000, 600_000)) if rng.random() < 0.15 else 0
        outputs: dict[str, int] = {}
        spent = clock = 0.0
        attempts: list[Attempt] = []
        for depth, layer in enumerate(layers):
            for step_id in layer:
                step = by_id[step_id]
                spec = self.specs[step.role]
                kind = spec.output_kind
                phase = int(step_id.rsplit("-", 1)[1]) if kind in _PHASED else 0
                prompt = (rng.randint(400, 1200) + sum(outputs.get(d, 0) for d in step.depends_on)
                          + 1500 * phase + (corpus if kind == "note" and step_id != "spec" else 0))
                low, high = COMPLETION.get(kind, (300, 900))
                completion = rng.randint(low, high)
                position = DagPosition(depth=depth, fan_out=len(layer), total_steps=len(steps),
                                       dependents=sum(step_id in s.depends_on for s in steps))
                for attempt in range(1, self.max_attempts + 1):
                    needed = prompt + spec.limits.max_output_tokens
                    ctx = RouteContext(
                        role=step.role, output_kind=kind, needed_tokens=needed,
                        windows={t: cfg.context_window for t, cfg in self.tiers.items()},
                        available={t: True for t in TIERS}, preferred=list(spec.router.preferred),
                        difficulty=step.difficulty, position=position, attempt=attempt,
                        prior_failures=attempt - 1, budget_fraction_left=max(0.0, 1.0 - spent / budget),
                        thinking=spec.router.thinking, swarm_capable=spec.router.swarm_fan_out > 0,
                        tools=len(spec.tools),
                        deadline_pressure=deadline_pressure(None if deadline is None else deadline - clock),
                        instruction=step.instruction,
                        costs=call_costs(self.tiers, needed, spec.limits.max_output_tokens),
                        remaining_usd=max(0.0, budget - spent),
                    )
                    case = SimCase(goal_id, step_id, step.role, attempt, ctx, prompt, completion,
                                   calls=2 if spec.tools else 1,
                                   swarm_fan_out=0 if spec.tools else spec.router.swarm_fan_out)
                    result = self._outcome(case, decide(case), rng, clock)
                    attempts.append(result)
                    spent += result.usage.cost_usd
                    clock += result.latency_s + 0.01  # the orchestrator's turn-around
                    if result.success:
                        break
                outputs[step_id] = completion
        return attempts

    def run(self, goals: int, decide: Decide, *, start: int = 0) -> Iterator[Attempt]:
        for index in range(start, start + goals):
            yield from self.run_goal(index, decide)


# --- policies that need the sim world (not a model) -------------------------------------------------


def routed_by(policy: RoutePolicy) -> Decide:
    """Route sim cases with a mesh policy (a ``Router``, the rules), as a node would."""
    return lambda case: policy.decide(case.ctx)


def uniform_policy(seed: int = 0) -> Decide:
    """Uniformly random over the allowed tiers (and thinking, where the role leaves it open), with its
    propensity: the logging policy for a first, unbiased ledger."""
    rng = random.Random(seed)

    def decide(case: SimCase) -> RouteDecision:
        ctx = case.ctx
        allowed = allowed_tiers(ctx).tiers
        forced = thinking_forced(ctx)
        return RouteDecision(
            tier=rng.choice(allowed),  # type: ignore[arg-type]
            thinking=forced if forced is not None else rng.random() < 0.5,
            probabilities={t: (1 / len(allowed) if t in allowed else 0.0) for t in TIERS},
            propensity=1 / (len(allowed) * (1 if forced is not None else 2)), explored=True,
            model_version=f"uniform-{seed}", feature_version=FEATURE_VERSION, features=featurize(ctx)[0].tolist(),
        )

    return decide


def always_policy(tier: str) -> Decide:
    """``tier`` wherever it is allowed (else the largest allowed window), thinking unless the role says off."""

    def decide(case: SimCase) -> RouteDecision:
        allowed = allowed_tiers(case.ctx).tiers
        choice = tier if tier in allowed else max(allowed, key=lambda t: case.ctx.windows[t])
        return RouteDecision(tier=choice, thinking=case.ctx.thinking != "off",  # type: ignore[arg-type]
                             model_version=f"always-{tier}")

    return decide


def oracle_policy(sim: SimRouting, cost_weight: float) -> Decide:
    """Knows the sim world's true success probability and cost of every action: picks the allowed
    action maximising p − cost_weight · cost. Not learnable from a ledger; it bounds what a router
    can reach."""

    def decide(case: SimCase) -> RouteDecision:
        forced = thinking_forced(case.ctx)
        options = [(t, th) for t in allowed_tiers(case.ctx).tiers
                   for th in ((forced,) if forced is not None else (False, True))]

        def score(action: tuple[str, bool]) -> float:
            exp = sim.expected(case, *action)
            return exp.p_success - cost_weight * exp.cost_usd

        tier, thinking = max(options, key=score)
        return RouteDecision(tier=tier, thinking=thinking, model_version=f"oracle-{cost_weight:g}")  # type: ignore[arg-type]

    return decide


# --- ledgers ------------------------------------------------------------------------------------------


def attempt_events(attempt: Attempt, prefix: str = "mesh") -> Iterator[tuple[str, Event]]:
    """The events a worker publishes for one step attempt, with times on the goal's clock."""
    case, d = attempt.case, attempt.decision
    t0 = _START + timedelta(seconds=attempt.started_s)
    task_id = Task.make_id(case.goal_id, case.step_id, case.attempt)
    goal, node, step, role, n = case.goal_id, f"sim-{case.role}", case.step_id, case.role, case.attempt
    events: list[Event] = [
        StepStarted(event_id=f"{task_id}.started", goal_id=goal, node=node, at=t0, step_id=step, role=role, attempt=n),
        RouteDecided(event_id=f"{task_id}.route.1", goal_id=goal, node=node, at=t0 + timedelta(milliseconds=1),
                     step_id=step, role=role, attempt=n, decision=d),
    ]
    calls = attempt.usage.calls
    share = Usage(prompt_tokens=attempt.usage.prompt_tokens // calls,
                  completion_tokens=attempt.usage.completion_tokens // calls,
                  reasoning_tokens=attempt.usage.reasoning_tokens // calls,
                  cost_usd=attempt.usage.cost_usd / calls, calls=1)
    at = t0
    for i in range(calls):
        at = t0 + timedelta(seconds=attempt.latency_s * (i + 1) / calls, milliseconds=2)
        events.append(BackendCall(event_id=f"{task_id}.call.{i}", goal_id=goal, node=node, at=at, step_id=step,
                                  tier=d.tier, model=f"sim-{d.tier}", usage=share,
                                  latency_ms=attempt.latency_s * 1000 / calls, thinking=d.thinking))
    end = at + timedelta(milliseconds=1)
    if attempt.success:
        events.append(StepCompleted(event_id=f"{task_id}.completed", goal_id=goal, node=node, at=end, step_id=step,
                                    role=role, attempt=n, usage=attempt.usage, tier=d.tier))
    else:
        events.append(StepFailed(event_id=f"{task_id}.failed", goal_id=goal, node=node, at=end, step_id=step,
                                 role=role, attempt=n, retryable=True,
                                 error="the answer did not meet the step's acceptance criteria (sim quality model)"))
    for event in events:
        yield event_subject(prefix, case.goal_id, role, event.type), event


def write_ledger(path: str | Path, attempts: Iterator[Attempt] | Sequence[Attempt], *, batch: int = 20_000) -> int:
    """Append the events of ``attempts`` to the ledger at ``path``; return the number of events."""
    with Ledger(path) as ledger:
        first = seq = ledger.last_seq()
        pending: list[tuple[int, str, Event]] = []
        for attempt in attempts:
            for subject, event in attempt_events(attempt):
                seq += 1
                pending.append((seq, subject, event))
            if len(pending) >= batch:
                ledger.ingest(pending)
                pending = []
        if pending:
            ledger.ingest(pending)
        return seq - first


@dataclass(frozen=True, slots=True)
class Score:
    """A policy's true performance in the sim world, per decision (expected values, not samples)."""

    success: float
    cost: float
    latency: float
    decisions: int


def score(sim: SimRouting, decide: Decide, goals: int, *, start: int = 0) -> Score:
    """Route ``goals`` goals with ``decide`` and average the sim world's expected success, cost and
    latency of every decision it made (the retries it caused included)."""
    p = c = lat = 0.0
    n = 0
    for attempt in sim.run(goals, decide, start=start):
        exp = sim.expected(attempt.case, attempt.decision.tier, attempt.decision.thinking)
        p, c, lat, n = p + exp.p_success, c + exp.cost_usd, lat + exp.latency_s, n + 1
    return Score(p / n, c / n, lat / n, n)
