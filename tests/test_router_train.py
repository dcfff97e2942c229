"""Learning routers from a ledger: the decision/outcome join, IPS-weighted training, ONNX export that
matches scikit-learn, off-policy evaluation, and `mesh router simulate | train | eval` as a user runs them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from mesh.cli.main import main
from mesh.contracts import (
    BackendCall,
    Event,
    RouteDecided,
    RouteDecision,
    StepCompleted,
    StepFailed,
    StepQuality,
    StepStarted,
    Usage,
)
from mesh.errors import RouterError
from mesh.roles.spec import default_nodes_dir, load_specs
from mesh.router.dataset import ACTIONS, action_of, load_decisions
from mesh.router.evaluate import TILTS, evaluate, render, tune
from mesh.router.features import FEATURE_VERSION, N_FEATURES, featurize
from mesh.router.model import DEFAULT_MODEL, OnnxModel
from mesh.router.simenv import SimRouting, uniform_policy, write_ledger
from mesh.router.train import Reward, TrainConfig, fit, to_onnx
from mesh.store import Ledger
from mesh.store.export import export_parquet
from tests.routerkit import context

pytestmark = pytest.mark.timeout(180)
SMALL = TrainConfig(estimators=30, depth=3)
T0 = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def sim_ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ledger of 120 sim goals routed uniformly at random (about 2,000 decisions)."""
    path = tmp_path_factory.mktemp("router") / "ledger.duckdb"
    sim = SimRouting(load_specs(default_nodes_dir()), seed=3)
    write_ledger(path, sim.run(120, uniform_policy(3)))
    return path


def _decided(at: datetime, step: str, tier: str, *, event_id: str, propensity: float = 0.5,
             feature_version: str = FEATURE_VERSION, attempt: int = 1) -> RouteDecided:
    decision = RouteDecision(tier=tier, thinking=True, propensity=propensity, model_version="m1",  # type: ignore[arg-type]
                             feature_version=feature_version, features=featurize(context())[0].tolist())
    return RouteDecided(event_id=event_id, goal_id="g1", at=at, step_id=step, role="tester", attempt=attempt,
                        decision=decision)


def _call(at: datetime, event_id: str, cost: float) -> BackendCall:
    return BackendCall(event_id=event_id, goal_id="g1", at=at, step_id="test-1", tier="swarm", model="m",
                       usage=Usage(cost_usd=cost, calls=1))


def test_decisions_are_joined_with_the_outcome_of_the_attempt_they_routed(tmp_path: Path) -> None:
    s = timedelta(seconds=1)
    step = {"goal_id": "g1", "step_id": "test-1", "role": "tester"}
    events: list[Event] = [
        StepStarted(event_id="e1", at=T0, attempt=1, **step),
        _decided(T0 + s, "test-1", "edge", event_id="d1"),
        _call(T0 + 2 * s, "c1", 0.5),  # work of a delivery that crashed: redelivered below
        _decided(T0 + 3 * s, "test-1", "swarm", event_id="d1b", propensity=0.25),
        _call(T0 + 4 * s, "c2", 0.01),
        _call(T0 + 5 * s, "c3", 0.02),
        StepFailed(event_id="f1", at=T0 + 6 * s, attempt=1, error="weak", **step),
        _decided(T0 + 7 * s, "test-1", "long_context", event_id="d2", attempt=2),
        _call(T0 + 8 * s, "c4", 0.04),
        StepCompleted(event_id="k2", at=T0 + 10 * s, attempt=2, **step),
        _decided(T0 + 11 * s, "plan", "long_context", event_id="dp"),  # the planner's: no step outcome
        _decided(T0 + 12 * s, "test-1", "edge", event_id="old", feature_version="route-f0"),
    ]
    path = tmp_path / "ledger.duckdb"
    with Ledger(path) as ledger:
        ledger.ingest([(i + 1, f"mesh.event.g1.{e.type}", e) for i, e in enumerate(events)])
    d = load_decisions(path)
    assert [ACTIONS[a] for a in d.action] == [("swarm", True), ("long_context", True)]
    assert d.success.tolist() == [0.0, 1.0]
    assert d.cost.tolist() == pytest.approx([0.03, 0.04])  # the crashed delivery's call is not the redelivery's
    assert d.latency.tolist() == pytest.approx([3.0, 3.0])
    assert d.propensity.tolist() == [0.25, 0.5] and d.x.shape == (2, N_FEATURES)
    with Ledger(path) as ledger:
        export_parquet(ledger, tmp_path / "export")
    from_parquet = load_decisions(tmp_path / "export")  # a `mesh ledger export --parquet` directory
    assert from_parquet.cost.tolist() == pytest.approx(d.cost.tolist())
    with pytest.raises(RouterError, match="lacks route_decisions.parquet"):
        load_decisions(tmp_path)


