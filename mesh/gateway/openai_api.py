"""OpenAI-compatible face: the mesh as a model named ``mesh``.

``POST /v1/chat/completions``: the last user message is the goal, system/developer messages are its pinned
constraints, ``metadata`` becomes goal options; ``max_tokens`` is ignored (clients send 1-4k by default,
which is no goal budget). Streaming sends each step's progress as a named SSE event ``mesh.progress``
(a chunk with no choices, so it never lands in ``delta.content``), keep-alive comments in silences, the
synthesis as content chunks, a usage chunk when ``stream_options.include_usage``, then ``[DONE]``.
The goal id is in the ``X-Mesh-Goal-Id`` header; the goal runs on if the client goes away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh.contracts import Event, GoalCompleted, GoalFailed
from mesh.contracts.http import GoalRequest
from mesh.errors import RequestRefused
from mesh.gateway.auth import error_body
from mesh.gateway.goals import Desk, describe
from mesh.gateway.mesh_api import desk, principal, read_json
from mesh.gateway.sse import KEEPALIVE, EventStreamResponse, frame, with_silences

MODEL = "mesh"
CHUNK_CHARS = 400  # synthesis text per content chunk


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "\n".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """What OpenAI clients send; fields the mesh has no use for (temperature, max_tokens, …) are accepted
    and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    metadata: dict[str, Any] | None = None

    def goal(self) -> GoalRequest:
        users = [m.text() for m in self.messages if m.role == "user" and m.text().strip()]
        if not users:
            raise RequestRefused("messages: no user message with text to take as the goal", param="messages")
        pinned = [m.text() for m in self.messages if m.role in ("system", "developer") and m.text().strip()]
        return GoalRequest(brief=users[-1], constraints=pinned, options=dict(self.metadata or {}))


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                                     "owned_by": "mesh"}]})


async def chat_completions(request: Request) -> Response:
    body = await read_json(request, ChatRequest)
    if body.model != MODEL:
        raise RequestRefused(f"model {body.model!r} does not exist; this gateway serves {MODEL!r}", status=404,
                             type="invalid_request_error", code="model_not_found", param="model")
    d = desk(request)
    goal_id, _ = await d.submit(principal(request), body.goal(),
                                idempotency_key=request.headers.get("idempotency-key"))
    headers = {"X-Mesh-Goal-Id": goal_id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(_stream(d, goal_id, include_usage, request.app.state.keepalive),
                                   headers=headers)
    try:
        async with asyncio.timeout(request.app.state.request_timeout):
            final = await _final_event(d, goal_id)
    except TimeoutError:
        raise RequestRefused(f"goal {goal_id} did not finish within {request.app.state.request_timeout:g}s; it "
                             f"keeps running: follow it at /v1/goals/{goal_id}", status=504, type="timeout",
                             code="goal_timeout", goal_id=goal_id) from None
    if not isinstance(final, GoalCompleted):
        raise _ended_without_result(goal_id, final)
    text = await d.synthesis(goal_id)
    completion = {"id": f"chatcmpl-{goal_id}", "object": "chat.completion", "created": int(time.time()),
                  "model": MODEL, "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": text}}],
                  "usage": _usage(final)}
    return JSONResponse(completion, headers=headers)


async def _final_event(d: Desk, goal_id: str) -> Event:
    last: Event | None = None
    async for _, event in d.events(goal_id):
        last = event
    assert last is not None, "a finished watch ends with the goal's final event"
    return last


def _ended_without_result(goal_id: str, final: Event) -> RequestRefused:
    reason = final.reason if isinstance(final, GoalFailed) else getattr(final, "reason", "")
    status = "failed" if isinstance(final, GoalFailed) else "was cancelled"
    return RequestRefused(f"goal {goal_id} {status}: {reason}", status=502 if isinstance(final, GoalFailed) else 409,
                          type="server_error", code=f"goal_{final.type.split('.')[1]}", goal_id=goal_id)


def _usage(done: GoalCompleted) -> dict[str, int]:
    u = done.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


async def _stream(d: Desk, goal_id: str, include_usage: bool, keepalive: float) -> AsyncIterator[bytes]:
    base = {"id": f"chatcmpl-{goal_id}", "created": int(time.time()), "model": MODEL}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return frame({**base, "object": "chat.completion.chunk",
                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": ""})
    final: Event | None = None
    async for item in with_silences(d.events(goal_id), keepalive):
        if item is None:
            yield KEEPALIVE
            continue
        seq, final = item
        text = describe(final)
        if text is not None:
            yield frame({**base, "object": "mesh.progress", "choices": [],
                         "progress": {"seq": seq, "type": final.type, "text": text,
                                      "step_id": getattr(final, "step_id", None),
                                      "role": getattr(final, "role", None)}}, event="mesh.progress")
    if isinstance(final, GoalCompleted):
        text = await d.synthesis(goal_id)
        for start in range(0, len(text), CHUNK_CHARS):
            yield chunk({"content": text[start:start + CHUNK_CHARS]})
        yield chunk({}, "stop")
        if include_usage:
            yield frame({**base, "object": "chat.completion.chunk", "choices": [], "usage": _usage(final)})
    elif final is not None:
        yield frame(error_body(_ended_without_result(goal_id, final)))
    yield frame("[DONE]")


ROUTES = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
]
