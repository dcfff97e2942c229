"""``mesh router train``: learn a router from logged decisions and export it as ONNX.

The model is a reward regressor over (context, action), fitted on logged decisions weighted by
their inverse propensity (clipped at ``clip``): the logging policy took its greedy action far more
often than the others, and the weights undo that, so the regressor is fitted as if every action had
been tried equally often in every context (the direct method with importance weights). An action is
(tier, thinking); it enters the regressor as a tier one-hot, the thinking switch and the chosen
tier's own fill and cost features, so what is learnt about "a nearly full window" or "a costly
call" carries across tiers.

The reward of a decision is ``success · w_success − cost_usd · w_cost − latency_s · w_latency``.
At inference the six predicted rewards r̂ become a distribution softmax(r̂ / temperature), with
tiers whose window does not fit masked out; the graph folds it into the model's two outputs,
P(tier) and P(thinking | tier), so a node never sees actions.

Needs the optional ``router`` extra (scikit-learn, skl2onnx); nodes only need onnxruntime.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from mesh.contracts.models import TIERS
from mesh.errors import RouterError
from mesh.router.dataset import ACTIONS, N_ACTIONS, Decisions
from mesh.router.features import (
    COST_COLUMNS,
    FEATURE_NAMES,
    FEATURE_VERSION,
    FILL_COLUMNS,
    FITS_COLUMNS,
    N_FEATURES,
    fitting_tiers,
)
from mesh.router.model import INPUT, META_FEATURE_VERSION, META_FEATURES, META_TIERS, META_VERSION, OUTPUTS

MIN_DECISIONS = 50
MASK = 1000.0  # subtracted from the reward of a tier whose window does not fit: its probability becomes 0
_EPS = 1e-6
_ROW = N_FEATURES + 6  # a regressor row: the context, then its action's tier fill and cost, tier one-hot, thinking


def _encodings() -> dict[str, np.ndarray]:
    """The constant matrices that turn a context into the model's inputs and its outputs into the
    model's answer; used alike by the scikit-learn reference and inside the exported graph."""
    rows_w = np.zeros((N_FEATURES, N_ACTIONS * _ROW), dtype=np.float32)
    rows_b = np.zeros(N_ACTIONS * _ROW, dtype=np.float32)
    mask_w = np.zeros((N_FEATURES, N_ACTIONS), dtype=np.float32)
    tier_sum = np.zeros((N_ACTIONS, len(TIERS)), dtype=np.float32)
    thinking_on = np.zeros((N_ACTIONS, len(TIERS)), dtype=np.float32)
    for k, (tier, thinking) in enumerate(ACTIONS):
        t, base = TIERS.index(tier), k * _ROW
        rows_w[np.arange(N_FEATURES), base + np.arange(N_FEATURES)] = 1.0
        rows_w[FILL_COLUMNS[t], base + N_FEATURES] = 1.0
        rows_w[COST_COLUMNS[t], base + N_FEATURES + 1] = 1.0
        rows_b[base + N_FEATURES + 2 + t] = 1.0
        rows_b[base + N_FEATURES + 5] = float(thinking)
        mask_w[FITS_COLUMNS[t], k] = MASK
        tier_sum[k, t] = 1.0
        thinking_on[k, t] = float(thinking)
    return {"rows_w": rows_w, "rows_b": rows_b, "mask_w": mask_w,
            "mask_b": np.full(N_ACTIONS, -MASK, dtype=np.float32), "tier_sum": tier_sum, "thinking_on": thinking_on}


ENC = _encodings()


def action_rows(x: np.ndarray) -> np.ndarray:
    """(N, N_FEATURES) contexts → (N · N_ACTIONS, _ROW) regressor rows, one per action."""
    return (x @ ENC["rows_w"] + ENC["rows_b"]).reshape(-1, _ROW)


@dataclass(frozen=True, slots=True)
class Reward:
    """Reward weights: per success, per USD, per second of latency."""

    success: float = 1.0
    cost: float = 10.0
    latency: float = 0.005

    def __call__(self, d: Decisions) -> np.ndarray:
        return self.success * d.success - self.cost * d.cost - self.latency * d.latency

    def baseline(self, x: np.ndarray) -> np.ndarray:
        """A per-context offset: minus the cost term of the cheapest fitting tier's worst-case call.
        The regressor learns rewards relative to it — which leaves every action's softmax probability
        unchanged — so a huge prompt's cost level is not something it must fit, and its outputs stay
        small enough for float32 to carry them exactly through a small temperature."""
        cost = np.expm1(x[:, COST_COLUMNS].astype(np.float64)) / 100.0
        return -self.cost * np.where(fitting_tiers(x), cost, np.inf).min(axis=1)


@dataclass(frozen=True, slots=True)
class TrainConfig:
    clip: float = 50.0  # largest inverse-propensity weight
    temperature: float = 0.05  # reward units per e-fold of probability
    estimators: int = 150
    depth: int = 4
    learning_rate: float = 0.1
    seed: int = 0