def test_a_decision_succeeds_only_when_the_work_it_routed_was_not_judged_bad(tmp_path: Path) -> None:
    """The router learns from quality: a coder attempt that completed but whose workspace the next test run
    failed counts as a failure; one nothing judged counts as its completion."""
    s = timedelta(seconds=1)
    events: list[Event] = []
    for i, (code, grade) in enumerate((("code-a", 0.0), ("code-b", 1.0), ("code-c", None))):
        t = T0 + 10 * i * s
        events += [_decided(t, code, "swarm", event_id=f"d{i}"),
                   StepCompleted(event_id=f"k{i}", goal_id="g1", at=t + s, step_id=code, role="coder", attempt=1)]
        if grade is not None:
            events.append(StepCompleted(event_id=f"t{i}", goal_id="g1", at=t + 2 * s, step_id=f"test-{i}",
                                        role="tester", verdict="approve" if grade else "changes_requested",
                                        quality=StepQuality(grade=grade, source="tests", exit_code=0 if grade else 1,
                                                            judged=[code])))
    path = tmp_path / "ledger.duckdb"
    with Ledger(path) as ledger:
        ledger.ingest([(i + 1, f"mesh.event.g1.{e.type}", e) for i, e in enumerate(events)])
    d = load_decisions(path)
    assert d.success.tolist() == [0.0, 1.0, 1.0]
    assert d.quality[:2].tolist() == [0.0, 1.0] and np.isnan(d.quality[2])


def test_the_sim_ledger_has_every_attempt_with_its_outcome(sim_ledger: Path) -> None:
    d = load_decisions(sim_ledger)
    with Ledger(sim_ledger, read_only=True) as ledger:
        attempts, completed = ledger.cursor().execute(
            "SELECT count(*), count(*) FILTER (status = 'completed') FROM steps").fetchone()  # type: ignore[misc]
    assert len(d) == attempts > 1500 and d.success.sum() == completed
    assert set(d.action.tolist()) == set(range(len(ACTIONS)))  # uniform logging tried every action
    train, held = d.split(0.25)
    assert len(train) + len(held) == len(d) and not set(train.goal_id) & set(held.goal_id)
    assert 0.15 < len(held) / len(d) < 0.35
    assert held.split(0.25)[1].goal_id.tolist() == held.goal_id.tolist()  # the split is a pure function of the goal


