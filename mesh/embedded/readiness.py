"""Waiting for a child HTTP server to come up: the embedded sim-server and edge model server emit no
readiness event, so their health URL is polled until it answers 200, the process dies, or time runs out."""

from __future__ import annotations

import asyncio
import subprocess
from contextlib import suppress

from mesh.errors import EmbeddedServerError


async def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Return once ``GET url`` answers 200; ``EmbeddedServerError`` if ``proc`` exits or ``timeout`` passes."""
    import aiohttp

    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as session:
        while asyncio.get_running_loop().time() < deadline:
            if proc.poll() is not None:
                raise EmbeddedServerError(f"{url}: the server process exited with {proc.returncode}")
            with suppress(aiohttp.ClientError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)  # polling a process that has no readiness event to await
    raise EmbeddedServerError(f"{url} did not become ready within {timeout:.0f}s")
