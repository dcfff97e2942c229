"""The node's HTTP endpoint: /healthz (alive), /readyz (connected and provisioned; details such as the
shell.run sandbox in use), /metrics."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from aiohttp import web

from mesh.errors import ConfigError
from mesh.metrics import Metrics


class HealthServer:
    def __init__(self, metrics: Metrics, ready: Callable[[], bool], host: str, port: int,
                 detail: dict[str, Any] | None = None) -> None:
        self.metrics = metrics
        self.ready = ready
        self.detail = detail or {}  # shown by /readyz beside "ready" (e.g. the shell.run sandbox and its warning)
        self.host = host
        self.port = port
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self, *, any_port_if_busy: bool = False) -> int:
        """Start listening; returns the bound port (useful when asked for port 0). ``any_port_if_busy``:
        a port already in use is replaced by a free one (outside Kubernetes nothing probes the fixed
        port, and a second node on one machine must not die of it); the caller logs which."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            if any_port_if_busy and exc.errno == errno.EADDRINUSE and self.port:
                site = web.TCPSite(self._runner, self.host, 0)
                await site.start()
                return self._bound(site)
            await self._runner.cleanup()
            raise ConfigError(f"cannot serve /healthz on {self.host}:{self.port}: {exc.strerror}; "
                              "set MESH_HEALTH_PORT (0 picks a free port)") from exc
        return self._bound(site)

    def _bound(self, site: web.TCPSite) -> int:
        server = site._server  # aiohttp exposes the bound socket only here
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.port
        return self.port

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, _: web.Request) -> web.Response:
        ok = self.ready()
        return web.json_response({"ready": ok, **self.detail}, status=200 if ok else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")