def test_train_export_load_reproduces_the_trained_model(sim_ledger: Path) -> None:
    train, held = load_decisions(sim_ledger).split(0.25)
    model = fit(train, Reward(), version="test-1", config=SMALL)
    loaded = OnnxModel.load(to_onnx(model))
    assert loaded.version == "test-1" and "decisions from ledger" in loaded.metadata["mesh.router.trained_on"]
    rng = np.random.default_rng(0)
    unseen = [featurize(context(role, prompt=int(rng.integers(200, 900_000)), difficulty=float(rng.random()),
                                fan_out=int(rng.integers(1, 6)), attempt=int(rng.integers(1, 4)), thinking=think))
              for role in ("researcher", "coder", "reviewer", "tester", "translator") for think in ("on", "off", "auto")
              for _ in range(12)]
    rows = np.concatenate([held.x, *unseen])
    for got, want in zip(loaded.predict(rows), model.predict(rows), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    tiers, thinking = loaded.predict(held.x)
    assert np.allclose(tiers.sum(axis=1), 1.0, atol=1e-5) and thinking.min() >= 0 and thinking.max() <= 1


def test_training_needs_exploration(sim_ledger: Path) -> None:
    d = load_decisions(sim_ledger)
    only_one = d.subset(d.action == action_of("long_context", True))
    with pytest.raises(RouterError, match="same action"):
        fit(only_one, Reward(), config=SMALL)


def test_eval_scores_every_policy_off_policy(sim_ledger: Path) -> None:
    train, held = load_decisions(sim_ledger).split(0.25)
    candidate = OnnxModel.load(to_onnx(fit(train, Reward(), config=SMALL)))
    report = evaluate(held, candidate, OnnxModel.from_file(DEFAULT_MODEL))
    names = [r.policy for r in report.rows]
    assert names == ["candidate", "current", "always-edge", "always-long_context", "always-swarm", "random", "logged"]
    logged = report.row("logged")
    assert (logged.success, logged.matched) == (pytest.approx(held.success.mean()), len(held))
    # the log is uniformly random, so "random" re-weights it (almost: budgets narrowed some logged choices)
    assert report.row("random").success == pytest.approx(logged.success, abs=0.03)
    # the sim world's tiers in the estimates: edge is the weakest and cheapest where it fits
    edge, long = report.row("always-edge"), report.row("always-long_context")
    assert edge.success < long.success and edge.cost < long.cost
    assert report.best_tier in ("long_context", "swarm")
    assert set(report.savings) == set(report.auc) == {"candidate", "current", "single tiers"}
    assert all(0 < a <= 1 for a in report.auc.values())
    table = render(report)
    assert "| candidate |" in table and "saving at 95%" in table


def test_the_cost_weight_is_chosen_on_validation_goals_and_scored_on_others(sim_ledger: Path) -> None:
    train, held = load_decisions(sim_ledger).split(0.5)
    validation, evaluation = held.halves()
    assert len(validation) + len(evaluation) == len(held) and not set(validation.goal_id) & set(evaluation.goal_id)
    assert 0.3 < len(validation) / len(held) < 0.7
    candidate = OnnxModel.load(to_onnx(fit(train, Reward(), config=SMALL)))
    report = evaluate(evaluation, candidate, None, validation=validation)
    chosen = report.tuned["candidate"]["95%"]
    assert report.validation == len(validation) and chosen.tilt == tune(candidate, validation, 0.95)
    # the router at that λ is scored on the evaluation goals; the saving counts only if it reaches 95% there
    assert chosen.estimate.success == evaluate(evaluation, candidate, None).curves["candidate"][
        TILTS.index(chosen.tilt)].success
    best = report.row(f"always-{report.best_tier}")
    saving = report.savings["candidate"]["95%"]
    assert (saving is None) == (chosen.estimate.success < 0.95 * best.success)
    assert "λ chosen on" in render(report)


def test_mesh_router_simulate_train_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger, model = tmp_path / "ledger.duckdb", tmp_path / "candidate.onnx"

    def mesh(*argv: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            main(["router", *argv])
        out = capsys.readouterr()
        assert exit_.value.code == 0, out.err
        return out.out

    assert "goals" in mesh("simulate", "--ledger", str(ledger), "--goals", "60", "--policy", "uniform", "--seed", "5")
    assert "events of 40 goals" in mesh("simulate", "--ledger", str(ledger), "--goals", "40", "--start", "60",
                                       "--epsilon", "0.3")  # more, logged by the packaged router with exploration
    out = mesh("train", "--ledger", str(ledger), "--out", str(model), "--version", "cli-1", "--estimators", "20",
               "--depth", "3", "--w-cost", "20")
    assert "trained cli-1" in out and OnnxModel.from_file(model).version == "cli-1"
    table = mesh("eval", "--ledger", str(ledger), "--candidate", str(model))
    assert "held-out decisions" in table and "| always-swarm |" in table and "| current |" in table
