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
_EPS = 1e-6
_N_ACTION_FEATURES = 6  # fill and cost of the action's tier, tier one-hot, thinking


def _action_encoding() -> tuple[np.ndarray, np.ndarray]:
    """``x @ W + B`` gives, per row, the (N_ACTIONS × _N_ACTION_FEATURES) action features, flattened."""
    w = np.zeros((N_FEATURES, N_ACTIONS * _N_ACTION_FEATURES), dtype=np.float32)
    b = np.zeros(N_ACTIONS * _N_ACTION_FEATURES, dtype=np.float32)
    for k, (tier, thinking) in enumerate(ACTIONS):
        t, col = TIERS.index(tier), k * _N_ACTION_FEATURES
        w[FILL_COLUMNS[t], col] = 1.0
        w[COST_COLUMNS[t], col + 1] = 1.0
        b[col + 2 + t] = 1.0
        b[col + 5] = float(thinking)
    return w, b


ACTION_W, ACTION_B = _action_encoding()
# Rewards of actions on tiers whose window does not fit get MASK subtracted: such a tier gets
# probability 0 (when no tier fits, all are masked alike, which changes nothing).
MASK = 1000.0
MASK_W = np.zeros((N_FEATURES, N_ACTIONS), dtype=np.float32)
for _k, (_tier, _) in enumerate(ACTIONS):
    MASK_W[FITS_COLUMNS[TIERS.index(_tier)], _k] = MASK


def action_rows(x: np.ndarray) -> np.ndarray:
    """(N, N_FEATURES) contexts → (N · N_ACTIONS, N_FEATURES + 6) regressor rows, one per action."""
    n = len(x)
    extra = (x @ ACTION_W + ACTION_B).reshape(n, N_ACTIONS, _N_ACTION_FEATURES)
    tiled = np.repeat(x[:, None, :], N_ACTIONS, axis=1)
    return np.concatenate([tiled, extra], axis=2).reshape(n * N_ACTIONS, N_FEATURES + _N_ACTION_FEATURES)


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
        z = (self.rewards(x) + (x @ MASK_W - MASK)) / self.temperature
        joint = np.exp(z - z.max(axis=1, keepdims=True))
        joint = (joint / joint.sum(axis=1, keepdims=True)).reshape(-1, len(TIERS), 2)
        tiers = joint.sum(axis=2)
        return tiers, joint[:, :, 1] / np.maximum(tiers, _EPS)


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
    rows = action_rows(data.x).reshape(len(data), N_ACTIONS, -1)[np.arange(len(data)), data.action]
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

    width = N_FEATURES + _N_ACTION_FEATURES
    proto = convert_sklearn(model.regressor, initial_types=[("rows", FloatTensorType([None, width]))],
                            target_opset={"": 17, "ai.onnx.ml": 3})
    graph = proto.graph
    (predicted,) = [o.name for o in graph.output]
    consts = {
        "action_w": ACTION_W, "action_b": ACTION_B,
        "action_shape": np.array([-1, N_ACTIONS, _N_ACTION_FEATURES], dtype=np.int64),
        "tile": np.array([1, N_ACTIONS, 1], dtype=np.int64), "one": np.array([1], dtype=np.int64),
        "rows_shape": np.array([-1, width], dtype=np.int64),
        "actions_shape": np.array([-1, N_ACTIONS], dtype=np.int64),
        "mask_w": MASK_W, "mask": np.array(MASK, dtype=np.float32),
        "temperature": np.array(model.temperature, dtype=np.float32),
        "tier_by_thinking": np.array([-1, len(TIERS), 2], dtype=np.int64),
        "thinking_axis": np.array([2], dtype=np.int64), "thinking_on": np.array(1, dtype=np.int64),
        "eps": np.array(_EPS, dtype=np.float32),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    node = helper.make_node
    before = [
        node("MatMul", [INPUT, "action_w"], ["action_lin"]),
        node("Add", ["action_lin", "action_b"], ["action_flat"]),
        node("Reshape", ["action_flat", "action_shape"], ["action_extra"]),
        node("Unsqueeze", [INPUT, "one"], ["context"]),
        node("Tile", ["context", "tile"], ["contexts"]),
        node("Concat", ["contexts", "action_extra"], ["rows3"], axis=2),
        node("Reshape", ["rows3", "rows_shape"], ["rows"]),
    ]
    tiers, thinking = OUTPUTS
    after = [
        node("Reshape", [predicted, "actions_shape"], ["rewards"]),
        node("MatMul", [INPUT, "mask_w"], ["fit_bonus"]),
        node("Sub", ["fit_bonus", "mask"], ["window_mask"]),
        node("Add", ["rewards", "window_mask"], ["masked"]),
        node("Div", ["masked", "temperature"], ["logits"]),
        node("Softmax", ["logits"], ["joint"], axis=1),
        node("Reshape", ["joint", "tier_by_thinking"], ["joint3"]),
        node("ReduceSum", ["joint3", "thinking_axis"], [tiers], keepdims=0),
        node("Gather", ["joint3", "thinking_on"], ["thinking_joint"], axis=2),
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
