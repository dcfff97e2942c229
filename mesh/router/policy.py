"""The router interface, the hard constraints every policy obeys, and the rule-based policy.

Hard constraints always win over any policy: a tier whose window is too small, whose circuit is open
or whose worst-case cost exceeds what the goal may still spend is never chosen while another tier
passes. When no tier fits, the largest open window is chosen and context packing summarises the
rest; when every fitting tier's circuit is open, the fitting tiers stay (the gateway falls back or
fails clearly); when nothing is affordable, the cheapest fitting tier is chosen (the budget guard
then stops the call if it must).

``RulePolicy`` is what a node runs when no router model can be loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mesh.contracts.models import TIERS, RouteDecision
from mesh.router.features import FEATURE_VERSION, RouteContext, featurize


class RoutePolicy(Protocol):
    @property
    def version(self) -> str: ...

    def decide(self, ctx: RouteContext) -> RouteDecision: ...


@dataclass(frozen=True, slots=True)
class Allowed:
    """The tiers a decision may pick from, and which constraint removed each tier that it may not."""

    tiers: tuple[str, ...]
    excluded: dict[str, str]  # tier -> "window" | "circuit" | "budget"


def allowed_tiers(ctx: RouteContext) -> Allowed:
    """Apply the hard constraints (window, circuit, budget) in that order of precedence."""
    excluded: dict[str, str] = {}
    fits = [t for t in TIERS if ctx.windows.get(t, 0) >= ctx.needed_tokens]
    if not fits:
        open_ = [t for t in TIERS if ctx.available.get(t, True)] or list(TIERS)
        fits = [max(open_, key=lambda t: ctx.windows.get(t, 0))]
    excluded.update({t: "window" for t in TIERS if t not in fits})
    open_fits = [t for t in fits if ctx.available.get(t, True)] or fits
    excluded.update({t: "circuit" for t in fits if t not in open_fits})
    affordable = open_fits
    if ctx.remaining_usd is not None and ctx.costs:
        affordable = [t for t in open_fits if ctx.costs.get(t, 0.0) <= ctx.remaining_usd] or [
            min(open_fits, key=lambda t: ctx.costs.get(t, 0.0))]
        excluded.update({t: "budget" for t in open_fits if t not in affordable})
    return Allowed(tuple(affordable), excluded)


def thinking_forced(ctx: RouteContext) -> bool | None:
    """The role spec's thinking switch when it is not left to the router."""
    return {"on": True, "off": False}.get(ctx.thinking)


class RulePolicy:
    """Cheap by default, bigger when the step is hard, wide, retried or does not fit."""

    version = "rules-1"

    def decide(self, ctx: RouteContext) -> RouteDecision:
        allowed = allowed_tiers(ctx)
        choice = self._preference(ctx, list(allowed.tiers))
        first = ctx.preferred[0] if ctx.preferred else choice
        retried = ctx.prior_failures > 0 or ctx.attempt > 1
        forced = thinking_forced(ctx)
        thinking = forced if forced is not None else (ctx.difficulty >= 0.6 or retried)
        return RouteDecision(
            tier=choice,  # type: ignore[arg-type]
            thinking=thinking and choice != "edge",
            probabilities={t: (1.0 if t == choice else 0.0) for t in TIERS},
            thinking_probability=1.0 if thinking else 0.0,
            propensity=1.0,
            overridden_by=allowed.excluded.get(first),
            model_version=self.version,
            feature_version=FEATURE_VERSION,
            features=featurize(ctx)[0].tolist(),
        )

    @staticmethod
    def _preference(ctx: RouteContext, allowed: list[str]) -> str:
        ranked = [t for t in ctx.preferred if t in allowed] + [t for t in allowed if t not in ctx.preferred]
        retried = ctx.prior_failures > 0 or ctx.attempt > 1
        if ctx.swarm_capable and "swarm" in allowed and ctx.difficulty >= 0.7 and not retried:
            return "swarm"
        if retried:  # escalate away from the cheapest tier after a failure
            bigger = [t for t in ranked if t != "edge"]
            return bigger[0] if bigger else ranked[0]
        if ctx.difficulty <= 0.3 and "edge" in allowed and ctx.budget_fraction_left < 0.5:
            return "edge"
        return ranked[0]
