"""`mesh gateway [--host H] [--port P]` and `mesh gateway token NAME`: the HTTP front door (docs/GATEWAY.md)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("gateway", help="serve the HTTP front door: Mesh API, OpenAI-compatible, A2A, MCP")
    p.add_argument("--host", default=None, help="bind address (default MESH_GATEWAY_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default MESH_GATEWAY_PORT, 8600; 0 = free)")
    p.set_defaults(handler=_serve)
    actions = p.add_subparsers(dest="action")
    t = actions.add_parser("token", help="make a bearer token: prints it once, and its [[token]] entry")
    t.add_argument("name")
    t.add_argument("--max-cost", type=float, default=None, help="per-goal cap, USD")
    t.add_argument("--max-tokens", type=int, default=None, help="per-goal cap")
    t.add_argument("--max-steps", type=int, default=None, help="per-goal cap")
    t.add_argument("--max-wall", type=float, default=None, help="per-goal cap, seconds")
    t.add_argument("--rate", type=float, default=None, help="requests a minute (per replica)")
    t.set_defaults(handler=_token)


def _serve(a: argparse.Namespace) -> int:
    from mesh.aio import run_loop
    from mesh.config import get_settings
    from mesh.embedded.localauth import local_settings
    from mesh.gateway.app import serve

    settings = local_settings(get_settings())  # MESH_NATS_URL, else (with its token) a running `mesh up`
    run_loop(serve(settings, a.host or settings.gateway_host,
                   settings.gateway_port if a.port is None else a.port))
    return 0


def _token(a: argparse.Namespace) -> int:
    from mesh.gateway.auth import TokenEntry, hash_token, new_token

    token = new_token()
    entry = TokenEntry(name=a.name, sha256=hash_token(token), max_cost_usd=a.max_cost, max_tokens=a.max_tokens,
                       max_steps=a.max_steps, max_wall_seconds=a.max_wall, requests_per_minute=a.rate)
    print(f"# token for {a.name} (shown once; the file keeps only its hash): {token}")
    print("[[token]]")
    for key, value in entry.model_dump(exclude_none=True).items():
        print(f"{key} = {value!r}" if isinstance(value, str) else f"{key} = {value}")
    return 0
