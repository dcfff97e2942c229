"""`mesh node | up | run | submit | watch | status | goals | show | cancel` (and `mesh run`'s gate prompt,
from mesh.cli.approvals)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.errors import ConfigError, MeshError, NotConnected, OptionInvalid

# Only argparse and the error tree at import: `mesh --help` builds every command's parser, so a command's
# own imports (settings, contracts, the bus: pydantic and nats-py) wait for its handler.
if TYPE_CHECKING:
    from pydantic import BaseModel

    from mesh.client import MeshClient
    from mesh.config import MeshSettings
    from mesh.contracts import Goal

CANCEL_WAIT_SECONDS = 30.0  # how long `mesh cancel` waits to report how the goal ended


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("node", help="run one role process (what a Kubernetes pod runs)")
    p.add_argument("role")
    p.add_argument("--check", action="store_true",
                   help="preflight only: role spec, shell_allow programs, tier keys and sims, the bus; exit 1 on a problem")
    p.set_defaults(handler=_node)

    p = sub.add_parser("up", help="run the local mesh (embedded nats-server + one process per role) until Ctrl-C")
    p.set_defaults(handler=lambda a: _run_async(_until_signalled(_up(a))))

    p = sub.add_parser("run", help="bring up the local mesh, run one goal to its end, write the results")
    _goal_args(p)
    _workspace_arg(p)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: MESH_OUT_DIR/<goal id>)")
    p.add_argument("--json", action="store_true", help="print events as JSON lines")
    p.add_argument("-v", "--verbose", action="store_true", help="also show dispatches, starts and tool calls")
    p.add_argument("--all-tiers", metavar="local|URL", default=None,
                   help="every tier on one model: 'local' = the local SmolLM2 (edge extra), or an OpenAI-compatible "
                        "base URL (its first model); the same as MESH_TIERS")
    p.set_defaults(handler=lambda a: _run_async(_until_signalled(_run(a))))

    p = sub.add_parser("submit", help="submit a goal (or a file of goals) to a running mesh and print the ids")
    _goal_args(p, brief_required=False)
    _workspace_arg(p)
    p.add_argument("--file", type=Path, default=None, metavar="GOALS.jsonl",
                   help="submit every goal of a JSON-lines file (one Goal object per line) over one connection")
    p.add_argument("--wait", action="store_true",
                   help="wait for the goals to end; exit 0 if every one completed, 1 if any failed or was cancelled")
    p.set_defaults(handler=lambda a: _run_async(_submit(a)))

    p = sub.add_parser("watch", help="tail the event stream (all goals, or one)")
    p.add_argument("goal", nargs="?")
    p.add_argument("--json", action="store_true")
    p.add_argument("--new", action="store_true", help="only events from now on")
    p.add_argument("--from", dest="from_seq", type=int, default=0, metavar="SEQ",
                   help="start at this event stream sequence (resume after SEQ-1)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(handler=lambda a: _run_async(_watch(a)))

    p = sub.add_parser("status", help="live nodes per role and consumer lag")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=lambda a: _run_async(_status(a)))

    p = sub.add_parser("goals", help="list goals and their state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=lambda a: _run_async(_goals(a)))

    p = sub.add_parser("show", help="show one goal: plan, step states, usage")
    p.add_argument("goal")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=lambda a: _run_async(_show(a)))

    p = sub.add_parser("cancel", help="cancel a goal; workers stop before their next model or tool call")
    p.add_argument("goal")
    p.add_argument("--reason", default="cancelled by user")
    p.set_defaults(handler=lambda a: _run_async(_cancel(a)))


def _goal_args(p: argparse.ArgumentParser, *, brief_required: bool = True) -> None:
    p.add_argument("brief", nargs=None if brief_required else "?", help="the goal, e.g. \"Build me a login system\"")
    p.add_argument("-c", "--constraint", action="append", default=[], help="pinned constraint (repeatable)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--max-cost", type=float, default=None, help="USD")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-wall", type=float, default=None, help="seconds")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="goal option, e.g. sim_plan_steps=24 (the registry: mesh/contracts/options.py)")


def _workspace_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", type=Path, default=None, metavar="DIR",
                   help="an existing project folder the goal starts from (uploaded as its first workspace)")


def _make_goal(a: argparse.Namespace) -> Goal:
    from mesh.contracts import Budget, Goal
    from mesh.contracts.options import parse_option

    budget = Budget()
    for field, value in (("max_tokens", a.max_tokens), ("max_cost_usd", a.max_cost), ("max_steps", a.max_steps),
                         ("max_wall_seconds", a.max_wall)):
        if value is not None:
            setattr(budget, field, value)
    options = dict(parse_option(item) for item in a.option)
    return Goal(brief=a.brief, constraints=a.constraint, budget=budget, options=options)


def _run_async(coro: Any) -> int:
    from mesh.aio import run_loop

    return run_loop(coro)


def _node(a: argparse.Namespace) -> int:
    from mesh.node.runtime import run_node

    if a.check:
        return _run_async(_check(a.role))
    return run_node(a.role)


async def _check(role: str) -> int:
    from mesh.config import get_settings
    from mesh.node.preflight import check

    problems = await check(role, get_settings())
    for line in problems:
        print(f"{role}: {line}", file=sys.stderr)
    if not problems:
        print(f"{role}: preflight ok")
    return 1 if problems else 0


@asynccontextmanager
async def _client(settings: MeshSettings | None = None) -> AsyncIterator[MeshClient]:
    from mesh.client import MeshClient
    from mesh.config import get_settings
    from mesh.embedded.localauth import local_settings

    settings = local_settings(settings or get_settings())
    if not settings.nats_url:
        raise NotConnected("no mesh to talk to: set MESH_NATS_URL or start one with `mesh up`")
    async with MeshClient.connect(settings, name="mesh-cli") as client:
        yield client


# --- up / run -------------------------------------------------------------------------------------


async def _start_local(settings: MeshSettings, out: Any) -> Any:
    from mesh.backends.tiers import load_tiers
    from mesh.embedded.edge import choose_edge
    from mesh.embedded.local import LocalMesh
    from mesh.roles.spec import default_nodes_dir, load_specs

    specs = load_specs(default_nodes_dir())
    if settings.tiers and settings.tiers != "local":
        os.environ.update(one_server_env(settings.tiers))  # the nodes inherit it
    tiers = load_tiers(settings)
    edge = choose_edge(settings.edge_model, tiers["edge"])
    model_tiers = ["edge"]
    if settings.tiers == "local":
        if edge.model is None:
            raise ConfigError(f"MESH_TIERS=local serves every tier from the local edge model, but: {edge.message}")
        model_tiers = list(tiers)
        print(f"every tier: {edge.model.name}, served locally by llama-cpp-python (MESH_TIERS=local)", file=out)
    simulated = [t for t, cfg in tiers.items() if cfg.simulated and not (t in model_tiers and edge.model)]
    if simulated:
        print(f"no model endpoint configured for {', '.join(simulated)}: using the SIMULATED backend "
              "(mesh sim-server) there. Its outputs are simulated; see docs/BACKENDS.md to configure real "
              "endpoints.", file=out)
    print(edge.message, file=out)
    mesh = LocalMesh(settings, sorted(specs), sim_tiers=simulated, edge_model=edge.model, model_tiers=model_tiers)
    await mesh.start()
    print(f"local mesh up: nats {mesh.url}, {len(specs)} roles ({', '.join(sorted(specs))}); "
          f"logs in {mesh.data_dir / 'logs'}", file=out)
    return mesh


def one_server_env(base_url: str) -> dict[str, str]:
    """``MESH_TIER_<T>_*`` pointing every tier at one OpenAI-compatible server, on the first model it lists
    (``GET <base_url>/models``): the one-step setup for a single local server (llama.cpp, Ollama, vLLM)."""
    import urllib.request

    from mesh.contracts import TIERS

    url = base_url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=10) as resp:
            models = [m["id"] for m in json.loads(resp.read())["data"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--all-tiers {base_url}: cannot list its models at {url}/models: {exc}") from exc
    if not models:
        raise ConfigError(f"--all-tiers {base_url}: the server lists no model")
    env = {"MESH_ONE_SERVER_KEY": "local"}
    for tier in TIERS:
        prefix = f"MESH_TIER_{tier.upper()}_"
        env |= {prefix + "KIND": "openai", prefix + "BASE_URL": url, prefix + "MODEL": models[0],
                prefix + "API_KEY_ENV": "MESH_ONE_SERVER_KEY",
                # the server does not say its context: a small local model's, unless configured
                prefix + "CONTEXT_WINDOW": os.environ.get(prefix + "CONTEXT_WINDOW", "8192"),
                prefix + "OUTPUT_RESERVE": os.environ.get(prefix + "OUTPUT_RESERVE", "1024"),
                **{f"{prefix}PRICE_{p}": "0" for p in ("INPUT_HIT", "INPUT_MISS", "OUTPUT")}}
    return env


async def _until_signalled(work: Coroutine[Any, Any, int]) -> int:
    """Run ``work``; SIGTERM and SIGHUP (systemd, Docker, ``timeout``, a closed terminal) stop it as Ctrl-C
    does: the task is cancelled, so the local mesh drains and stops every child before the command exits
    with 128 + the signal number. (The children also die with this process if it is killed -9.)"""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def stop(sig: signal.Signals) -> None:
        if not received:  # a second signal does not interrupt the drain
            received.append(sig)
            task.cancel()

    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await work
    except asyncio.CancelledError:
        if not received:
            raise
        return 128 + received[0]
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)


@asynccontextmanager
async def _gateway(settings: MeshSettings, out: Any) -> AsyncIterator[str]:
    """The local mesh's gateway, in this process on loopback: MESH_GATEWAY_PORT, or any free port when that
    one is taken (another `mesh up`, a test run) — its URL and the dashboard's are printed either way, and
    the URL is yielded."""
    from mesh.client import MeshClient
    from mesh.gateway.app import running

    async with MeshClient.connect(settings, name="mesh-gateway") as client, AsyncExitStack() as stack:
        try:
            gateway = await stack.enter_async_context(running(client, settings, "127.0.0.1", settings.gateway_port))
        except ConfigError:
            gateway = await stack.enter_async_context(running(client, settings, "127.0.0.1", 0))
        print(f"gateway on {gateway.url} (Mesh API /v1/goals, OpenAI /v1, A2A /a2a, MCP /mcp: docs/GATEWAY.md)",
              file=out, flush=True)
        print(f"dashboard on {gateway.url}/ (docs/DASHBOARD.md)", file=out, flush=True)
        yield gateway.url


async def _up(a: argparse.Namespace) -> int:
    from mesh.config import get_settings

    settings = get_settings()
    mesh = await _start_local(settings, sys.stdout)
    try:
        async with _gateway(mesh.client_settings, sys.stdout):
            print("press Ctrl-C to stop", flush=True)
            await mesh.supervise()
    finally:
        print("stopping the local mesh…", flush=True)
        await asyncio.shield(mesh.stop())
    return 0


async def _run(a: argparse.Namespace) -> int:
    from mesh.config import get_settings

    settings = get_settings()
    if a.all_tiers:
        settings = settings.model_copy(update={"tiers": a.all_tiers})
    goal = _make_goal(a)
    mesh = await _start_local(settings, sys.stderr if a.json else sys.stdout)
    try:
        async with asyncio.TaskGroup() as tg:
            supervisor = tg.create_task(mesh.supervise())
            try:
                local = mesh.client_settings
                async with _gateway(local, sys.stderr if a.json else sys.stdout) as url:
                    code = await _drive(local, goal, a, mesh.roles, url)
            finally:
                await mesh.stop()
            await supervisor
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    return code


async def _drive(settings: MeshSettings, goal: Goal, a: argparse.Namespace, roles: list[str], gateway_url: str) -> int:
    from mesh.cli.approvals import answer_gate
    from mesh.cli.progress import Progress
    from mesh.contracts import ApprovalDecided, ApprovalRequested, GoalCompleted
    from mesh.embedded.readiness import wait_for_roles

    progress = Progress(as_json=a.json, verbose=a.verbose)
    say = sys.stderr if a.json else sys.stdout

    def starting(missing: list[str]) -> None:
        up = len(roles) - len(missing)
        print(f"nodes up: {up} of {len(roles)}" + (f"; waiting for {', '.join(missing)}" if missing else ""),
              file=say, flush=True)

    async with _client(settings) as client:
        # Submitted while the nodes still start: the goal waits in its stream for the planner.
        await client.submit(goal, workspace=a.workspace)
        print(f"goal {goal.goal_id}: {gateway_url}/ui/goals/{goal.goal_id}", file=say, flush=True)
        final = None
        async with asyncio.TaskGroup() as tg:
            nodes = tg.create_task(wait_for_roles(client.bus, roles, report=starting))
            asking: asyncio.Task[None] | None = None
            async for _, final in client.watch(goal.goal_id, until_final=True):
                progress.show(final)
                if isinstance(final, ApprovalRequested | ApprovalDecided) and asking is not None:
                    asking.cancel()  # decided (here or elsewhere), or a newer gate
                if isinstance(final, ApprovalRequested):
                    asking = tg.create_task(answer_gate(client, final, say, ask=sys.stdin.isatty() and not a.json))
            if asking is not None:
                asking.cancel()
            nodes.cancel()
        if isinstance(final, GoalCompleted):
            out = a.out or settings.out_dir / goal.goal_id
            (await client.results(goal.goal_id)).write(out)
            if not a.json:
                print(f"\nresults in {out.resolve()}  (synthesis.md, workspace/, artifacts/)")
            return 0
        return 1


# --- talking to a running mesh -------------------------------------------------------------------


async def _submit(a: argparse.Namespace) -> int:
    from mesh.aio import together

    if (a.file is None) == (a.brief is None):
        raise MeshError("give either a goal's brief or --file GOALS.jsonl")
    goals = _read_goals(a.file) if a.file is not None else [_make_goal(a)]
    async with _client() as client:
        if a.workspace is not None:
            start = await client.upload_workspace(a.workspace)  # once, however many goals start from it
            goals = [g.model_copy(update={"workspace": start}) for g in goals]
        for goal in goals:
            print(await client.submit(goal), flush=True)
        if not a.wait:
            return 0
        outcomes = await together(*(_outcome(client, g.goal_id) for g in goals))
    for goal, outcome in zip(goals, outcomes, strict=True):
        print(f"goal {goal.goal_id}: {outcome}", file=sys.stderr)
    return 0 if all(o == "completed" for o in outcomes) else 1


def _read_goals(path: Path) -> list[Goal]:
    """One ``Goal`` JSON object per non-empty line; an invalid line is a clear error naming it, and nothing
    is submitted."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise MeshError(f"cannot read {path}: {exc.strerror}") from exc
    goals = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                goals.append(_goal_from_json(line))
            except (ValueError, OptionInvalid) as exc:
                raise MeshError(f"{path}:{number}: not a goal: {exc}") from exc
    if not goals:
        raise MeshError(f"{path} holds no goals")
    return goals


