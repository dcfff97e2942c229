"""The gateway's Mesh API as an OpenAPI 3.1 document: rendered from the HTTP contracts (``mesh.contracts.http``)
and the message schemas, served by the gateway at ``/openapi.json`` and kept in ``schemas/gateway.openapi.json``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from mesh.contracts.codec import SCHEMA_VERSION
from mesh.contracts.http import (
    ApprovalList,
    CancelRequest,
    DecisionAnswer,
    DecisionRequest,
    ErrorBody,
    GoalAccepted,
    GoalList,
    GoalRequest,
)

_MODELS: tuple[type[BaseModel], ...] = (GoalRequest, CancelRequest, GoalAccepted, GoalList, ErrorBody, ApprovalList,
                                        DecisionRequest, DecisionAnswer)
_ERRORS = {"400": "invalid request (the message and `param` say what)", "401": "missing or invalid bearer token",
           "403": "over the token's budget cap", "404": "no such goal, artifact or model",
           "409": "the approval gate is not pending (never requested, already decided, or the goal ended)",
           "413": "body too large", "429": "rate limited (Retry-After)"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": _ref(name)}}}


def _op(summary: str, ok: dict[str, Any], *, body: dict[str, Any] | None = None, errors: tuple[str, ...] = (),
        params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {**ok, **{c: {"description": _ERRORS[c], **_json(
        "ErrorBody")} for c in ("400", "401", "429", *errors)}}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": body}
    if params:
        op["parameters"] = params
    return op


GOAL_ID = {"name": "goal_id", "in": "path", "required": True, "schema": {"type": "string"}}


def openapi_document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in _MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas["GoalState"] = {"type": "object", "description": "The goal's state as the planner keeps it: goal, "
                            "status, plan steps with their status, tier and outputs, usage, result, workspace."}
    schemas["Event"] = {"$ref": "event.schema.json", "description": "One event (schemas/event.schema.json)."}
    events = {"description": "Server-Sent Events: `id:` is the event stream's sequence, `event:` the event type, "
                             "`data:` the event as JSON. Ends after the goal's final event; `: keep-alive` "
                             "comments fill silences. Reconnect with `Last-Event-ID` (or `?after=`) to resume "
                             "with no gap and no duplicate.",
              "content": {"text/event-stream": {"schema": {"type": "string"}}}}
    paths = {
        "/v1/goals": {
            "post": _op("Submit a goal; `Idempotency-Key` makes a retry return the same goal (200, replayed)",
                        {"202": {"description": "accepted", **_json("GoalAccepted")},
                         "200": {"description": "replayed: the key named an earlier goal", **_json("GoalAccepted")}},
                        body={"application/json": {"schema": _ref("GoalRequest")},
                              "multipart/form-data": {"schema": {"type": "object", "required": ["goal", "workspace"],
                                                                 "properties": {
                                                                     "goal": {"type": "string",
                                                                              "description": "GoalRequest as JSON"},
                                                                     "workspace": {"type": "string",
                                                                                   "format": "binary",
                                                                                   "description": "tar.gz of the "
                                                                                   "starting workspace"}}}}},
                        errors=("403", "413"),
                        params=[{"name": "Idempotency-Key", "in": "header", "required": False,
                                 "schema": {"type": "string", "maxLength": 255}}]),
            "get": _op("Goals, newest first", {"200": {"description": "goals", **_json("GoalList")}}),
        },
        "/v1/goals/{goal_id}": {"get": _op("A goal's state", {"200": {"description": "state", **_json("GoalState")}},
                                           errors=("404",), params=[GOAL_ID])},
        "/v1/goals/{goal_id}/events": {"get": _op(
            "The goal's events as Server-Sent Events, resumable", {"200": events, "410": {
                "description": "the resume position is older than the stream keeps (MESH_EVENTS_MAX_AGE); "
                              "`earliest_seq` names the first it has", **_json("ErrorBody")}},
            errors=("404",), params=[GOAL_ID, {"name": "Last-Event-ID", "in": "header", "required": False,
                                               "schema": {"type": "integer", "minimum": 0}},
                                     {"name": "after", "in": "query", "required": False,
                                      "schema": {"type": "integer", "minimum": 0}}])},
        "/v1/events": {"get": _op(
            "Every goal's events as Server-Sent Events, without end: new ones, or those after `Last-Event-ID` "
            "(or `?after=`)", {"200": events, "410": {"description": "the resume position is older than the "
                                                             "stream keeps", **_json("ErrorBody")}},
            params=[{"name": "Last-Event-ID", "in": "header", "required": False,
                     "schema": {"type": "integer", "minimum": 0}},
                    {"name": "after", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}}])},
        "/v1/goals/{goal_id}/cancel": {"post": _op(
            "Ask the planner to cancel the goal", {"202": {"description": "cancel command sent"},
                                                   "200": {"description": "the goal had ended already"}},
            body={"application/json": {"schema": _ref("CancelRequest")}}, errors=("404",), params=[GOAL_ID])},
        "/v1/approvals": {"get": _op(
            "The approvals inbox: every pending gate of every running goal (docs/APPROVALS.md)",
            {"200": {"description": "pending gates", **_json("ApprovalList")}})},
        "/v1/goals/{goal_id}/approvals/{gate}": {"post": _op(
            "Decide a pending gate (plan, final, <step>.before, <step>.after); the decider is the token's name",
            {"200": {"description": "applied by the planner", **_json("DecisionAnswer")},
             "202": {"description": "sent; no planner applied it within the wait (it will)", **_json("DecisionAnswer")}},
            body={"application/json": {"schema": _ref("DecisionRequest")}}, errors=("404", "409"),
            params=[GOAL_ID, {"name": "gate", "in": "path", "required": True, "schema": {"type": "string"}}])},
        "/v1/goals/{goal_id}/workspace": {"get": _op(
            "The goal's final workspace", {"200": {"description": "tar.gz", "content": {
                "application/gzip": {"schema": {"type": "string", "format": "binary"}}}}},
            errors=("404",), params=[GOAL_ID])},
        "/v1/goals/{goal_id}/artifacts/{name}": {"get": _op(
            "One text output of the goal's steps", {"200": {"description": "the artifact", "content": {
                "text/markdown": {"schema": {"type": "string"}}}}}, errors=("404",),
            params=[GOAL_ID, {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}])},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Mesh gateway — Mesh API", "version": SCHEMA_VERSION,
                 "description": "Goals as resources and their events as a resumable SSE stream. The same gateway "
                                "serves OpenAI-compatible /v1/models and /v1/chat/completions, A2A v1.0 at /a2a "
                                "(card at /.well-known/agent-card.json) and MCP at /mcp (docs/GATEWAY.md). Every "
                                "error is OpenAI's format: {\"error\": {\"message\", \"type\", \"code\", "
                                "\"param\"}}."},
        "servers": [{"url": "http://127.0.0.1:8600"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
