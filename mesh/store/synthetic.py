"""A deterministic synthetic event history: whole goals (plan, routed steps with backend and tool
calls, retries, artifacts with lineage, completion) as the mesh would publish them.

It exists so the ledger can be benchmarked at a million events and tested against realistic
sequences without running a mesh; the same seed always gives the same events (ids and times too).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from mesh.contracts import (
    SYSTEM_GOAL_ID,
    TIERS,
    Artifact,
    ArtifactCreated,
    ArtifactRef,
    BackendCall,
    Event,
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


class _Clock:
    def __init__(self, rng: random.Random, start: datetime) -> None:
        self.rng, self.now = rng, start

    def tick(self) -> datetime:
        self.now += timedelta(microseconds=self.rng.randint(1_000, 900_000))
        return self.now


def _hex(rng: random.Random, bits: int) -> str:
    return f"{rng.getrandbits(bits):0{bits // 4}x}"


def _goal(rng: random.Random, clock: _Clock, node_of: dict[str, str]) -> Iterator[Event]:
    goal_id = _hex(rng, 64)
    ids = lambda: _hex(rng, 128)  # noqa: E731 - deterministic event ids
    goal = Goal(goal_id=goal_id, brief=f"Build feature #{rng.randint(1, 10_000)}",
                constraints=["python only", "no network"][: rng.randint(0, 2)], submitted_at=clock.tick())
    yield GoalSubmitted(event_id=ids(), goal_id=goal_id, at=clock.now, node=node_of["planner"], goal=goal)
    roles = ["researcher", *rng.sample(ROLES[1:4], rng.randint(1, 3)), "synthesizer"]
    steps = [Step(step_id=f"s{i}", role=r, instruction=f"do part {i}", depends_on=[f"s{i - 1}"] if i else [])
             for i, r in enumerate(roles)]
    yield GoalPlanned(event_id=ids(), goal_id=goal_id, at=clock.tick(), node=node_of["planner"],
                      plan=Plan(goal_id=goal_id, steps=steps))
    total, parent = Usage(), None
    for step in steps:
        node = node_of[step.role]
        for attempt in (1, 2):
            base = dict(goal_id=goal_id, node=node, step_id=step.step_id, role=step.role, attempt=attempt)
            yield StepDispatched(event_id=ids(), at=clock.tick(), task_id=Task.make_id(goal_id, step.step_id, attempt),
                                 **base)
            probs = [rng.random() for _ in TIERS]
            tier = TIERS[max(range(len(TIERS)), key=probs.__getitem__)]
            yield RouteDecided(
                event_id=ids(), goal_id=goal_id, at=clock.tick(), node=node, step_id=step.step_id, role=step.role,
                decision=RouteDecision(tier=tier, probabilities={t: p / sum(probs) for t, p in zip(TIERS, probs)},
                                       propensity=max(probs) / sum(probs), explored=rng.random() < 0.1,
                                       features=[round(rng.random(), 4) for _ in range(8)], feature_version="f1"))
            yield StepStarted(event_id=ids(), at=clock.tick(), **base)
            usage = Usage()
            for call in range(rng.randint(1, 3)):
                u = Usage(prompt_tokens=rng.randint(100, 20_000), completion_tokens=rng.randint(10, 2_000), calls=1)
                u = u.model_copy(update={"cost_usd": (u.prompt_tokens + u.completion_tokens) * _PRICE[tier]})
                outcome = "ok" if rng.random() > 0.05 else "RateLimited"
                usage += u
                yield BackendCall(event_id=ids(), goal_id=goal_id, at=clock.tick(), node=node, step_id=step.step_id,
                                  tier=tier, model=_MODELS[tier], endpoint=f"http://{tier}.local/v1", usage=u,
                                  latency_ms=round(rng.uniform(50, 9_000), 3), outcome=outcome, attempt=call + 1)
                if rng.random() < 0.5:
                    yield ToolCall(event_id=ids(), goal_id=goal_id, at=clock.tick(), node=node,
                                   step_id=step.step_id, role=step.role, tool="write_file",
                                   arguments={"path": f"src/m{call}.py"}, ok=rng.random() > 0.1,
                                   duration_ms=round(rng.uniform(0.1, 50), 3))
            yield StepProgress(event_id=ids(), at=clock.tick(), message="drafted", fraction=0.5, **base)
            total += usage
            if attempt == 1 and rng.random() < 0.15:
                yield StepFailed(event_id=ids(), at=clock.tick(), error="tests failed", retryable=True, **base)
                continue
            ref = ArtifactRef(digest=_hex(rng, 256), size=rng.randint(10, 100_000), name=f"{step.step_id}.md")
            yield ArtifactCreated(event_id=ids(), goal_id=goal_id, at=clock.tick(), node=node, artifact=Artifact(
                ref=ref, goal_id=goal_id, producer_step=step.step_id, producer_role=step.role,
                parents=[parent.digest] if parent else [], created_at=clock.now))
            yield StepCompleted(event_id=ids(), at=clock.tick(), outputs=[ref], usage=usage, tier=tier, **base)
            parent = ref
            break
    if parent is not None and rng.random() > 0.05:
        yield GoalCompleted(event_id=ids(), goal_id=goal_id, at=clock.tick(), node=node_of["planner"], result=parent,
                            usage=total, steps_run=len(steps))
    else:
        yield GoalFailed(event_id=ids(), goal_id=goal_id, at=clock.tick(), node=node_of["planner"],
                         reason="budget exceeded", usage=total)


def synthetic_events(count: int, *, seed: int = 0, start: datetime = START) -> Iterator[Event]:
    """``count`` events: node start-ups, then whole goals one after another (the last one cut short)."""
    rng = random.Random(seed)
    clock = _Clock(rng, start)
    node_of = {role: f"{role}-{_hex(rng, 32)}" for role in ("planner", *ROLES)}

    def history() -> Iterator[Event]:
        for role, node in node_of.items():
            yield NodeUp(event_id=_hex(rng, 128), goal_id=SYSTEM_GOAL_ID, at=clock.tick(), node=node, role=role,
                         host="host-1", pid=rng.randint(100, 60_000), version="0.1.0")
        while True:
            yield from _goal(rng, clock, node_of)

    for _, event in zip(range(count), history()):
        yield event

