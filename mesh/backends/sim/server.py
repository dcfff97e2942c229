"""``mesh sim-server``: the sim world over HTTP, OpenAI-compatible (``/v1/chat/completions``) and
Anthropic-compatible (``/v1/messages``), so the real SDK clients are exercised end to end.

One server serves every tier: the request's model name picks the tier profile (``sim-edge``,
``sim-long-context``, ``sim-swarm``, or real names such as ``deepseek-v4-pro`` / ``kimi-k2.6``).
Control endpoints for tests: ``GET|POST /_sim/faults`` (``{"faults": "503:1", "tier": "swarm",
"limit": 3}`` — ``limit`` ends the storm after that many faults)
``GET /_sim/stats``, and ``GET /_sim/requests`` (the last prompts received, with their hints, so a test
can check what actually went over the wire); ``GET /healthz`` for readiness.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Self

import pydantic
from aiohttp import web

from mesh.backends.base import HINTS_HEADER, ChatRequest
from mesh.backends.sim import wire
from mesh.backends.sim.faults import ALL_TIERS
from mesh.backends.sim.world import SimReply, SimWorld
from mesh.errors import ConfigError, ContextTooLong

HANG_SECONDS = 30.0  # a "timeout" fault stalls this long unless the client gives up first

_WORLD = web.AppKey("world", SimWorld)
_STATS = web.AppKey("stats", dict[str, int])
_LOG = web.AppKey("log", deque[dict[str, Any]])
_POSE = web.AppKey("pose_as_real", bool)
LOG_REQUESTS = 2000


class _Api:
    """What differs between the two APIs: request parsing and body/frame/error rendering."""

    def __init__(self, name: str, parse: Callable[[dict[str, Any], dict[str, Any], bool], ChatRequest],
                 full: Callable[[SimReply, str], dict[str, Any]], frames: Callable[[SimReply, str, dict[str, Any]], list[wire.Frame]],
                 error: Callable[[int, str | None], dict[str, Any]]) -> None:
        self.name, self.parse, self.full, self.frames, self.error = name, parse, full, frames, error


OPENAI = _Api(
    "openai",
    lambda body, meta, thinking: wire.openai_request(body, default_thinking=thinking, metadata=meta),
    wire.openai_response,
    lambda r, model, body: wire.openai_frames(r, model, include_usage=bool((body.get("stream_options") or {}).get("include_usage"))),
    lambda status, message: wire.openai_error(status, message, "context_length_exceeded" if message and "context length" in message else None),
)
ANTHROPIC = _Api(
    "anthropic",
    lambda body, meta, thinking: wire.anthropic_request(body, metadata=meta),
    wire.anthropic_response,
    lambda r, model, body: wire.anthropic_frames(r, model),
    wire.anthropic_error,
)


def _error(api: _Api, status: int, message: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(api.error(status, message), status=status, headers=headers)


async def _chat(request: web.Request, api: _Api) -> web.StreamResponse:
    world = request.app[_WORLD]
    stats = request.app[_STATS]
    try:
        body = await request.json()
        model = str(body["model"])
        tier = world.tier_config(model)
        meta = json.loads(request.headers.get(HINTS_HEADER, "{}"))
        req = api.parse(body, meta, tier.thinking)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, pydantic.ValidationError) as exc:
        return _error(api, 400, f"invalid request body: {exc}"[:300])
    request.app[_LOG].append({"api": api.name, "tier": tier.name, "hints": meta,
                              "prompt": "\n".join(m.content for m in req.messages if m.role in ("system", "user"))})
    stats[f"requests.{tier.name}"] += 1
    stats[f"requests.{api.name}"] += 1
    # What a provider would check: reasoning sent back on assistant turns, the thinking switch.
    stats["received.reasoning_content"] += sum(
        1 for m in body.get("messages", []) if isinstance(m, dict) and m.get("reasoning_content"))
    stats["received.thinking_switch"] += "thinking" in body
    fault = world.faults.draw(tier.name)
    if fault is not None:
        stats[f"faults.{tier.name}.{fault}"] += 1
    if fault == "timeout":
        await asyncio.sleep(HANG_SECONDS)  # cancelled when the client disconnects
        return _error(api, 504)
    if fault is not None and fault.isdigit():
        retry = world.faults.retry_after
        headers = {"retry-after": str(math.ceil(retry)), "retry-after-ms": str(int(retry * 1000))} if fault == "429" else None
        return _error(api, int(fault), headers=headers)
    if fault == "garbage":
        if req.stream:
            return web.Response(text="data: {this is not json\n\ndata: [DONE]\n\n", content_type="text/event-stream")
        return web.Response(text="<html><body>502 Bad Gateway</body></html>", content_type="application/json")
    try:
        reply = world.reply(req, tier, fault=fault)
    except ContextTooLong as exc:
        return _error(api, 400, str(exc))
    pose = request.app[_POSE]
    if not req.stream:
        await asyncio.sleep(reply.ttft + reply.usage.completion_tokens * reply.seconds_per_token)
        text = wire.dump(api.full(reply, model))
        return web.Response(text=wire.disguise(text) if pose else text, content_type="application/json")
    frames = api.frames(reply, model, body)
    if pose:
        frames = [(event, wire.disguise(data), tokens) for event, data, tokens in frames]
    return await _stream(request, frames, reply, cut=fault == "cut")


async def _stream(request: web.Request, frames: list[wire.Frame], reply: SimReply, *, cut: bool) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    if reply.ttft:
        await asyncio.sleep(reply.ttft)
    stop_at = len(frames) // 2 if cut else len(frames)
    for event, data, tokens in frames[:stop_at]:
        await resp.write((f"event: {event}\n" if event else "").encode() + f"data: {data}\n\n".encode())
        if tokens and reply.seconds_per_token:
            await asyncio.sleep(tokens * reply.seconds_per_token)
    if cut:  # drop the connection mid-body: the client sees an incomplete chunked response
        assert request.transport is not None
        request.transport.abort()
        return resp
    await resp.write_eof()
    return resp


async def _openai(request: web.Request) -> web.StreamResponse:
    return await _chat(request, OPENAI)


async def _anthropic(request: web.Request) -> web.StreamResponse:
    return await _chat(request, ANTHROPIC)


async def _faults(request: web.Request) -> web.Response:
    world = request.app[_WORLD]
    if request.method == "POST":
        try:
            body = await request.json()
            limit = body.get("limit")
            world.faults.set(str(body.get("faults", "")), str(body.get("tier", ALL_TIERS)),
                             limit=None if limit is None else int(limit))
        except (json.JSONDecodeError, ConfigError, AttributeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
    return web.json_response({"faults": world.faults.describe(), "retry_after": world.faults.retry_after})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[_STATS])


async def _requests(request: web.Request) -> web.Response:
    log = request.app[_LOG]
    return web.json_response(list(log))


async def _models(request: web.Request) -> web.Response:
    """``GET /v1/models`` as OpenAI-compatible servers answer it: the sim's model of each tier profile."""
    world = request.app[_WORLD]
    return web.json_response({"object": "list", "data": [{"id": cfg.model, "object": "model", "owned_by": "mesh-sim"}
                                                         for cfg in world.tiers.values()]})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "simulated": not request.app[_POSE]})


