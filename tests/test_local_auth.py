"""The local mesh (`mesh up` / `mesh run`) runs its nats-server with a token: a client without it is
refused, every `mesh` command run from the same data dir finds it, and it is never on a command line."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import pytest

from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.embedded.local import LocalMesh
from mesh.embedded.localauth import local_settings, token_path
from mesh.errors import NotConnected
from tests.meshkit import ROOT


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[LocalMesh]:
    """The embedded server and provisioning `mesh up` starts (no role processes: they are not the point)."""
    mesh = LocalMesh(MeshSettings(nats_url=None, data_dir=tmp_path / ".mesh", connect_timeout=2.0), roles=[])
    await mesh.start()
    try:
        yield mesh
    finally:
        await mesh.stop()


async def test_a_client_without_the_local_token_is_refused(local: LocalMesh, tmp_path: Path) -> None:
    token = token_path(local.data_dir)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert local.nats is not None and stat.S_IMODE(local.nats.auth_conf.stat().st_mode) == 0o600
    with pytest.raises(nats.errors.Error, match="(?i)authorization"):
        await nats.connect(local.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    with pytest.raises(NotConnected, match="(?i)authorization.*MESH_NATS_TOKEN"):
        await Bus.connect(MeshSettings(nats_url=local.url, connect_timeout=2.0, connect_attempts=1))
    with pytest.raises(nats.errors.Error, match="(?i)authorization"):
        await nats.connect(local.url, token="not-the-token", allow_reconnect=False, max_reconnect_attempts=0)

    # a `mesh` command run from the same data dir finds the URL and the token; the token is on no command line
    found = local_settings(MeshSettings(nats_url=None, data_dir=local.data_dir))
    assert found.nats_url == local.url and found.nats_token is not None
    secret = found.nats_token.get_secret_value()
    assert secret == token.read_text() and len(secret) >= 40
    async with await Bus.connect(found) as bus:
        assert await bus.stream_state(bus.topology.events_stream)
    assert local.nats.pid is not None
    assert secret.encode() not in Path(f"/proc/{local.nats.pid}/cmdline").read_bytes()
    assert secret not in (local.data_dir / "local.json").read_text()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")} | {
        "PYTHONPATH": str(ROOT), "MESH_DATA_DIR": str(local.data_dir)}
    status = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "mesh", "status", "--json"], env=env,
                                     capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert secret not in status.stdout + status.stderr
    # a token is never sent to a server it was not made for
    elsewhere = local_settings(MeshSettings(nats_url="nats://127.0.0.1:1", data_dir=local.data_dir))
    assert elsewhere.nats_token is None
