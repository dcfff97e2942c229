"""``mesh router train | eval | publish | simulate``: learn routers from the ledger, compare them,
and hot-swap one into every running node."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    group = sub.add_parser("router", help="train, evaluate and publish ONNX routing models")
    cmds = group.add_subparsers(dest="router_command", metavar="COMMAND", required=True)

    t = cmds.add_parser("train", help="learn a router from the ledger's decisions and outcomes, export ONNX",
                        description="Inverse-propensity-weighted reward regression over (context, tier, "
                        "thinking); needs the `router` extra (scikit-learn, skl2onnx).")
    _ledger_args(t)
    t.add_argument("--out", type=Path, default=None, help="ONNX file to write (default: router-<version>.onnx)")
    t.add_argument("--version", default=None, help="model version name (default: ledger-<UTC time>)")
    t.add_argument("--w-success", type=float, default=1.0, help="reward per successful step attempt")
    t.add_argument("--w-cost", type=float, default=10.0, help="reward lost per USD spent")
    t.add_argument("--w-latency", type=float, default=0.005, help="reward lost per second of latency")
    t.add_argument("--clip", type=float, default=50.0, help="largest inverse-propensity weight")
    t.add_argument("--temperature", type=float, default=0.05, help="reward units per e-fold of probability")
    t.add_argument("--estimators", type=int, default=150, help="boosted trees")
    t.add_argument("--depth", type=int, default=4, help="depth of each tree")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(handler=_train)

    e = cmds.add_parser("eval", help="off-policy table: candidate vs current vs single tiers vs random",
                        description="Scores routers on the held-out goals of a ledger (the split `train` "
                        "left out) by self-normalised inverse propensity weighting; half of those goals "
                        "choose the cost weight λ of the savings, the other half are scored.")
    _ledger_args(e)
    e.add_argument("--candidate", type=Path, required=True, help="ONNX model to evaluate")
    e.add_argument("--current", type=Path, default=None,
                   help="the router to beat (default: the model packaged with mesh)")
    e.add_argument("--json", action="store_true", help="print JSON instead of tables")
    e.set_defaults(handler=_eval)

    p = cmds.add_parser("publish", help="upload a model and point every node at it (hot swap)")
    p.add_argument("file", type=Path)
    p.set_defaults(handler=_publish)

    s = cmds.add_parser("simulate", help="write a ledger of goals routed in the sim world (no mesh needed)",
                        description="Plans goals as the sim planner does, routes every step attempt and "
                        "scores it with the sim world's quality, price and latency models.")
    s.add_argument("--ledger", type=Path, required=True, help="DuckDB ledger file to create or extend")
    s.add_argument("--goals", type=int, default=500)
    s.add_argument("--start", type=int, default=0, help="index of the first goal (goals are numbered)")
    s.add_argument("--seed", type=int, default=0, help="the sim world's seed")
    s.add_argument("--policy", default="default",
                   help="'default' (the packaged router), 'uniform', or an ONNX file")
    s.add_argument("--epsilon", type=float, default=0.2, help="exploration of a model policy")
    s.set_defaults(handler=_simulate)


def _ledger_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ledger", type=Path, required=True,
                   help="ledger DuckDB file (not in use by a running ledger) or `mesh ledger export` directory")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="share of goals held out of training and used by eval (0: all)")


def _train(a: argparse.Namespace) -> int:
    from mesh.router.dataset import load_decisions
    from mesh.router.train import Reward, TrainConfig, fit, require_extra, to_onnx

    require_extra()
    data = load_decisions(a.ledger)
    train, held = data.split(a.holdout)
    reward = Reward(success=a.w_success, cost=a.w_cost, latency=a.w_latency)
    config = TrainConfig(clip=a.clip, temperature=a.temperature, estimators=a.estimators, depth=a.depth,
                         seed=a.seed)
    model = fit(train, reward, version=a.version, config=config, source=a.ledger.name)
    data_bytes = to_onnx(model)
    out = a.out or Path(f"router-{model.version}.onnx")
    out.write_bytes(data_bytes)
    print(f"trained {model.version} on {len(train)} decisions ({len(held)} held out for eval) → {out} "
          f"({len(data_bytes) / 1024:.0f} KiB)")
    return 0


def _eval(a: argparse.Namespace) -> int:
    from mesh.router.dataset import load_decisions
    from mesh.router.evaluate import evaluate, render
    from mesh.router.model import DEFAULT_MODEL, OnnxModel

    data = load_decisions(a.ledger)
    held = data.split(a.holdout)[1] if a.holdout > 0 else data
    validation, evaluation = held.halves()  # λ is chosen on goals the scores never see
    if len(evaluation) == 0:
        print(f"no held-out decisions in {a.ledger} (holdout {a.holdout})")
        return 1
    report = evaluate(evaluation, OnnxModel.from_file(a.candidate), OnnxModel.from_file(a.current or DEFAULT_MODEL),
                      validation=validation)
    if a.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(f"{len(held)} held-out decisions from {a.ledger}: {len(validation)} to choose λ on, "
              f"{len(evaluation)} of other goals to score on\n")
        print(render(report))
    return 0


def _publish(a: argparse.Namespace) -> int:
    from mesh.cli.local import _client, _run_async
    from mesh.roles.hotswap import publish_model

    data = a.file.read_bytes()

    async def run() -> int:
        async with _client() as client:
            pointer = await publish_model(client.bus, data)
        print(f"published {pointer.version} ({pointer.digest[:12]}, {pointer.size} bytes): nodes swap it in now")
        return 0

    return _run_async(run())


def _simulate(a: argparse.Namespace) -> int:
    from mesh.roles.spec import default_nodes_dir, load_specs
    from mesh.router.model import DEFAULT_MODEL, OnnxModel
    from mesh.router.runtime import Router
    from mesh.router.simenv import SimRouting, routed_by, uniform_policy, write_ledger

    sim = SimRouting(load_specs(default_nodes_dir()), seed=a.seed)
    if a.policy == "uniform":
        decide = uniform_policy(a.seed)
    else:
        decide = routed_by(Router(OnnxModel.from_file(DEFAULT_MODEL if a.policy == "default" else a.policy),
                                  epsilon=a.epsilon, seed=a.seed))
    events = write_ledger(a.ledger, sim.run(a.goals, decide, start=a.start))
    print(f"wrote {events} events of {a.goals} goals to {a.ledger}")
    return 0
