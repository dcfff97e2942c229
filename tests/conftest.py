"""Shared fixtures: a real nats-server per test (fast: ~60 ms), settings pointing at it, a connected bus.

    nats_server   EmbeddedNats in tmp_path (function scope; kill()/start() restarts it on the same port),
                  provisioned as `mesh provision` would (streams and buckets; each node creates its consumers)
    bare_nats     the same, unprovisioned
    nats_url      its URL
    settings      MeshSettings for it, data/out dirs in tmp_path, short ack_wait for fault tests
    bus           a connected, provisioned Bus (no role consumers; pass roles to bus.provision)
    nats_cluster  a 3-node JetStream cluster, provisioned with R3 streams (only for tests that ask for it)
    eventually    poll a condition until it holds or a timeout passes (for states with no event to await)
    retry         repeat an operation while it raises given errors (publishing through a reconnect or election)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

# The tests run the mesh on simulated tiers, as the embedded default does; tests of the refusal unset it.
os.environ.setdefault("MESH_ALLOW_SIM", "1")

from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.embedded import EmbeddedCluster, EmbeddedNats
from tests import meshkit
from tests.meshkit import provision_topology

Condition = Callable[[], bool | Awaitable[bool]]
T = TypeVar("T")


@pytest.fixture
async def bare_nats(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    async with EmbeddedNats(tmp_path / "nats") as server:
        yield server


@pytest.fixture
async def nats_server(bare_nats: EmbeddedNats) -> EmbeddedNats:
    await provision_topology(MeshSettings(nats_url=bare_nats.url))
    return bare_nats


@pytest.fixture
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url


@pytest.fixture
def settings(nats_url: str, tmp_path: Path) -> MeshSettings:
    return MeshSettings(
        nats_url=nats_url,
        data_dir=tmp_path / "mesh",
        out_dir=tmp_path / "out",
        ack_wait=2.0,
        nak_delay=0.1,
        reconnect_wait=0.1,
        connect_timeout=2.0,
    )


@pytest.fixture
def fast(settings: MeshSettings) -> MeshSettings:
    """Settings for a whole local mesh in a test (``tests.meshkit.fast``)."""
    return meshkit.fast(settings)


@pytest.fixture
def place() -> Iterator[Path]:
    """A folder any user can enter (pytest's tmp_path is 0700 under root): the sandbox tests' runs drop
    to an unprivileged uid."""
    path = Path(tempfile.mkdtemp(prefix="mesh-sbx-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def bus(settings: MeshSettings) -> AsyncIterator[Bus]:
    """A connected bus; the events a test emits on it carry the role ``test`` (no role spec's)."""
    async with await Bus.connect(settings, name="test", role="test") as connected:
        yield connected


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[EmbeddedCluster]:
    async with EmbeddedCluster(tmp_path / "cluster", size=3) as cluster:
        await provision_topology(MeshSettings(nats_url=cluster.url, replicas=3))  # R3: one member may be lost
        yield cluster


async def _eventually(condition: Condition, timeout: float = 10.0, interval: float = 0.05,
                      message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} did not hold within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture
def eventually() -> Callable[..., Awaitable[None]]:
    """``await eventually(lambda: x > 3, timeout=5)``; the condition may be sync or async."""
    return _eventually


async def _retry(operation: Callable[[], Awaitable[T]], *, errors: tuple[type[BaseException], ...],
                 timeout: float = 20.0, interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await operation()
        except errors:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(interval)


@pytest.fixture
def retry() -> Callable[..., Awaitable[object]]:
    """``await retry(lambda: bus.dispatch(t), errors=(PublishError,))`` until it succeeds or times out."""
    return _retry
