"""The router runtime without a bus: feature spec, model checks, hard constraints, exploration and
propensities, atomic swaps, and what the packaged default model does in the sim world."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mesh.contracts import TIERS
from mesh.errors import ModelRejected
from mesh.roles.spec import default_nodes_dir, load_specs
from mesh.router.features import (
    FEATURE_NAMES,
    FEATURE_VERSION,
    N_FEATURES,
    deadline_pressure,
    featurize,
    text_features,
)
from mesh.router.model import DEFAULT_MODEL, OnnxModel
from mesh.router.policy import RulePolicy
from mesh.router.runtime import Router, default_router
from mesh.router.simenv import SimRouting, always_policy, routed_by, score
from tests.routerkit import context, model_variant


class Fixed:
    """A model with fixed outputs, to test what the runtime does around any model."""

    def __init__(self, tiers: list[float], thinking: float = 0.9, version: str = "fixed") -> None:
        self.tiers, self.thinking, self.version = np.array([tiers]), np.full((1, 3), thinking), version

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert x.shape == (1, N_FEATURES) and x.dtype == np.float32
        return self.tiers, self.thinking


@pytest.fixture(scope="module")
def default() -> OnnxModel:
    return OnnxModel.from_file(DEFAULT_MODEL)


# --- features ------------------------------------------------------------------------------------


def test_features_follow_the_versioned_spec() -> None:
    x = featurize(context("coder", prompt=6000, output=8192, tools=3, instruction="Implement the spec"))
    assert x.shape == (1, N_FEATURES) == (1, len(FEATURE_NAMES)) and x.dtype == np.float32
    row = dict(zip(FEATURE_NAMES, x[0].tolist(), strict=True))
    assert row["kind_code"] == 1.0 and row["kind_other"] == 0.0 and row["tools"] == 3.0
    assert row["fits_edge"] == 0.0 and row["fits_long_context"] == 1.0  # 14192 needed, edge window 8192
    assert row["fill_edge"] == pytest.approx(14192 / 8192, rel=1e-6)
    assert row["log_cost_long_context"] > row["log_cost_swarm"] > row["log_cost_edge"] > 0
    assert featurize(context(role="translator"))[0][FEATURE_NAMES.index("kind_other")] == 1.0
    # hashed text: deterministic across calls (CRC-32, not Python's salted hash), normalised, sensitive
    assert text_features("Review the login code") == text_features("review the LOGIN code!")
    assert np.linalg.norm(text_features("Review the login code")) == pytest.approx(1.0)
    assert text_features("Review the login code") != text_features("Research prior art")
    assert text_features("") == [0.0] * 16
    assert (deadline_pressure(None), deadline_pressure(3600), deadline_pressure(900), deadline_pressure(-5)) == (
        0.0, 0.0, 0.5, 1.0)


# --- model checks ----------------------------------------------------------------------------------


def test_the_packaged_model_is_small_versioned_and_warm(default: OnnxModel) -> None:
    assert default.version == "sim-default-1"
    assert default.metadata["mesh.router.feature_version"] == FEATURE_VERSION
    assert default.metadata["mesh.router.tiers"] == ",".join(TIERS)
    assert DEFAULT_MODEL.stat().st_size < 512 * 1024
    tiers, thinking = default.predict(featurize(context()))
    assert tiers.shape == thinking.shape == (1, 3) and tiers.sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(("data", "reason"), [
    (b"\x08\x01garbage, not a protobuf", "not a loadable ONNX model"),
    (model_variant(feature_version="route-f0"), "trained on feature spec 'route-f0'"),
    (model_variant(rename_output="tier_scores"), "expected tier_probs, thinking_probs"),
])
def test_a_corrupt_or_incompatible_model_is_rejected_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ModelRejected, match=reason):
        OnnxModel.load(data)


def test_a_node_starts_on_rules_when_its_model_cannot_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    with caplog.at_level(logging.ERROR):
        router = default_router(model_path=broken)
    assert router.model is None and router.version == RulePolicy.version
    assert "cannot be used, routing by rules" in caplog.text
    assert router.decide(context()).model_version == RulePolicy.version
    assert default_router().version == "sim-default-1"


# --- decisions -------------------------------------------------------------------------------------


def test_hard_constraints_override_the_model() -> None:
    router = Router(Fixed([0.7, 0.2, 0.1]), epsilon=0.0)  # the model wants edge
    fits = router.decide(context(prompt=1000))
    assert (fits.tier, fits.overridden_by, fits.propensity, fits.explored) == ("edge", None, 1.0, False)
    too_big = router.decide(context(prompt=5000))  # 5000 + 4096 > edge's 8192 window
    assert (too_big.tier, too_big.overridden_by) == ("long_context", "window")
    tripped = router.decide(context(prompt=1000, available={"edge": False, "long_context": True, "swarm": True}))
    assert (tripped.tier, tripped.overridden_by) == ("long_context", "circuit")
    broke = Router(Fixed([0.1, 0.7, 0.2]), epsilon=0.0).decide(context(prompt=1000, remaining_usd=0.02))
    assert (broke.tier, broke.overridden_by) == ("edge", "budget")  # long/swarm worst cases exceed $0.02
    huge = router.decide(context(role="researcher", prompt=2_000_000, tools=0))  # fits nowhere
    assert huge.tier == "long_context" and huge.overridden_by == "window"  # the largest window; packing summarises
    assert fits.probabilities == pytest.approx({"edge": 0.7, "long_context": 0.2, "swarm": 0.1})
    assert fits.feature_version == FEATURE_VERSION and len(fits.features) == N_FEATURES
    assert fits.model_version == "fixed"


def test_the_role_spec_can_fix_thinking() -> None:
    router = Router(Fixed([0.1, 0.8, 0.1], thinking=0.2), epsilon=0.0)
    assert router.decide(context(thinking="auto")).thinking is False
    assert router.decide(context(thinking="on")).thinking is True
    assert Router(Fixed([0.1, 0.8, 0.1], thinking=0.9), epsilon=0.0).decide(context(thinking="off")).thinking is False


def test_exploration_logs_the_true_propensity_of_each_action() -> None:
    """Every logged propensity must equal the frequency with which the router takes that action."""
    router = Router(Fixed([0.1, 0.7, 0.2], thinking=0.9), epsilon=0.3, seed=42)
    ctx = context(prompt=1000)  # all three tiers allowed, thinking left to the router: 6 actions
    n = 20_000
    decisions = [router.decide(ctx) for _ in range(n)]
    counts = Counter((d.tier, d.thinking) for d in decisions)
    logged = {(d.tier, d.thinking): d.propensity for d in decisions}
    assert len(counts) == 6
    assert logged[("long_context", True)] == pytest.approx(0.7 + 0.3 / 6)
    assert logged[("edge", False)] == pytest.approx(0.3 / 6)
    for action, p in logged.items():
        assert counts[action] / n == pytest.approx(p, abs=0.01), action
    assert all(d.explored for d in decisions if (d.tier, d.thinking) != ("long_context", True))
    # exploration stays inside the hard constraints
    assert {d.tier for d in (router.decide(context(prompt=5000)) for _ in range(300))} == {"long_context", "swarm"}


def test_a_swap_is_atomic_for_concurrent_decisions(default: OnnxModel) -> None:
    """Decisions from several threads while the model is swapped back and forth: none fails, none is lost,
    each ran wholly on one model."""
    other = OnnxModel.load(model_variant(version="sim-default-1b"))
    router = Router(default, epsilon=0.1, seed=1)
    results: list[list[str]] = [[] for _ in range(4)]
    done = threading.Event()

    def work(out: list[str]) -> None:
        while not done.is_set() or len(out) < 500:
            d = router.decide(context(prompt=1500 + len(out)))
            assert d.tier in TIERS and 0 < d.propensity <= 1
            out.append(d.model_version)

    threads = [threading.Thread(target=work, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for i in range(200):
        router.swap(other if i % 2 == 0 else default)
    done.set()
    for t in threads:
        t.join(timeout=60)
    versions = Counter(v for r in results for v in r)
    assert set(versions) <= {"sim-default-1", "sim-default-1b"} and sum(versions.values()) >= 2000


# --- the packaged model in the sim world ------------------------------------------------------------


def test_the_default_model_routes_sensibly_in_the_sim_world(default: OnnxModel) -> None:
    router = Router(default, epsilon=0.0)
    # a context only the long-context tier can hold, and a big one the swarm's window holds but crowds
    assert router.decide(context("researcher", prompt=400_000, tools=0, swarm_capable=True)).tier == "long_context"
    assert router.decide(context("researcher", prompt=200_000, tools=0, swarm_capable=True)).tier == "long_context"
    # small steps go to a cheaper tier than long_context wherever the sim world says it does as well
    assert router.decide(context("coder", prompt=6000, output=8192, tools=3)).tier == "swarm"
    # against always using one tier, on fresh sim goals (the sim world's expected values)
    sim = SimRouting(load_specs(default_nodes_dir()), seed=7)
    mine = score(sim, routed_by(router), 40, start=50_000)
    long = score(sim, always_policy("long_context"), 40, start=50_000)
    edge = score(sim, always_policy("edge"), 40, start=50_000)
    assert mine.success >= 0.95 * long.success and mine.cost < long.cost
    assert mine.success > edge.success + 0.1
