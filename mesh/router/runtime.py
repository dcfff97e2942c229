"""The router every worker and the planner run: features → model → hard constraints → ε-exploration.

A decision's action is the pair (tier, thinking). The model proposes ``tier_probs`` and, per tier,
P(thinking on); the greedy action is the most probable tier that the hard constraints allow, with
thinking on when that tier's thinking probability is at least one half (unless the role spec fixes
thinking). With probability ``epsilon`` the router explores instead: a uniformly random allowed tier
and, when the role leaves thinking to the router, a random thinking switch. The logged
``propensity`` is the probability this policy had of taking exactly the logged action —

    (1 − ε) · [action is the greedy one] + ε / (allowed tiers × thinking choices)

— which is what lets ``mesh router train`` and ``eval`` reweight logged decisions without bias.

The model is swapped atomically: ``decide`` reads ``self._model`` once, so a decision runs wholly on
the old model or wholly on the new one, and a swap never blocks a decision.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from mesh.contracts.models import TIERS, RouteDecision
from mesh.errors import ModelRejected
from mesh.router.features import FEATURE_VERSION, RouteContext, featurize
from mesh.router.model import DEFAULT_MODEL, OnnxModel, RouterModel
from mesh.router.policy import RulePolicy, allowed_tiers, thinking_forced

log = logging.getLogger(__name__)


class Router:
    """A ``RoutePolicy`` around a swappable model; without a model it decides by ``RulePolicy``."""

    def __init__(self, model: RouterModel | None, *, epsilon: float = 0.05, seed: int | None = None) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], not {epsilon}")
        self._model = model
        self.epsilon = epsilon
        self._rng = random.Random(seed)
        self._rules = RulePolicy()

    @property
    def model(self) -> RouterModel | None:
        return self._model

    @property
    def version(self) -> str:
        model = self._model
        return model.version if model is not None else self._rules.version

    def swap(self, model: RouterModel) -> None:
        """Use ``model`` from the next decision on (one reference assignment: atomic)."""
        old, self._model = self._model, model
        log.info("router model %s → %s", old.version if old else self._rules.version, model.version)

    def decide(self, ctx: RouteContext) -> RouteDecision:
        model = self._model
        if model is None:
            return self._rules.decide(ctx)
        x = featurize(ctx)
        tier_p, think_p = model.predict(x)
        probs = dict(zip(TIERS, tier_p[0].tolist(), strict=True))
        thinks = dict(zip(TIERS, think_p[0].tolist(), strict=True))
        allowed = allowed_tiers(ctx)
        greedy = max(allowed.tiers, key=probs.__getitem__)
        forced = thinking_forced(ctx)
        greedy_thinking = forced if forced is not None else thinks[greedy] >= 0.5
        choices = 1 if forced is not None else 2
        tier, thinking, explored = greedy, greedy_thinking, False
        if self.epsilon and self._rng.random() < self.epsilon:
            tier = self._rng.choice(allowed.tiers)
            thinking = forced if forced is not None else self._rng.random() < 0.5
            explored = True
        uniform = self.epsilon / (len(allowed.tiers) * choices)
        propensity = uniform + ((1.0 - self.epsilon) if (tier, thinking) == (greedy, greedy_thinking) else 0.0)
        return RouteDecision(
            tier=tier,  # type: ignore[arg-type]
            thinking=thinking,
            probabilities=probs,
            thinking_probability=min(max(thinks[tier], 0.0), 1.0),
            propensity=propensity,
            explored=explored,
            overridden_by=allowed.excluded.get(max(TIERS, key=probs.__getitem__)),
            model_version=model.version,
            feature_version=FEATURE_VERSION,
            features=x[0].tolist(),
        )


def default_router(*, epsilon: float = 0.05, model_path: Path | None = None, seed: int | None = None) -> Router:
    """The router a node starts with: the packaged default model (or ``model_path``), loaded and warmed
    up now. A model that cannot load is logged as an error and the node routes by rules until a good
    model is published."""
    path = model_path or DEFAULT_MODEL
    try:
        model: RouterModel | None = OnnxModel.from_file(path)
    except ModelRejected as exc:
        log.error("router model %s cannot be used, routing by rules until one is published: %s", path, exc)
        model = None
    return Router(model, epsilon=epsilon, seed=seed)
