"""The Mesh API: goals as JSON resources and their events as a resumable Server-Sent Events stream.

    POST /v1/goals                         submit (JSON, or multipart: goal + workspace tar.gz) → 202
    GET  /v1/goals                         summaries, newest first
    GET  /v1/goals/{id}                    the goal's state: plan, steps, usage
    GET  /v1/goals/{id}/events             SSE; id: = stream sequence; Last-Event-ID (or ?after=N) resumes
    GET  /v1/events                        SSE of every goal (new events, or after Last-Event-ID / ?after=N)
    POST /v1/goals/{id}/cancel             a cancel command to the planner → 202
    GET  /v1/approvals                     the pending approval gates of every running goal
    POST /v1/goals/{id}/approvals/{gate}   a decision (approve / reject + note) → 200 applied, 202 sent, 409
    GET  /v1/goals/{id}/workspace          the final workspace as tar.gz
    GET  /v1/goals/{id}/artifacts/{name}   one output artifact's bytes
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh.contracts import Event
from mesh.contracts.http import (
    ApprovalList,
    CancelRequest,
    DecisionAnswer,
    DecisionRequest,
    GoalAccepted,
    GoalList,
    GoalRequest,
)
from mesh.errors import MeshError, RequestRefused
from mesh.gateway.auth import Principal, error_body
from mesh.gateway.goals import Desk, event_json, pack_folder, scratch_dir, unpack_workspace
from mesh.gateway.sse import KEEPALIVE, EventStreamResponse, frame, with_silences

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger(__name__)


def principal(request: Request) -> Principal:
    who: Principal = request.scope["state"]["principal"]
    return who


def desk(request: Request) -> Desk:
    d: Desk = request.app.state.desk
    return d


def parse(model: type[M], raw: bytes | str | Any, *, what: str = "body") -> M:
    """Validate JSON (bytes/str) or an already-decoded value against ``model``: a 400 naming the problem."""
    try:
        if isinstance(raw, bytes | str):
            return model.model_validate_json(raw or b"{}")
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or what
        kind = "malformed JSON" if first["type"] == "json_invalid" else "invalid request"
        raise RequestRefused(f"{kind} in {what}: {where}: {first['msg']}", param=where) from exc


async def read_json(request: Request, model: type[M]) -> M:
    return parse(model, await request.body())


async def submit_goal(request: Request) -> Response:
    key = request.headers.get("idempotency-key")
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    d, who = desk(request), principal(request)
    if kind == "multipart/form-data":
        async with request.form(max_files=1, max_fields=4) as form:
            goal_field, upload = form.get("goal"), form.get("workspace")
            if not isinstance(goal_field, str):
                raise RequestRefused("multipart submission needs a `goal` field (JSON)", param="goal")
            body = parse(GoalRequest, goal_field, what="goal")
            if upload is None or isinstance(upload, str):
                raise RequestRefused("multipart submission needs a `workspace` file (tar.gz)", param="workspace")
            data = await upload.read()
        with scratch_dir() as tmp:
            goal_id, replayed = await d.submit(who, body, idempotency_key=key,
                                               workspace=unpack_workspace(data, Path(tmp)))
    elif kind in ("application/json", ""):
        goal_id, replayed = await d.submit(who, await read_json(request, GoalRequest), idempotency_key=key)
    else:
        raise RequestRefused(f"a goal is sent as application/json, or as multipart/form-data with a workspace; "
                             f"not {kind}", status=415, code="unsupported_media_type", param="Content-Type")
    accepted = GoalAccepted(goal_id=goal_id, replayed=replayed, status_url=f"/v1/goals/{goal_id}",
                            events_url=f"/v1/goals/{goal_id}/events")
    return JSONResponse(accepted.model_dump(), status_code=200 if replayed else 202,
                        headers={"Location": accepted.status_url, "X-Mesh-Goal-Id": goal_id})


async def list_goals(request: Request) -> Response:
    return JSONResponse(GoalList(goals=await desk(request).summaries()).model_dump(mode="json"))


async def get_goal(request: Request) -> Response:
    state = await desk(request).state(request.path_params["goal_id"])
    return JSONResponse(state.model_dump(mode="json"))


def resume_position(request: Request) -> int:
    """The last sequence the client has: ``Last-Event-ID`` (what EventSource sends), else ``?after=``."""
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    try:
        after = int(raw)
    except ValueError:
        after = -1
    if after < 0:
        raise RequestRefused(f"Last-Event-ID/after must be a stream sequence (an integer ≥ 0), not {raw!r}",
                             param="Last-Event-ID")
    return after


def event_stream(request: Request, events: AsyncIterator[tuple[int, Event]], what: str,
                 headers: dict[str, str] | None = None) -> EventStreamResponse:
    """``events`` as SSE: ``id:`` = stream sequence, ``event:`` = type, keep-alives in silences."""
    interval: float = request.app.state.keepalive

    async def body() -> AsyncIterator[bytes]:
        yield b"retry: 1000\n\n"
        try:
            async for item in with_silences(events, interval):
                if item is None:
                    yield KEEPALIVE
                else:
                    seq, event = item
                    yield frame(event_json(event), event=event.type, id=seq)
        except MeshError as exc:  # the status line went out already: say it in the stream, then end it
            log.warning("event stream of %s failed: %r", what, exc)
            yield frame(error_body(RequestRefused(f"the event stream failed: {exc}; reconnect with Last-Event-ID",
                                                  status=503, type="server_error", code="stream_failed")),
                        event="error")

    return EventStreamResponse(body(), headers=headers)


async def goal_events(request: Request) -> Response:
    # No 404 for a goal without state: one just submitted has none until the planner takes it up, and its
    # events are worth waiting for (keep-alives fill the wait).
    goal_id, d = request.path_params["goal_id"], desk(request)
    after = resume_position(request)
    await d.check_position(after)
    return event_stream(request, d.events(goal_id, after), goal_id, {"X-Mesh-Goal-Id": goal_id})


async def all_events(request: Request) -> Response:
    """Every goal's events, endless: from ``Last-Event-ID`` / ``?after=`` when given, else new ones only."""
    d = desk(request)
    resuming = "last-event-id" in request.headers or "after" in request.query_params
    after = resume_position(request) if resuming else None
    if after is not None:
        await d.check_position(after)
    return event_stream(request, d.all_events(after), "every goal")