def _goal_from_json(line: str) -> Goal:
    """A goal line read as strictly as the gateway reads a request. The wire model ignores unknown fields
    (for newer senders), so a misspelt one (``"budget": {"max_step": 5}``) would run with the default
    silently; an unknown goal option is refused here, not by the planner after submission."""
    from mesh.contracts import Budget, Goal
    from mesh.contracts.options import validate_options

    data = json.loads(line)
    if isinstance(data, dict):
        _refuse_unknown(data, Goal, "")
        if isinstance(data.get("budget"), dict):
            _refuse_unknown(data["budget"], Budget, "budget.")
    goal = Goal.model_validate(data)
    goal.options = validate_options(goal.options)
    return goal


def _refuse_unknown(fields: dict[str, Any], model: type[BaseModel], where: str) -> None:
    known = {n for name, f in model.model_fields.items() for n in (name, f.alias) if n}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown field {where}{unknown[0]!r}; known fields: {', '.join(sorted(known))}")


async def _outcome(client: MeshClient, goal_id: str) -> str:
    """The goal's final status, once it has one."""
    from mesh.contracts import GoalCancelled, GoalCompleted

    final = None
    async for _, final in client.watch(goal_id, until_final=True):
        pass
    if isinstance(final, GoalCompleted):
        return "completed"
    return "cancelled" if isinstance(final, GoalCancelled) else "failed"


