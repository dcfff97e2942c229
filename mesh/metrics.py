"""Prometheus metrics of one node: tasks, latencies, errors, backend tokens and cost, router choices.

One registry per process (not the global default) so tests can run several nodes in one process.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mesh.contracts.models import Usage


class Metrics:
    def __init__(self, role: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.role = role
        self.tasks = Counter("mesh_tasks_total", "Tasks handled, by outcome.", ["role", "outcome"], registry=r)
        self.task_seconds = Histogram("mesh_task_seconds", "Task handling time.", ["role"], registry=r,
                                      buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 1800))
        self.in_flight = Gauge("mesh_tasks_in_flight", "Tasks being handled now.", ["role"], registry=r)
        self.errors = Counter("mesh_errors_total", "Errors, by kind.", ["role", "kind"], registry=r)
        self.backend_calls = Counter("mesh_backend_calls_total", "Backend call attempts.", ["tier", "outcome"],
                                     registry=r)
        self.backend_seconds = Histogram("mesh_backend_call_seconds", "Backend call latency.", ["tier"], registry=r)
        self.tokens = Counter("mesh_backend_tokens_total", "Tokens, by tier and kind.", ["tier", "kind"], registry=r)
        self.cost = Counter("mesh_backend_cost_usd_total", "Backend cost in USD.", ["tier"], registry=r)
        self.routes = Counter("mesh_router_choices_total", "Router decisions.", ["role", "tier"], registry=r)
        self.outcomes_refused = Counter(
            "mesh_outcomes_refused_total", "Step outcomes the planner refused, by reason: role (not emitted by the "
            "role the step was dispatched to), attempt (not the attempt in flight), step or goal (unknown).",
            ["reason"], registry=r)
        # (tier, outcome) → its labelled children: ``labels()`` takes a lock and builds the key on every
        # call, six times per backend call; tiers and outcomes (error class names) are few.
        self._call_children: dict[tuple[str, str], tuple[Any, ...]] = {}

    def backend_call(self, tier: str, outcome: str, usage: Usage, latency_ms: float) -> None:
        children = self._call_children.get((tier, outcome))
        if children is None:
            children = self._call_children[(tier, outcome)] = (
                self.backend_calls.labels(tier, outcome), self.backend_seconds.labels(tier),
                self.tokens.labels(tier, "prompt"), self.tokens.labels(tier, "completion"),
                self.tokens.labels(tier, "cached"), self.cost.labels(tier))
        calls, seconds, prompt, completion, cached, cost = children
        calls.inc()
        seconds.observe(latency_ms / 1000)
        prompt.inc(usage.prompt_tokens)
        completion.inc(usage.completion_tokens)
        cached.inc(usage.cached_tokens)
        cost.inc(usage.cost_usd)

    def route(self, role: str, tier: str) -> None:
        self.routes.labels(role, tier).inc()

    def task_done(self, outcome: str, seconds: float) -> None:
        self.tasks.labels(self.role, outcome).inc()
        self.task_seconds.labels(self.role).observe(seconds)

    def outcome_refused(self, reason: str) -> None:
        self.outcomes_refused.labels(reason).inc()

    def error(self, kind: str) -> None:
        self.errors.labels(self.role, kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
