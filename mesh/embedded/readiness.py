"""Waiting for parts of a local mesh to come up. The embedded sim-server and edge model server emit no
readiness event, so their health URL is polled until it answers 200, the process dies, or time runs out.
Role nodes do announce themselves: ``wait_for_roles`` watches their heartbeats in KV ``mesh_nodes``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from contextlib import aclosing, suppress
from typing import TYPE_CHECKING

from mesh.errors import EmbeddedServerError, MeshError

if TYPE_CHECKING:
    from mesh.bus.client import Bus
    from mesh.embedded.child import ChildProcess


async def wait_http(url: str, proc: ChildProcess, timeout: float = 20.0) -> None:
    """Return once ``GET url`` answers 200; ``EmbeddedServerError`` if ``proc`` exits or ``timeout`` passes."""
    import aiohttp

    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as session:
        while asyncio.get_running_loop().time() < deadline:
            if not proc.running:
                raise EmbeddedServerError(f"{url}: the {proc.what} process exited with {proc.returncode}")
            with suppress(aiohttp.ClientError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)  # polling a process that has no readiness event to await
    raise EmbeddedServerError(f"{url} did not become ready within {timeout:.0f}s")


async def wait_for_roles(bus: Bus, roles: Iterable[str], timeout: float = 180.0,
                         report: Callable[[list[str]], None] | None = None) -> None:
    """Return once every role has a node heartbeat in KV ``mesh_nodes``: its node is connected, its durable
    consumers are provisioned and its consumer loops have started. ``report`` hears the roles still
    missing at the start and whenever that changes (the last time with none)."""
    missing = set(roles)
    if report is not None:
        report(sorted(missing))
    if not missing:
        return
    try:
        async with asyncio.timeout(timeout), aclosing(bus.kv_watch(bus.topology.kv_nodes)) as beats:
            async for beat in beats:
                role = json.loads(beat)["role"]
                if role in missing:
                    missing.discard(role)
                    if report is not None:
                        report(sorted(missing))
                if not missing:
                    return
    except TimeoutError:
        raise MeshError(f"roles did not come up within {timeout:.0f}s: {sorted(missing)} (see the nodes' logs)") from None