def make_app(world: SimWorld, *, pose_as_real: bool = False) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[_WORLD] = world
    app[_POSE] = pose_as_real
    app[_STATS] = Counter()  # a dict[str, int] that starts every key at 0
    app[_LOG] = deque(maxlen=LOG_REQUESTS)
    app.router.add_post("/v1/chat/completions", _openai)
    app.router.add_post("/v1/messages", _anthropic)
    app.router.add_get("/v1/models", _models)
    app.router.add_route("*", "/_sim/faults", _faults)
    app.router.add_get("/_sim/stats", _stats)
    app.router.add_get("/_sim/requests", _requests)
    app.router.add_get("/healthz", _healthz)
    return app


class SimServer:
    """The sim-server on ``host:port`` (0 = a free port) inside the running event loop."""

    def __init__(self, world: SimWorld, *, host: str = "127.0.0.1", port: int = 0, pose_as_real: bool = False) -> None:
        """``pose_as_real``: answers carry no sim marks, as a real provider's would (for fallback tests)."""
        self.world = world
        self.host, self.port = host, port
        # handler_cancellation: a client that gives up (timeout fault) cancels its stalled handler.
        self._runner = web.AppRunner(make_app(world, pose_as_real=pose_as_real), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)

    @property
    def url(self) -> str:
        """Base URL for the Anthropic SDK; the OpenAI SDK's is ``url + "/v1"``."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:  # a busy port: a clear error for `mesh sim-server --port N`, not a traceback
            await self._runner.cleanup()
            raise ConfigError(f"the sim-server cannot listen on {self.host}:{self.port}: {exc.strerror}") from exc
        self.port = site.port

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
