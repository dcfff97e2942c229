"""A real gateway over a real mesh for tests: nats-server, in-process role nodes on the sim, a MeshClient,
and the gateway serving real HTTP on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from mesh.client import MeshClient
from mesh.config import MeshSettings
from mesh.gateway.app import Gateway, running
from tests.meshkit import in_process_mesh


@asynccontextmanager
async def gateway(settings: MeshSettings, *, roles: bool = True) -> AsyncIterator[tuple[Gateway, MeshClient]]:
    """The gateway on 127.0.0.1:<free port>; ``roles=False`` leaves the mesh without nodes (requests that are
    refused before they reach the bus need none)."""
    async with MeshClient.connect(settings, name="gateway-test") as client:
        if roles:
            async with in_process_mesh(settings), running(client, settings) as gw:
                yield gw, client
        else:
            async with running(client, settings) as gw:
                yield gw, client


def tokens_file(tmp: Path, **caps: object) -> tuple[Path, str]:
    """A tokens file with one token named ``ci`` (and ``caps``); returns (file, the token)."""
    from mesh.gateway.auth import hash_token

    token = "mesh_test_token_ci"
    lines = ["[[token]]", 'name = "ci"', f'sha256 = "{hash_token(token)}"']
    lines += [f"{k} = {v}" for k, v in caps.items()]
    path = tmp / "tokens.toml"
    path.write_text("\n".join(lines) + "\n")
    return path, token
