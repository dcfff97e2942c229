"""The gateway's ASGI app and its server: one Starlette app with four faces over one ``MeshClient``.

    /v1/goals…            Mesh API (mesh_api.py)         /v1/models, /v1/chat/completions  OpenAI (openai_api.py)
    /a2a, /.well-known/…  A2A v1.0 JSON-RPC (a2a_api.py) /mcp                              MCP (mcp_api.py)
    /, /ui/…, /v1/ui/…    the web dashboard (dashboard/)

The gateway holds no goal state: every answer is read from the mesh, every stream is a view of the event
stream from a sequence, so any replica can serve any client and resume any stream.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh.config import MeshSettings
from mesh.errors import ConfigError, MeshError, RequestRefused
from mesh.gateway import a2a_api, mcp_api, mesh_api, openai_api
from mesh.gateway.auth import GuardMiddleware, RateLimiter, TokenStore, error_body, require_safe_bind
from mesh.gateway.dashboard import pages as dashboard
from mesh.gateway.goals import Desk

if TYPE_CHECKING:
    from mesh.client import MeshClient

log = logging.getLogger(__name__)


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestRefused)
    headers = {}
    if "retry_after" in exc.extra:
        headers["Retry-After"] = str(max(1, round(float(str(exc.extra["retry_after"])))))
    if "goal_id" in exc.extra:  # e.g. a 504: the goal runs on, and this is how to find it
        headers["X-Mesh-Goal-Id"] = str(exc.extra["goal_id"])
    return JSONResponse(error_body(exc), status_code=exc.status, headers=headers)


async def _mesh_error(request: Request, exc: Exception) -> Response:
    log.warning("gateway: %s %s failed: %r", request.method, request.url.path, exc)
    return JSONResponse(error_body(RequestRefused(f"the mesh could not answer: {exc}", status=503,
                                                  type="server_error", code="mesh_unavailable")), status_code=503)


async def _healthz(request: Request) -> Response:
    return JSONResponse({"status": "alive"})


async def _readyz(request: Request) -> Response:
    ready = request.app.state.desk.client.bus.connected
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


def build_app(client: MeshClient, settings: MeshSettings, tokens: TokenStore | None = None) -> Starlette:
    """The app for ``client``; the caller owns the client's connection."""
    tokens = tokens if tokens is not None else TokenStore.load(settings.gateway_tokens_file)
    desk = Desk(client)
    mcp = mcp_api.McpFace(desk)
    a2a = a2a_api.A2aFace(desk, settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with mcp.running():
            yield

    app = Starlette(
        routes=[Route("/healthz", _healthz, methods=["GET"]), Route("/readyz", _readyz, methods=["GET"]),
                *mesh_api.ROUTES, *openai_api.ROUTES,
                *a2a.routes(), *mcp.routes(), *dashboard.ROUTES],
        middleware=[Middleware(GuardMiddleware, tokens=tokens, limiter=RateLimiter(settings.gateway_rate_per_minute),
                               max_body=settings.gateway_max_body_bytes)],
        exception_handlers={RequestRefused: _refused, MeshError: _mesh_error},
        lifespan=lifespan,
    )
    app.state.desk = desk
    app.state.keepalive = settings.gateway_keepalive
    app.state.request_timeout = settings.gateway_request_timeout
    return app


class _EmbeddedServer(uvicorn.Server):
    """A server whose program owns the signals: `mesh up`, `mesh run` and tests (Ctrl-C stays their
    KeyboardInterrupt), and `mesh gateway`, which drains on SIGTERM and exits 0 — uvicorn's own handling
    re-raises the signal after its shutdown, so a pod would end killed by SIGTERM instead of drained."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Gateway:
    """A gateway server and its listening socket (bound already, so port 0 has its number)."""

    server: uvicorn.Server
    sock: socket.socket

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind the gateway to {host}:{port}: {exc.strerror}; set MESH_GATEWAY_PORT "
                          "(0 picks a free port)") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def make_gateway(client: MeshClient, settings: MeshSettings, host: str, port: int) -> Gateway:
    """Checks the bind (no tokens: loopback only), builds the app, binds the socket."""
    tokens = TokenStore.load(settings.gateway_tokens_file)
    require_safe_bind(host, tokens)
    config = uvicorn.Config(build_app(client, settings, tokens), log_level="warning", access_log=False,
                            lifespan="on", timeout_graceful_shutdown=2)
    return Gateway(_EmbeddedServer(config), bind(host, port))


@asynccontextmanager
async def running(client: MeshClient, settings: MeshSettings, host: str = "127.0.0.1",
                  port: int = 0) -> AsyncIterator[Gateway]:
    """A gateway serving in this event loop until the block ends. Clients may connect at once: the socket
    listens before the server starts, and connections wait in its backlog until it accepts them."""
    gateway = make_gateway(client, settings, host, port)
    async with asyncio.TaskGroup() as tg:
        serving = tg.create_task(gateway.server.serve(sockets=[gateway.sock]))
        try:
            yield gateway
        finally:
            gateway.server.should_exit = True
            # Let uvicorn shut down (lifespan, connections; `timeout_graceful_shutdown` bounds it) also when
            # the block ends by cancellation — SIGTERM or Ctrl-C to `mesh up`: the group would cancel the
            # serving task, and its lifespan task, left pending, is logged as an ERROR traceback at exit.
            await asyncio.wait([serving])


async def serve(settings: MeshSettings, host: str, port: int) -> None:
    """`mesh gateway`: connect a MeshClient and serve until SIGINT/SIGTERM (uvicorn drains, then stops)."""
    from mesh.client import MeshClient
    from mesh.logs import setup_json_logging

    setup_json_logging(settings.log_level, role="gateway")
    async with MeshClient.connect(settings, name="mesh-gateway") as client:
        gateway = make_gateway(client, settings, host, port)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn drains open requests, then serve returns
            loop.add_signal_handler(sig, setattr, gateway.server, "should_exit", True)
        print(f"mesh gateway on {gateway.url}", flush=True)
        await gateway.server.serve(sockets=[gateway.sock])
