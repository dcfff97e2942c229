"""``mesh router eval``: what a router would have achieved on held-out logged decisions.

Off-policy estimates, self-normalised inverse propensity (SNIPS): a policy π is scored on the logged
decisions whose action it would also have taken, each weighted by π(action | x) / propensity,

    V(π) = Σ wᵢ rᵢ / Σ wᵢ,   wᵢ = π(aᵢ | xᵢ) / pᵢ

for r = success, cost and latency alike. ``matched`` counts the decisions with wᵢ > 0 and ``ess``
is the effective sample size (Σw)² / Σw²: an estimate resting on a handful of decisions says so.
Every policy is held to the window constraint read back from the logged features (a tier that does
not fit is never chosen; with none fitting, the largest window); circuits and budgets of the past
are not replayed.

Policies: the candidate and the current router (greedy, as deployed without exploration), always
one tier (thinking on unless the role turns it off; the largest window where the tier does not
fit), uniformly random, and the logging policy itself. A router also gets a cost–quality curve:
its scores tilted by λ · (tier cost / dearest tier cost) for λ from 0 up, and its area (cost
normalised by the dearest single tier, success 0 below a curve's cheapest point).

The RouteLLM-style saving — the cost at which a router reaches 95% (and 100%) of the best single tier's
success, against that tier's cost — needs a λ, and a λ picked on the goals it is scored on flatters
the router (it is the best of 41 tries, noise included). So λ is chosen on *validation* goals
(``Decisions.halves``: disjoint from the evaluation goals, both held out of training): the cheapest λ
whose validation estimate reaches the target; the router at that λ is then scored on the evaluation
goals, and the saving counts only where it reaches the target there too. Without validation goals
λ stays 0 (the greedy router).

Off-policy estimates are not ground truth: they re-weight decisions logged under another policy, so
they rest on few matched decisions for a policy unlike the logger (see ``ess``), and a ledger's costs
are what the logged attempts spent. Where a simulator exists, score policies on fresh goals
(``mesh.router.simenv.score``) and report both (bench/router.py does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from mesh.contracts.models import TIERS
from mesh.router.dataset import ACTIONS, N_ACTIONS, Decisions
from mesh.router.features import COST_COLUMNS, FILL_COLUMNS, THINKING_COLUMNS, fitting_tiers
from mesh.router.model import RouterModel

Policy = Callable[[Decisions], np.ndarray]  # decisions -> (n, N_ACTIONS) action probabilities
TILTS = (0.0, *np.geomspace(0.005, 5.0, 40))
TARGETS = (0.95, 1.0)


@dataclass(frozen=True, slots=True)
class Estimate:
    policy: str
    success: float
    cost: float  # USD per decision
    latency: float  # seconds per decision
    matched: int
    ess: float


@dataclass(frozen=True, slots=True)
class Tuned:
    """A router at the cost weight λ chosen on the validation goals for a target, scored on the evaluation goals."""

    tilt: float
    estimate: Estimate


@dataclass
class Report:
    rows: list[Estimate]
    best_tier: str
    savings: dict[str, dict[str, float | None]]  # router -> {"95%": saving, ...}; None = not reached
    auc: dict[str, float]
    curves: dict[str, list[Estimate]] = field(default_factory=dict)
    tuned: dict[str, dict[str, Tuned]] = field(default_factory=dict)  # router -> {"95%": Tuned, ...}
    validation: int = 0  # decisions λ was chosen on (0: none, λ = 0)

    def row(self, policy: str) -> Estimate:
        return next(r for r in self.rows if r.policy == policy)

    def to_json(self) -> dict[str, object]:
        return {"rows": [asdict(r) for r in self.rows], "best_tier": self.best_tier, "savings": self.savings,
                "auc": self.auc, "validation_decisions": self.validation,
                "tuned": {name: {t: {"tilt": v.tilt, **asdict(v.estimate)} for t, v in by.items()}
                          for name, by in self.tuned.items()}}


# --- policies over logged feature rows ---------------------------------------------------------------


def _thinking_options(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(forced on, forced off) per row, from the role's thinking preference."""
    return x[:, THINKING_COLUMNS["on"]] > 0.5, x[:, THINKING_COLUMNS["off"]] > 0.5


