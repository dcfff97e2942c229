"""The router interface and the rule-based policy that stands behind it until the ONNX router lands.

Hard constraints always win over any policy: a tier whose window is too small or whose circuit is
open is never chosen while another fits; when nothing fits, the largest open window is chosen and
context packing summarises the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from mesh.contracts.models import TIERS, DagPosition, RouteDecision

FEATURE_VERSION = "rules-f1"


@dataclass(slots=True)
class RouteContext:
    role: str
    needed_tokens: int
    windows: dict[str, int]
    available: dict[str, bool]
    preferred: list[str]
    difficulty: float = 0.5
    position: DagPosition = field(default_factory=DagPosition)
    attempt: int = 1
    prior_failures: int = 0
    budget_fraction_left: float = 1.0
    thinking: str = "auto"  # on | off | auto (from the role spec)
    swarm_capable: bool = False  # the role fans out on the swarm tier

    def features(self) -> list[float]:
        per_tier = [self.needed_tokens / max(1, self.windows.get(t, 1)) for t in TIERS]
        return per_tier + [self.difficulty, float(self.position.depth), float(self.position.fan_out),
                           float(self.attempt), float(self.prior_failures), self.budget_fraction_left]


class RoutePolicy(Protocol):
    version: str

    def decide(self, ctx: RouteContext) -> RouteDecision: ...


class RulePolicy:
    """Cheap by default, bigger when the step is hard, wide, retried or does not fit."""

    version = "rules-1"

    def decide(self, ctx: RouteContext) -> RouteDecision:
        open_tiers = [t for t in TIERS if ctx.available.get(t, True)] or list(TIERS)
        fits = [t for t in open_tiers if ctx.windows.get(t, 0) >= ctx.needed_tokens]
        overridden: str | None = None
        if not fits:
            choice = max(open_tiers, key=lambda t: ctx.windows.get(t, 0))
            overridden = "window"
        else:
            choice = self._preference(ctx, fits)
            if len(open_tiers) < len(TIERS) and choice not in ctx.preferred[:1]:
                overridden = "circuit"
        thinking = ctx.thinking == "on" or (
            ctx.thinking == "auto" and (ctx.difficulty >= 0.6 or ctx.prior_failures > 0 or ctx.attempt > 1)
        )
        return RouteDecision(
            tier=choice,  # type: ignore[arg-type]
            thinking=thinking and choice != "edge",
            probabilities={t: (1.0 if t == choice else 0.0) for t in TIERS},
            thinking_probability=1.0 if thinking else 0.0,
            propensity=1.0,
            overridden_by=overridden,
            model_version=self.version,
            feature_version=FEATURE_VERSION,
            features=ctx.features(),
        )

    @staticmethod
    def _preference(ctx: RouteContext, fits: list[str]) -> str:
        ranked = [t for t in ctx.preferred if t in fits] + [t for t in fits if t not in ctx.preferred]
        retried = ctx.prior_failures > 0 or ctx.attempt > 1
        if ctx.swarm_capable and "swarm" in fits and ctx.difficulty >= 0.7 and not retried:
            return "swarm"
        if retried:  # escalate away from the cheapest tier after a failure
            bigger = [t for t in ranked if t != "edge"]
            return bigger[0] if bigger else ranked[0]
        if ctx.difficulty <= 0.3 and "edge" in fits and ctx.budget_fraction_left < 0.5:
            return "edge"
        return ranked[0]
