"""A deterministic synthetic event history: whole goals (plan, routed steps with backend and tool
calls, retries, artifacts with lineage, completion) as the mesh would publish them.

It exists so the ledger can be benchmarked at a million events and tested against realistic
sequences without running a mesh; the same seed always gives the same events (ids and times too).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Generator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from mesh.contracts import (
    SYSTEM_GOAL_ID,
    TIERS,
    Artifact,
    ArtifactCreated,
    ArtifactRef,
    BackendCall,
    Event,
    EventBase,
    Goal,
    GoalCompleted,
    GoalFailed,
    GoalPlanned,
    GoalSubmitted,
    NodeUp,
    Plan,
    RouteDecided,
    RouteDecision,
    Step,
    StepCompleted,
    StepDispatched,
    StepFailed,
    StepProgress,
    StepStarted,
    Task,
    ToolCall,
    Usage,
)

ROLES = ("researcher", "coder", "reviewer", "tester", "synthesizer")
_MODELS = {"edge": "smollm2-135m", "long_context": "deepseek-v4", "swarm": "kimi-k2.6"}
_PRICE = {"edge": 0.0, "long_context": 0.3e-6, "swarm": 1.2e-6}
START = datetime(2026, 1, 1, tzinfo=UTC)
E = TypeVar("E", bound=EventBase)


class _History:
    """One synthetic mesh: its random source, its clock, its nodes."""

    def __init__(self, seed: int, start: datetime) -> None:
        self.rng = random.Random(seed)
        self.now = start
        self.node_of = {role: f"{role}-{self.hex(32)}" for role in ("planner", *ROLES)}

    def hex(self, bits: int) -> str:
        return f"{self.rng.getrandbits(bits):0{bits // 4}x}"

    def tick(self) -> datetime:
        self.now += timedelta(microseconds=self.rng.randint(1_000, 900_000))
        return self.now

    def event(self, cls: type[E], goal_id: str, node: str, **fields: Any) -> E:
        """An event with a deterministic id, the next clock tick and its publisher."""
        return cls(event_id=self.hex(128), goal_id=goal_id, at=self.tick(), node=node, **fields)

    def events(self) -> Iterator[Event]:
        for role, node in self.node_of.items():
            yield self.event(NodeUp, SYSTEM_GOAL_ID, node, role=role, host="host-1",
                             pid=self.rng.randint(100, 60_000), version="0.1.0")
        while True:
            yield from self.goal()

    def goal(self) -> Iterator[Event]:
        rng, planner = self.rng, self.node_of["planner"]
        goal_id = self.hex(64)
        goal = Goal(goal_id=goal_id, brief=f"Build feature #{rng.randint(1, 10_000)}",
                    constraints=["python only", "no network"][: rng.randint(0, 2)], submitted_at=self.now)
        yield self.event(GoalSubmitted, goal_id, planner, goal=goal)
        roles = ["researcher", *rng.sample(ROLES[1:4], rng.randint(1, 3)), "synthesizer"]
        steps = [Step(step_id=f"s{i}", role=r, instruction=f"do part {i}",
                      depends_on=[f"s{i - 1}"] if i else []) for i, r in enumerate(roles)]
        yield self.event(GoalPlanned, goal_id, planner, plan=Plan(goal_id=goal_id, steps=steps))
        total, parent = Usage(), None
        for step in steps:
            outcome = yield from self.step(goal_id, step, parent)
            total += outcome[0]
            parent = outcome[1] or parent
        if parent is not None and rng.random() > 0.05:
            yield self.event(GoalCompleted, goal_id, planner, result=parent, usage=total,
                             steps_run=len(steps))
        else:
            yield self.event(GoalFailed, goal_id, planner, reason="budget exceeded", usage=total)

    def step(self, goal_id: str, step: Step,
             parent: ArtifactRef | None) -> Generator[Event, None, tuple[Usage, ArtifactRef | None]]:
        """A step's attempts (a first one fails now and then); returns (usage, output)."""
        rng, node, total = self.rng, self.node_of[step.role], Usage()
        for attempt in (1, 2):
            base = {"step_id": step.step_id, "role": step.role, "attempt": attempt}
            yield self.event(StepDispatched, goal_id, node,
                             task_id=Task.make_id(goal_id, step.step_id, attempt), **base)
            probs = [rng.random() for _ in TIERS]
            tier = TIERS[max(range(len(TIERS)), key=probs.__getitem__)]
            decision = RouteDecision(
                tier=tier, probabilities={t: p / sum(probs) for t, p in zip(TIERS, probs)},
                propensity=max(probs) / sum(probs), explored=rng.random() < 0.1,
                features=[round(rng.random(), 4) for _ in range(8)], feature_version="f1")
            yield self.event(RouteDecided, goal_id, node, step_id=step.step_id, role=step.role, attempt=attempt,
                             decision=decision)
            yield self.event(StepStarted, goal_id, node, **base)
            usage = Usage()
            for call in range(rng.randint(1, 3)):
                tokens = (rng.randint(100, 20_000), rng.randint(10, 2_000))
                spent = Usage(prompt_tokens=tokens[0], completion_tokens=tokens[1], calls=1,
                              cost_usd=sum(tokens) * _PRICE[tier])
                usage += spent
                yield self.event(BackendCall, goal_id, node, step_id=step.step_id, tier=tier,
                                 model=_MODELS[tier], endpoint=f"http://{tier}.local/v1", usage=spent,
                                 attempt=call + 1, latency_ms=round(rng.uniform(50, 9_000), 3),
                                 outcome="ok" if rng.random() > 0.05 else "RateLimited")
                if rng.random() < 0.5:
                    yield self.event(ToolCall, goal_id, node, step_id=step.step_id, role=step.role,
                                     tool="write_file", arguments={"path": f"src/m{call}.py"},
                                     ok=rng.random() > 0.1, duration_ms=round(rng.uniform(0.1, 50), 3))
            yield self.event(StepProgress, goal_id, node, message="drafted", fraction=0.5, **base)
            total += usage
            if attempt == 1 and rng.random() < 0.15:
                yield self.event(StepFailed, goal_id, node, error="tests failed", retryable=True, **base)
                continue
            ref = ArtifactRef(digest=self.hex(256), size=rng.randint(10, 100_000), name=f"{step.step_id}.md")
            artifact = Artifact(ref=ref, goal_id=goal_id, producer_step=step.step_id, producer_role=step.role,
                                parents=[parent.digest] if parent else [], created_at=self.now)
            yield self.event(ArtifactCreated, goal_id, node, artifact=artifact)
            yield self.event(StepCompleted, goal_id, node, outputs=[ref], usage=usage, tier=tier, **base)
            return total, ref
        return total, None


def synthetic_events(count: int, *, seed: int = 0, start: datetime = START) -> Iterator[Event]:
    """``count`` events: node start-ups, then whole goals one after another (the last one cut short)."""
    return itertools.islice(_History(seed, start).events(), count)