async def cancel_goal(request: Request) -> Response:
    goal_id = request.path_params["goal_id"]
    body = await read_json(request, CancelRequest)
    sent = await desk(request).cancel(principal(request), goal_id, body.reason)
    return JSONResponse({"goal_id": goal_id, "cancel": "requested" if sent else "goal already ended"},
                        status_code=202 if sent else 200)


async def list_approvals(request: Request) -> Response:
    return JSONResponse(ApprovalList(approvals=await desk(request).approvals()).model_dump(mode="json"))


async def decide_gate(request: Request) -> Response:
    goal_id, gate = request.path_params["goal_id"], request.path_params["gate"]
    body = await read_json(request, DecisionRequest)
    by, decided = await desk(request).decide(principal(request), goal_id, gate, body.decision, body.note)
    answer = DecisionAnswer(goal_id=goal_id, gate=gate, decision=body.decision, by=by,
                            status="applied" if decided is not None else "sent")
    return JSONResponse(answer.model_dump(), status_code=200 if decided is not None else 202)


async def workspace(request: Request) -> Response:
    goal_id = request.path_params["goal_id"]
    results = await desk(request).results(goal_id)
    if not results.workspace:
        raise RequestRefused(f"goal {goal_id!r} has no workspace (yet)", status=404, type="not_found_error",
                             code="no_workspace")
    return Response(pack_folder(results.workspace), media_type="application/gzip",
                    headers={"Content-Disposition": f'attachment; filename="{goal_id}-workspace.tar.gz"'})


async def artifact(request: Request) -> Response:
    goal_id, name = request.path_params["goal_id"], request.path_params["name"]
    results = await desk(request).results(goal_id)
    found = results.artifacts.get(name)
    if found is None:
        raise RequestRefused(f"goal {goal_id!r} has no artifact {name!r}; it has: "
                             f"{', '.join(sorted(results.artifacts)) or 'none'}", status=404,
                             type="not_found_error", code="no_artifact")
    return Response(found, media_type="text/markdown; charset=utf-8")


async def openapi(request: Request) -> Response:
    from mesh.spec.openapi import openapi_document

    return Response(json.dumps(openapi_document(), indent=2), media_type="application/json")


ROUTES = [
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/v1/goals", submit_goal, methods=["POST"]),
    Route("/v1/goals", list_goals, methods=["GET"]),
    Route("/v1/goals/{goal_id}", get_goal, methods=["GET"]),
    Route("/v1/goals/{goal_id}/events", goal_events, methods=["GET"]),
    Route("/v1/events", all_events, methods=["GET"]),
    Route("/v1/goals/{goal_id}/cancel", cancel_goal, methods=["POST"]),
    Route("/v1/approvals", list_approvals, methods=["GET"]),
    Route("/v1/goals/{goal_id}/approvals/{gate}", decide_gate, methods=["POST"]),
    Route("/v1/goals/{goal_id}/workspace", workspace, methods=["GET"]),
    Route("/v1/goals/{goal_id}/artifacts/{name:path}", artifact, methods=["GET"]),
]