async def _watch(a: argparse.Namespace) -> int:
    from mesh.cli.progress import Progress
    from mesh.contracts import GoalCancelled, GoalCompleted, GoalFailed

    progress = Progress(as_json=a.json, verbose=a.verbose)
    async with _client() as client:
        async for _, event in client.watch(a.goal, None if a.new else a.from_seq):
            progress.show(event)
            if a.goal and isinstance(event, GoalCompleted | GoalFailed | GoalCancelled):
                return 0 if isinstance(event, GoalCompleted) else 1
    return 0


async def _status(a: argparse.Namespace) -> int:
    async with _client() as client:
        nodes = [n.model_dump() for n in await client.nodes()]
        lag = {name: {"pending": c.pending, "in_flight": c.in_flight, "redelivered": c.redelivered}
               for name, c in (await client.backlog()).items()}
    from mesh.cli.progress import dump_json
    from mesh.node.beats import overdue

    # A killed node's entry outlives it until the bucket's TTL: one whose beats stopped is not listed.
    silent = [n for n in nodes if overdue(n)]
    nodes = [n for n in nodes if n not in silent]
    if a.json:
        print(dump_json({"nodes": nodes, "overdue": silent, "consumers": lag}))
        return 0
    if silent:
        print(f"no heartbeat lately (stopped or killed): {', '.join(sorted(n['node'] for n in silent))}")
    by_role: dict[str, list[dict[str, Any]]] = {}
    for n in nodes:
        by_role.setdefault(n["role"], []).append(n)
    print(f"{'role':<14}{'nodes':>6}{'in-flight':>11}   {'consumer':<20}{'pending':>9}{'acking':>8}")
    for role in sorted(set(by_role) | {k.removeprefix('role-') for k in lag}):
        c = lag.get(f"role-{role}", {})
        ns = by_role.get(role, [])
        print(f"{role:<14}{len(ns):>6}{sum(n.get('in_flight', 0) for n in ns):>11}   "
              f"{('role-' + role) if c else '-':<20}{c.get('pending', 0):>9}{c.get('in_flight', 0):>8}")
    return 0


