"""`mesh sim-server`: serve the sim backend over HTTP (OpenAI- and Anthropic-compatible)."""

from __future__ import annotations

import argparse
import asyncio
import signal


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "sim-server",
        help="serve the simulated model tiers over OpenAI- and Anthropic-compatible HTTP",
        description="Serves /v1/chat/completions and /v1/messages; the model name picks the tier profile "
        "(sim-edge, sim-long-context, sim-swarm). Faults: MESH_SIM_FAULTS or POST /_sim/faults.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed on start)")
    p.add_argument("--seed", type=int, default=None, help="overrides MESH_SIM_SEED")
    p.add_argument("--faults", default=None, help='overrides MESH_SIM_FAULTS, e.g. "429:0.1,500:0.05"')
    p.add_argument("--latency-scale", type=float, default=None, help="overrides MESH_SIM_LATENCY_SCALE")
    p.add_argument("--print-env", action="store_true",
                   help="once listening, print the environment that points a hand-started `mesh node` at this "
                        "server (shell `export` lines, ending with '# end of environment'; the first line becomes a "
                        "comment, so the output can be sourced)")
    p.add_argument("--pose-as-real", action="store_true",
                   help="answer without the sim marks (fingerprint, id prefix), as a real provider would: for tests")
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from mesh.backends.sim import FaultPlan, SimServer, SimWorld
    from mesh.config import get_settings

    settings = get_settings()
    seed = settings.sim_seed if args.seed is None else args.seed
    world = SimWorld(
        seed=seed,
        latency_scale=settings.sim_latency_scale if args.latency_scale is None else args.latency_scale,
        faults=FaultPlan.from_spec(settings.sim_faults if args.faults is None else args.faults, seed=seed),
    )

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with SimServer(world, host=args.host, port=args.port, pose_as_real=args.pose_as_real) as server:
            # The first line is machine-readable: tests and scripts wait for it.
            print(f"{'# ' if args.print_env else ''}mesh sim-server listening on {server.url} (simulated models; "
                  f"OpenAI base URL {server.url}/v1, Anthropic base URL {server.url})", flush=True)
            if args.print_env:
                print(_node_env(server.url), flush=True)
            await stop.wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


def _node_env(url: str) -> str:
    """Shell lines pointing every tier of a node at the sim-server at ``url`` (as ``mesh up`` does)."""
    import shlex

    from mesh.embedded.local import sim_server_env

    lines = ["# every model tier of a node started with this environment calls the sim-server above:",
             *(f"export {key}={shlex.quote(value)}" for key, value in sorted(sim_server_env(url).items())),
             "# simulated tiers are refused unless allowed (their results are marked simulated):",
             "export MESH_ALLOW_SIM=1",
             "# then: MESH_NATS_URL=nats://… mesh node <role>", "# end of environment"]
    return "\n".join(lines)