class SklearnModel:
    """The fitted regressor as a ``RouterModel``: the reference the ONNX export must match."""

    def __init__(self, regressor: Any, version: str, temperature: float, meta: dict[str, str]) -> None:
        self.regressor = regressor
        self.version = version
        self.temperature = temperature
        self.meta = meta

    def rewards(self, x: np.ndarray) -> np.ndarray:
        """Predicted reward of every action, relative to the context's baseline: (N, N_ACTIONS)."""
        return self.regressor.predict(action_rows(x)).reshape(len(x), N_ACTIONS)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = (self.rewards(x) + (x @ ENC["mask_w"] + ENC["mask_b"])) / self.temperature
        joint = np.exp(z - z.max(axis=1, keepdims=True))
        joint /= joint.sum(axis=1, keepdims=True)
        tiers = joint @ ENC["tier_sum"]
        return tiers, (joint @ ENC["thinking_on"]) / np.maximum(tiers, _EPS)


def require_extra() -> None:
    missing = [m for m in ("sklearn", "skl2onnx", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise RouterError(f"training routers needs the `router` extra ({', '.join(missing)} missing): "
                          "pip install 'mesh-agents[router]'")


def fit(data: Decisions, reward: Reward, *, version: str | None = None, config: TrainConfig = TrainConfig(),
        source: str = "ledger") -> SklearnModel:
    """Fit the inverse-propensity-weighted reward regressor on ``data``."""
    require_extra()
    from sklearn.ensemble import GradientBoostingRegressor  # type: ignore[import-untyped]

    if len(data) < MIN_DECISIONS:
        raise RouterError(f"{len(data)} decisions with outcomes; training needs at least {MIN_DECISIONS}")
    if len(np.unique(data.action)) < 2:
        raise RouterError("every logged decision took the same action, so nothing can be learnt about the "
                          "others: log with exploration (router_epsilon > 0) before training")
    rows = action_rows(data.x).reshape(len(data), N_ACTIONS, _ROW)[np.arange(len(data)), data.action]
    weights = np.minimum(1.0 / data.propensity, config.clip)
    regressor = GradientBoostingRegressor(n_estimators=config.estimators, max_depth=config.depth,
                                          learning_rate=config.learning_rate, subsample=0.8,
                                          random_state=config.seed)
    regressor.fit(rows, reward(data) - reward.baseline(data.x), sample_weight=weights / weights.mean())
    version = version or f"{source}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    meta = {"mesh.router.trained_on": f"{len(data)} decisions from {source}",
            "mesh.router.reward": str(asdict(reward)), "mesh.router.train_config": str(asdict(config))}
    return SklearnModel(regressor, version, config.temperature, meta)


def to_onnx(model: SklearnModel) -> bytes:
    """The ONNX graph: action rows → regressor → softmax over actions → (tier_probs, thinking_probs)."""
    require_extra()
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from skl2onnx import convert_sklearn  # type: ignore[import-untyped]
    from skl2onnx.common.data_types import FloatTensorType  # type: ignore[import-untyped]

    proto = convert_sklearn(model.regressor, initial_types=[("rows", FloatTensorType([None, _ROW]))],
                            target_opset={"": 17, "ai.onnx.ml": 3})
    graph = proto.graph
    (predicted,) = [o.name for o in graph.output]
    consts = {
        **ENC, "rows_shape": np.array([-1, _ROW], dtype=np.int64),
        "actions_shape": np.array([-1, N_ACTIONS], dtype=np.int64),
        "temperature": np.array(model.temperature, dtype=np.float32), "eps": np.array(_EPS, dtype=np.float32),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    node = helper.make_node
    before = [
        node("Gemm", [INPUT, "rows_w", "rows_b"], ["rows_flat"]),
        node("Reshape", ["rows_flat", "rows_shape"], ["rows"]),
    ]
    tiers, thinking = OUTPUTS
    after = [
        node("Reshape", [predicted, "actions_shape"], ["rewards"]),
        node("Gemm", [INPUT, "mask_w", "mask_b"], ["window_mask"]),
        node("Add", ["rewards", "window_mask"], ["masked"]),
        node("Div", ["masked", "temperature"], ["logits"]),
        node("Softmax", ["logits"], ["joint"], axis=1),
        node("MatMul", ["joint", "tier_sum"], [tiers]),
        node("MatMul", ["joint", "thinking_on"], ["thinking_joint"]),
        node("Max", [tiers, "eps"], ["tier_floor"]),
        node("Div", ["thinking_joint", "tier_floor"], [thinking]),
    ]
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend([*before, *body, *after])
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [None, N_FEATURES]))
    del graph.output[:]
    graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, len(TIERS)])
                        for name in OUTPUTS)
    helper.set_model_props(proto, {
        META_VERSION: model.version, META_FEATURE_VERSION: FEATURE_VERSION, META_TIERS: ",".join(TIERS),
        META_FEATURES: ",".join(FEATURE_NAMES), **model.meta,
    })
    onnx.checker.check_model(proto)
    return proto.SerializeToString()
