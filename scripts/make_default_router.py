"""Make the router model shipped with mesh (``mesh/router/models/default.onnx`` + ``default.json``).

It is trained the way ``mesh router train`` trains, on a ledger written by the sim world: goals
planned as the sim planner plans them, every step attempt routed uniformly at random (so every
action is tried in every kind of context) and scored by the sim world's quality, price and latency
models (``mesh.router.simenv``). The JSON records how it was made and how it does against always
using one tier, scored on fresh sim goals with the sim world's expected values.

    .venv/bin/python scripts/make_default_router.py            # needs the `router` extra
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from mesh.contracts.models import TIERS
from mesh.roles.spec import default_nodes_dir, load_specs
from mesh.router.dataset import load_decisions
from mesh.router.features import FEATURE_VERSION
from mesh.router.model import DEFAULT_MODEL, OnnxModel
from mesh.router.runtime import Router
from mesh.router.simenv import SimRouting, always_policy, routed_by, score, uniform_policy, write_ledger
from mesh.router.train import Reward, TrainConfig, fit, to_onnx

VERSION = "sim-default-1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--goals", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--eval-goals", type=int, default=300)
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args()

    sim = SimRouting(load_specs(default_nodes_dir()), seed=args.seed)
    reward, config = Reward(), TrainConfig(estimators=100)
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Path(tmp) / "ledger.duckdb"
        write_ledger(ledger, sim.run(args.goals, uniform_policy(args.seed)))
        data = load_decisions(ledger)
    source = f"the sim world (seed {args.seed}, {args.goals} goals, uniform logging)"
    model = fit(data, reward, version=VERSION, config=config, source=source)
    onnx_bytes = to_onnx(model)
    router = Router(OnnxModel.load(onnx_bytes), epsilon=0.0)
    fresh = 10 * args.goals  # goal indices the training ledger never saw
    scores = {"default": score(sim, routed_by(router), args.eval_goals, start=fresh)}
    scores |= {f"always-{t}": score(sim, always_policy(t), args.eval_goals, start=fresh) for t in TIERS}
    args.out.write_bytes(onnx_bytes)
    card = {
        "version": VERSION, "feature_version": FEATURE_VERSION, "tiers": list(TIERS),
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(), "bytes": len(onnx_bytes),
        "trained_on": f"{len(data)} decisions from {source}", "reward": asdict(reward), "config": asdict(config),
        "made_by": "scripts/make_default_router.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                               for k, v in vars(args).items() if k != "out"),
        "sim_scores": {name: asdict(s) for name, s in scores.items()},
    }
    args.out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    for name, s in scores.items():
        print(f"{name:>22}: success {s.success:.3f}  cost ${s.cost:.5f}  latency {s.latency:.1f}s")
    print(f"wrote {args.out} ({len(onnx_bytes) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
