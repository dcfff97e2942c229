"""``SimBackend``: the sim world in-process, for when no HTTP server is wanted (``mesh run``
without endpoints, unit tests). Faults surface as the same typed errors the HTTP adapters raise."""

from __future__ import annotations

import asyncio
import time

from mesh.backends.base import ChatRequest, ChatResponse, Where
from mesh.backends.sim.world import SimWorld
from mesh.backends.tiers import TierConfig
from mesh.errors import (
    AuthenticationFailed,
    BackendError,
    BackendTimeout,
    BadRequest,
    InsufficientBalance,
    MalformedResponse,
    Overloaded,
    RateLimited,
    ServerError,
    StreamCut,
)


def fault_error(kind: str, *, retry_after: float, tier: str, endpoint: str) -> BackendError:
    """The typed error a fault stands for, as an HTTP adapter would raise it."""
    status = int(kind) if kind.isdigit() else None
    where = Where(tier=tier, endpoint=endpoint, status=status)
    if kind == "429":
        return RateLimited("rate limited (simulated)", retry_after=retry_after, **where)
    if kind in ("503", "529"):
        return Overloaded(f"overloaded (simulated {kind})", **where)
    if kind in ("500", "502"):
        return ServerError(f"server error (simulated {kind})", **where)
    if kind in ("401", "403"):
        return AuthenticationFailed(f"authentication failed (simulated {kind})", **where)
    if kind == "402":
        return InsufficientBalance("insufficient balance (simulated)", **where)
    if kind in ("400", "404"):
        return BadRequest(f"bad request (simulated {kind})", **where)
    if kind == "cut":
        return StreamCut("stream ended before its final event (simulated)", **where)
    if kind == "garbage":
        return MalformedResponse("response is not valid JSON (simulated)", **where)
    return BackendTimeout("timed out (simulated)", **where)


class SimBackend:
    """A ``Backend`` for one sim tier."""

    def __init__(self, tier: TierConfig, world: SimWorld) -> None:
        self.tier = tier
        self.world = world

    async def chat(self, req: ChatRequest, *, timeout: float) -> ChatResponse:
        start = time.perf_counter()
        where = Where(tier=self.tier.name, endpoint=self.tier.endpoint)
        fault = self.world.faults.draw(self.tier.name)
        if fault == "timeout":
            await asyncio.sleep(timeout * min(self.world.latency_scale, 1.0))
            raise BackendTimeout(f"no answer within {timeout:g}s (simulated)", **where)
        if fault is not None and fault != "badjson":
            raise fault_error(fault, retry_after=self.world.faults.retry_after, tier=self.tier.name,
                              endpoint=self.tier.endpoint)
        reply = self.world.reply(req, self.tier, fault=fault)
        duration = reply.ttft + reply.usage.completion_tokens * reply.seconds_per_token
        if duration > timeout:
            await asyncio.sleep(timeout)
            raise BackendTimeout(f"no answer within {timeout:g}s (simulated)", **where)
        if duration > 0:
            await asyncio.sleep(duration)
        return ChatResponse(
            text=reply.text, reasoning=reply.reasoning, tool_calls=reply.tool_calls, usage=reply.usage,
            latency_ms=(time.perf_counter() - start) * 1000, finish_reason=reply.finish_reason,  # type: ignore[arg-type]
            model=self.tier.model, tier=self.tier.name, endpoint=self.tier.endpoint, simulated=True,
        )

    async def aclose(self) -> None:
        return None