async def _goals(a: argparse.Namespace) -> int:
    from mesh.cli.progress import cost, dump_json

    async with _client() as client:
        states = await client.goals()
    if a.json:
        print(dump_json([{"goal_id": s.goal.goal_id, "status": s.status, "brief": s.goal.brief,
                          "steps": len(s.steps), "tokens": s.usage.total_tokens, "cost_usd": s.usage.cost_usd,
                          "simulated": s.simulated, "pending_gates": [p.gate for p in s.pending_approvals()]}
                         for s in states]))
        return 0
    for s in states:
        done = sum(1 for st in s.steps.values() if st.status == "completed")
        print(f"{s.goal.goal_id}  {s.status:<17} {done:>3}/{len(s.steps):<3} steps  {s.usage.total_tokens:>9,} tok  "
              f"{cost(s.usage, s.simulated):>12}  {'SIMULATED  ' if s.simulated else ''}{s.goal.brief[:60]}")
    return 0


async def _show(a: argparse.Namespace) -> int:
    from mesh.cli.progress import SIM_NOTE, cost

    async with _client() as client:
        state = await client.goal(a.goal)
    if state is None:
        raise MeshError(f"no goal {a.goal!r}")
    if a.json:
        print(state.model_dump_json(indent=2))
        return 0
    print(f"goal {state.goal.goal_id}: {state.status}" + (f" ({state.reason})" if state.reason else ""))
    print(f"brief: {state.goal.brief}")
    for c in state.goal.constraints:
        print(f"pinned: {c}")
    print(f"usage: {state.usage.total_tokens:,} tokens, {cost(state.usage, state.simulated)}, {state.steps_run} steps "
          f"run, {state.replans} replans, {state.review_rounds} review rounds, {state.test_rounds} test revisions")
    if state.simulated:
        print(SIM_NOTE.strip())
    if state.done:
        q = state.quality()
        print(f"quality: tests {q.tests}" + (f" (exit {q.tests_exit_code})" if q.tests_exit_code is not None else "")
              + f", reviews {', '.join(q.reviews) or '-'}")
    for ap in [] if state.done else state.pending_approvals():
        deadline = ap.deadline.isoformat(timespec="seconds") if ap.deadline else "-"
        print(f"waiting for approval: gate {ap.gate} ({ap.kind}) until {deadline}, then {ap.on_timeout} — "
              f"mesh approve {state.goal.goal_id} {ap.gate}")
    for sid, st in state.steps.items():
        deps = ",".join(st.step.depends_on) or "-"
        print(f"  {sid:<24} {st.step.role:<12} {st.status:<17} attempt {st.attempt}  tier {st.tier or '-':<13} "
              f"{'sim ' if st.simulated else ''}after {deps}")
    return 0


async def _cancel(a: argparse.Namespace) -> int:
    """Send the planner a cancel command and report how the goal ended."""
    async with _client() as client:
        if not await client.cancel(a.goal, by=who("mesh cancel"), reason=a.reason):
            print("goal already finished")
            return 0
        try:
            async with asyncio.timeout(CANCEL_WAIT_SECONDS):
                outcome = await _outcome(client, a.goal)
        except TimeoutError:
            print(f"cancel requested; the planner has not applied it within {CANCEL_WAIT_SECONDS:.0f}s "
                  "(it will when it is back)")
            return 0
    print("cancelled" if outcome == "cancelled" else f"goal already finished ({outcome})")
    return 0


def who(command: str) -> str:
    """Who cancels or decides, for the record: the OS user running the CLI (and through which command)."""
    try:
        return f"{getpass.getuser()} ({command})"
    except (OSError, KeyError):  # no login name in this environment
        return command