def _one_hot(tier: np.ndarray, thinking: np.ndarray) -> np.ndarray:
    probs = np.zeros((len(tier), N_ACTIONS))
    probs[np.arange(len(tier)), tier * 2 + thinking.astype(int)] = 1.0
    return probs


def choose(model: RouterModel, x: np.ndarray, tilt: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(tier index, thinking) per feature row: the fitting tier of the highest probability minus
    ``tilt`` · its worst-case cost relative to the dearest tier's, thinking as the model and role say."""
    tier_p, think_p = model.predict(x)
    cost = np.expm1(x[:, COST_COLUMNS].astype(np.float64)) / 100.0
    score = tier_p - tilt * cost / np.maximum(cost.max(axis=1, keepdims=True), 1e-12)
    tier = np.where(fitting_tiers(x), score, -np.inf).argmax(axis=1)
    on, off = _thinking_options(x)
    return tier, on | (~off & (think_p[np.arange(len(tier)), tier] >= 0.5))


def model_policy(model: RouterModel, tilt: float = 0.0) -> Policy:
    def probs(d: Decisions) -> np.ndarray:
        return _one_hot(*choose(model, d.x, tilt))

    return probs


def fixed_tier_policy(tier_name: str) -> Policy:
    def probs(d: Decisions) -> np.ndarray:
        allowed = fitting_tiers(d.x)
        fallback = np.where(allowed, -d.x[:, FILL_COLUMNS], -np.inf).argmax(axis=1)  # largest window
        t = TIERS.index(tier_name)
        tier = np.where(allowed[:, t], t, fallback)
        _, off = _thinking_options(d.x)
        return _one_hot(tier, ~off)

    return probs


def uniform_policy(d: Decisions) -> np.ndarray:
    allowed = np.repeat(fitting_tiers(d.x), 2, axis=1)
    on, off = _thinking_options(d.x)
    thinking = np.array([th for _, th in ACTIONS])
    allowed &= ~(on[:, None] & ~thinking) & ~(off[:, None] & thinking)
    return allowed / allowed.sum(axis=1, keepdims=True)


# --- estimates ----------------------------------------------------------------------------------------


def estimate(name: str, d: Decisions, probs: np.ndarray | None) -> Estimate:
    """SNIPS estimate of a policy given its action probabilities (None: the logging policy itself)."""
    w = np.ones(len(d)) if probs is None else probs[np.arange(len(d)), d.action] / d.propensity
    total = w.sum()
    if total <= 0:
        return Estimate(name, math.nan, math.nan, math.nan, 0, 0.0)
    return Estimate(name, float(w @ d.success / total), float(w @ d.cost / total), float(w @ d.latency / total),
                    int((w > 0).sum()), float(total ** 2 / (w @ w)))


def curve(name: str, model: RouterModel, d: Decisions) -> list[Estimate]:
    return [estimate(f"{name}@{tilt:.3g}", d, model_policy(model, tilt)(d)) for tilt in TILTS]


def _envelope(points: list[Estimate]) -> list[tuple[float, float]]:
    """(cost, best success at that cost or less), cheapest first."""
    out: list[tuple[float, float]] = []
    for p in sorted((p for p in points if not math.isnan(p.success)), key=lambda p: p.cost):
        if not out or p.success > out[-1][1]:
            out.append((p.cost, p.success))
    return out


def cost_at(points: list[Estimate], target: float) -> float | None:
    """The least cost reaching ``target`` success (mixing two neighbouring policies), or None."""
    env = _envelope(points)
    for i, (c, s) in enumerate(env):
        if s >= target:
            if i == 0:
                return c
            c0, s0 = env[i - 1]
            return c0 + (target - s0) * (c - c0) / (s - s0)
    return None


def area(points: list[Estimate], cost_scale: float) -> float:
    """Area under the cost–quality envelope over normalised cost [0, 1]."""
    env = [(min(c / cost_scale, 1.0), s) for c, s in _envelope(points)]
    edges = [c for c, _ in env[1:]] + [1.0]
    return float(sum(s * max(hi - c, 0.0) for (c, s), hi in zip(env, edges)))


def _best_single(d: Decisions) -> Estimate:
    singles = [estimate(f"always-{t}", d, fixed_tier_policy(t)(d)) for t in TIERS]
    return max((s for s in singles if not math.isnan(s.success)), key=lambda s: s.success)


def tune(model: RouterModel, validation: Decisions, target: float) -> float:
    """The λ whose estimate on ``validation`` reaches ``target`` × the best single tier's success there at
    the least cost; 0 (the greedy router) when no λ reaches it."""
    best = _best_single(validation)
    reached = [(e.cost, tilt) for tilt in TILTS
               if not math.isnan((e := estimate("", validation, model_policy(model, tilt)(validation))).success)
               and e.success >= target * best.success]
    return min(reached)[1] if reached else 0.0


def evaluate(d: Decisions, candidate: RouterModel, current: RouterModel | None, *,
             validation: Decisions | None = None) -> Report:
    """Score the routers on ``d`` (the evaluation goals); λ for the savings is chosen on ``validation``."""
    routers = {"candidate": candidate, **({"current": current} if current is not None else {})}
    singles = [estimate(f"always-{t}", d, fixed_tier_policy(t)(d)) for t in TIERS]
    rows = [estimate(name, d, model_policy(m)(d)) for name, m in routers.items()]
    rows += [*singles, estimate("random", d, uniform_policy(d)), estimate("logged", d, None)]
    best = max((s for s in singles if not math.isnan(s.success)), key=lambda s: s.success)
    scale = max(s.cost for s in singles if not math.isnan(s.cost))
    curves = {name: curve(name, m, d) for name, m in routers.items()}
    tuned: dict[str, dict[str, Tuned]] = {}
    savings: dict[str, dict[str, float | None]] = {}
    for name, m in routers.items():
        tuned[name], savings[name] = {}, {}
        for t in TARGETS:
            tilt = tune(m, validation, t) if validation is not None and len(validation) else 0.0
            at = estimate(f"{name}, λ = {tilt:.3g}", d, model_policy(m, tilt)(d))
            tuned[name][f"{t:.0%}"] = Tuned(tilt, at)
            savings[name][f"{t:.0%}"] = _saving(at.cost, best.cost) if at.success >= t * best.success else None
    savings["single tiers"] = {f"{t:.0%}": _saving(cost_at(singles, t * best.success), best.cost) for t in TARGETS}
    auc = {name: area(points, scale) for name, points in {**curves, "single tiers": singles}.items()}
    return Report(rows, best.policy.removeprefix("always-"), savings, auc, curves, tuned,
                  len(validation) if validation is not None else 0)


def _saving(cost: float | None, reference: float) -> float | None:
    return None if cost is None else 1.0 - cost / reference


def render(report: Report) -> str:
    """The report as markdown: the table, then savings and areas."""
    lines = ["| policy | success | cost / decision (USD) | latency (s) | matched | ESS |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.policy} | {r.success:.3f} | {r.cost:.5f} | {r.latency:.1f} | {r.matched} | {r.ess:.0f} |"
              for r in report.rows]
    best = report.row(f"always-{report.best_tier}")
    chosen = (f"λ chosen on {report.validation} validation decisions of other goals" if report.validation
              else "no validation goals: λ = 0")
    lines += ["", (f"Best single tier: **{report.best_tier}** (success {best.success:.3f}, "
                  f"${best.cost:.5f} per decision)."), "",
              f"Routers at the cost weight λ for each target ({chosen}), scored on the evaluation goals:", "",
              "| router | target | λ | success | cost / decision (USD) | matched | ESS |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, by in report.tuned.items():
        lines += [f"| {name} | {t} | {v.tilt:.3g} | {v.estimate.success:.3f} | {v.estimate.cost:.5f} | "
                  f"{v.estimate.matched} | {v.estimate.ess:.0f} |" for t, v in by.items()]
    lines += ["", "| router | saving at 95% of its success | saving at 100% | area under cost–quality curve |",
              "| --- | ---: | ---: | ---: |"]
    for name, saving in report.savings.items():
        shown = [("not reached" if v is None else f"{v:.0%}") for v in saving.values()]
        lines.append(f"| {name} | {shown[0]} | {shown[1]} | {report.auc[name]:.3f} |")
    return "\n".join(lines)
