"""bench/router: the ONNX router's decision latency vs the same model in scikit-learn, and the
train → eval loop on ledger data from the sim world, in one run.

    (1) latency     one model trained by ``mesh router train`` on a sim ledger, run two ways inside the
                    same ``Router.decide`` (features → model → hard constraints → ε-exploration →
                    ``RouteDecision``): its ONNX export on onnxruntime (1 intra-op, 1 inter-op thread)
                    and the fitted scikit-learn estimator it was exported from. Contexts are real step
                    attempts of sim goals; the two paths alternate in rounds so machine load hits both.
                    Each decision is timed on its own (``perf_counter_ns``), feature extraction included.
    (2) acceptance  ``mesh router simulate`` writes a ledger of sim goals routed by the packaged router
                    with ε-exploration, ``mesh router train`` learns a candidate from 80% of the goals,
                    ``mesh router eval`` chooses the cost weight λ on half of the other 20% (validation
                    goals) and scores on the rest (off-policy). The headline is the ground truth: the
                    sim world's own expected values score the same policies — the candidate at that λ
                    included — on fresh goals, with an oracle that knows the true success
                    probabilities (the best any router can do); the off-policy estimate of the same
                    policy is shown beside it with its bias.

    .venv/bin/python -m bench.router            # writes the "router" section of bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.results import write_section
from mesh.contracts import TIERS, RouteDecision
from mesh.roles.spec import default_nodes_dir, load_specs
from mesh.router.dataset import load_decisions
from mesh.router.evaluate import choose, evaluate
from mesh.router.features import RouteContext, featurize
from mesh.router.model import DEFAULT_MODEL, OnnxModel
from mesh.router.runtime import Router
from mesh.router.simenv import (
    Decide,
    Score,
    SimCase,
    SimRouting,
    always_policy,
    oracle_policy,
    routed_by,
    score,
    uniform_policy,
    write_ledger,
)
from mesh.router.train import Reward, TrainConfig, fit, to_onnx

ROOT = Path(__file__).resolve().parent.parent


def contexts(sim: SimRouting, goals: int) -> list[RouteContext]:
    router = Router(OnnxModel.from_file(DEFAULT_MODEL), epsilon=0.2, seed=1)
    return [a.case.ctx for a in sim.run(goals, routed_by(router), start=900_000)]


def timed(step: Callable[[RouteContext], object], ctxs: list[RouteContext], n: int) -> np.ndarray:
    """µs per call of ``step``, each call timed on its own."""
    out = np.empty(n)
    for i, ctx in zip(range(n), itertools.cycle(ctxs), strict=False):
        t = time.perf_counter_ns()
        step(ctx)
        out[i] = time.perf_counter_ns() - t
    return out / 1000.0


@dataclass
class Latency:
    """Per path (name → (p50 µs, p99 µs, calls/s)), and what the model and the run were."""

    paths: dict[str, tuple[float, float, float]]
    calls: dict[str, int]
    trees: int
    depth: int
    trained_on: int
    contexts: int
    rounds: int
    load: tuple[float, float]

    def ratio(self, kind: str) -> tuple[float, float]:
        """scikit-learn / ONNX at p50 and p99 for ``kind`` (`Router.decide` or features + model)."""
        on, sk = self.paths[f"{kind}, ONNX"], self.paths[f"{kind}, scikit-learn"]
        return sk[0] / on[0], sk[1] / on[1]


def latency_figures(sim: SimRouting, decisions: int, rounds: int, tmp: Path) -> Latency:
    ledger = tmp / "latency.duckdb"
    write_ledger(ledger, sim.run(300, uniform_policy(11)))
    data = load_decisions(ledger)
    sk = fit(data, Reward(), version="bench", config=TrainConfig(estimators=100))  # the default model's size
    onnx = OnnxModel.load(to_onnx(sk))
    ctxs = contexts(sim, 150)
    paths: dict[str, Callable[[RouteContext], object]] = {
        "`Router.decide`, ONNX": Router(onnx, epsilon=0.05, seed=3).decide,
        "`Router.decide`, scikit-learn": Router(sk, epsilon=0.05, seed=3).decide,
        "features + model, ONNX": lambda ctx: onnx.predict(featurize(ctx)),
        "features + model, scikit-learn": lambda ctx: sk.predict(featurize(ctx)),
    }
    for step in paths.values():  # warm every path before timing
        timed(step, ctxs, 200)
    runs: dict[str, list[np.ndarray]] = {name: [] for name in paths}
    per_round = decisions // rounds
    load_before = os.getloadavg()[0]
    for _ in range(rounds):  # alternate, so load on the machine hits every path alike
        for name, step in paths.items():
            runs[name].append(timed(step, ctxs, per_round if "ONNX" in name else max(per_round // 10, 100)))
    t = {k: np.concatenate(v) for k, v in runs.items()}
    return Latency(
        paths={k: (float(np.percentile(v, 50)), float(np.percentile(v, 99)), 1e6 / float(v.mean()))
               for k, v in t.items()},
        calls={k: len(v) for k, v in t.items()}, trees=sk.regressor.n_estimators_, depth=sk.regressor.max_depth,
        trained_on=len(data), contexts=len(ctxs), rounds=rounds, load=(load_before, os.getloadavg()[0]))


def latency(sim: SimRouting, decisions: int, rounds: int, tmp: Path) -> str:
    lat = latency_figures(sim, decisions, rounds, tmp)
    rows = [f"| {name} | {lat.calls[name]} | {p50:.1f} µs | {p99:.1f} µs | {rate:,.0f} |"
            for name, (p50, p99, rate) in lat.paths.items()]

    def ratio(kind: str) -> str:
        p50, p99 = lat.ratio(kind)
        return f"{p50:.1f}× at p50, {p99:.1f}× at p99"

    return "\n".join([
        (f"Model: {lat.trees} boosted trees (depth {lat.depth}) over 6 (tier, "
         f"thinking) actions, trained on {lat.trained_on} sim decisions; {lat.contexts} distinct contexts from sim "
         f"goals. `Router.decide` is the whole decision (features, model, hard constraints, ε = 0.05 exploration, "
         f"the `RouteDecision`); each call timed on its own, {rounds} alternating rounds. Load average of the "
         f"machine (2 cores, shared): {lat.load[0]:.1f} before, {lat.load[1]:.1f} after."), "",
        "| path | calls | p50 | p99 | calls/s (1 thread) |", "| --- | ---: | ---: | ---: | ---: |", *rows, "",
        (f"ONNX vs scikit-learn — whole decision: **{ratio('`Router.decide`')}**; features + model: "
         f"{ratio('features + model')}. ONNX decision p99: {lat.paths['`Router.decide`, ONNX'][1]:.0f} µs "
         "(target ≤ 100 µs)."),
    ])


def mesh(*argv: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")} | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "mesh", *argv], env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise SystemExit(f"mesh {' '.join(argv)} failed:\n{done.stderr}")
    return done.stdout


def tilted(model: OnnxModel, tilt: float) -> Decide:
    """The router at cost weight ``tilt``, as ``mesh router eval`` scores it (window constraint only)."""
    def decide(case: SimCase) -> RouteDecision:
        tier, thinking = choose(model, featurize(case.ctx), tilt)
        return RouteDecision(tier=TIERS[int(tier[0])], thinking=bool(thinking[0]))  # type: ignore[arg-type]
    return decide


def acceptance(sim_seed: int, goals: int, truth_goals: int, tmp: Path) -> str:
    ledger, candidate = tmp / "sim-ledger.duckdb", tmp / "candidate.onnx"
    commands = [
        ["router", "simulate", "--ledger", str(ledger), "--goals", str(goals), "--seed", str(sim_seed),
         "--epsilon", "0.2"],
        ["router", "train", "--ledger", str(ledger), "--out", str(candidate), "--version", "bench-candidate"],
        ["router", "eval", "--ledger", str(ledger), "--candidate", str(candidate)],
    ]
    outputs = [mesh(*c) for c in commands]
    shown = [" ".join(["mesh", *c]).replace(str(tmp) + "/", "") for c in commands]
    # the λ `mesh router eval` chose on its validation goals, and its off-policy estimate on the others
    model, current = OnnxModel.from_file(candidate), OnnxModel.from_file(DEFAULT_MODEL)
    validation, evaluation = load_decisions(ledger).split(0.2)[1].halves()
    report = evaluate(evaluation, model, current, validation=validation)
    chosen = report.tuned["candidate"]["95%"]
    sim = SimRouting(load_specs(default_nodes_dir()), seed=sim_seed)
    fresh = 10 * goals
    at_tilt = f"candidate, λ = {chosen.tilt:.3g} chosen on validation goals (window constraint only, as eval replays)"
    truth: dict[str, Score] = {
        at_tilt: score(sim, tilted(model, chosen.tilt), truth_goals, start=fresh),
        "candidate, greedy through `Router.decide` (every hard constraint)": score(sim, routed_by(Router(model, epsilon=0.0)), truth_goals, start=fresh),
        "current (packaged)": score(sim, routed_by(Router(current, epsilon=0.0)), truth_goals, start=fresh),
        **{f"always-{t}": score(sim, always_policy(t), truth_goals, start=fresh) for t in TIERS},
    }
    oracle = [(w, score(sim, oracle_policy(sim, w), truth_goals, start=fresh))
              for w in (0.0, 3.0, 10.0, 30.0, 100.0, 300.0)]
    best_name, best = max(((n, s) for n, s in truth.items() if n.startswith("always-")), key=lambda x: x[1].success)
    target = 0.95 * best.success
    reach = [s for _, s in oracle if s.success >= target]
    cheapest = min(reach, key=lambda s: s.cost) if reach else None
    rows = [f"| {name} | {s.success:.3f} | {s.cost:.5f} | {s.latency:.1f} |" for name, s in truth.items()]
    rows += [f"| oracle, cost weight {w:g}/USD | {s.success:.3f} | {s.cost:.5f} | {s.latency:.1f} |" for w, s in oracle]
    oracle_line = (f"the cheapest oracle point at ≥ 95% of {best_name}'s success costs "
                   f"{cheapest.cost / best.cost:.0%} of it" if cheapest else "no oracle point reaches it")
    # the candidate at the chosen λ against the best single tier, as fractions: ground truth, off-policy
    mine, op_best = truth[at_tilt], report.row(f"always-{report.best_tier}")
    real = (mine.success / best.success, mine.cost / best.cost)
    estimated = (chosen.estimate.success / op_best.success, chosen.estimate.cost / op_best.cost)
    bias = (estimated[0] - real[0], estimated[1] - real[1])
    return "\n".join([
        ("Commands (the ledger: sim goals routed by the packaged router with ε = 0.2; `train` learns on 80% "
        "of the goals; `eval` chooses λ on half of the held-out 20% and scores the other half):"), "", "```",
        *shown, "```", "",
        (f"**Ground truth, the headline** — the sim world's expected values on {truth_goals} fresh goals (not "
         "in the ledger):"), "",
        "| policy | success | cost / decision (USD) | latency (s) |", "| --- | ---: | ---: | ---: |", *rows, "",
        f"Best single tier: {best_name} ({best.success:.3f}); 95% of it is {target:.3f}; {oracle_line}.", "",
        (f"The candidate at λ = {chosen.tilt:.3g} (chosen on validation goals for 95% of the best tier's success) "
         f"keeps **{real[0]:.0%} of {best_name}'s success at {real[1]:.0%} of its cost** on fresh "
         f"goals. The off-policy estimate of the same policy on the ledger's evaluation goals says "
         f"{estimated[0]:.0%} of always-{report.best_tier}'s success at {estimated[1]:.0%} of its cost: "
         f"biased by {bias[0] * 100:+.0f} points of success and {bias[1] * 100:+.0f} points of cost (the ledger's "
         "costs are what the logged attempts spent, its best tier is estimated from the few decisions that "
         "match it, and the goals differ)."), "",
        "Off-policy (`mesh router eval` output, for comparison only):", "",
        outputs[0].strip() + "  ", outputs[1].strip(), "", outputs[2].strip(),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=40_000, help="ONNX decisions timed (scikit-learn: 1/10)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--goals", type=int, default=2000, help="sim goals in the acceptance ledger")
    parser.add_argument("--truth-goals", type=int, default=400)
    parser.add_argument("--seed", type=int, default=21)
    args = parser.parse_args()
    sim = SimRouting(load_specs(default_nodes_dir()), seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        lat = latency(sim, args.decisions, args.rounds, Path(tmp))
        print(lat, flush=True)
        acc = acceptance(args.seed, args.goals, args.truth_goals, Path(tmp))
        print(acc)
        took = time.perf_counter() - started
    command = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    write_section("router", "\n".join([
        (f"Command: `.venv/bin/python -m bench.router {command}` ({os.cpu_count()}-core machine, shared with "
        f"other work; {took:.0f} s)."), "", "### Decision latency: ONNX vs scikit-learn", "", lat, "",
        "### Train on the ledger, evaluate on held-out goals", "", acc,
    ]))


if __name__ == "__main__":
    main()
