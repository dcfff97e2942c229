"""Render ``schemas/``: one JSON Schema per message kind, the envelope, and ``asyncapi.json``.

``render()`` is pure (a dict of file name → text) so a test can compare it with the checked-in
files; ``export()`` writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mesh.bus.topology import Topology
from mesh.contracts.codec import MESSAGE_KINDS, SCHEMA_VERSION
from mesh.spec.openapi import openapi_document

ROLE_PARAM = "{role}"
GOAL_PARAM = "{goal_id}"
TYPE_PARAM = "{type}"

ENVELOPE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Envelope",
    "description": (
        "Every Mesh message is one msgpack map of this shape. `body` holds the message of `kind` "
        "(see <kind>.schema.json); `claim` replaces it when the body was moved to the object store "
        "(claim-check). Readers accept unknown fields and any minor version of their major version."
    ),
    "type": "object",
    "required": ["v", "id", "kind", "ts"],
    "properties": {
        "v": {"type": "string", "pattern": r"^\d+\.\d+$", "description": f"schema version, now {SCHEMA_VERSION}"},
        "id": {"type": "string", "description": "message id"},
        "kind": {"enum": sorted(MESSAGE_KINDS)},
        "goal": {"type": ["string", "null"]},
        "ts": {"type": "string", "format": "date-time"},
        "trace": {
            "type": "object",
            "description": "W3C trace context; also sent as NATS headers",
            "properties": {"traceparent": {"type": "string"}, "tracestate": {"type": "string"}},
            "additionalProperties": {"type": "string"},
        },
        "body": {"type": "object"},
        "claim": {"$ref": "artifact_ref.schema.json"},
    },
    "oneOf": [{"required": ["body"]}, {"required": ["claim"]}],
}


def _json(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def message_schemas() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind, adapter in sorted(MESSAGE_KINDS.items()):
        schema = adapter.json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema.setdefault("title", kind)
        out[kind] = schema
    return out


def asyncapi(topo: Topology) -> dict[str, Any]:
    """Every subject, its payload, and who sends or receives it."""
    # The planner (orchestrator) is a role like the others; workers are any role with a task subject.
    channels: dict[str, Any] = {
        "goals": {
            "address": topo.goal_subject(),
            "description": f"Goals submitted to the mesh. Stream {topo.goals_stream} (work-queue).",
            "messages": {"goal": {"$ref": "#/components/messages/goal"}},
        },
        "tasks": {
            "address": topo.task_subject(ROLE_PARAM),
            "description": f"Tasks for one role. Stream {topo.tasks_stream} (work-queue), durable pull consumer "
            f"{topo.consumer_name(ROLE_PARAM)}; Nats-Msg-Id = goal_id.step_id.attempt.",
            "parameters": {"role": {"description": "worker role, e.g. coder"}},
            "messages": {"task": {"$ref": "#/components/messages/task"}},
        },
        "events": {
            "address": topo.event_subject(GOAL_PARAM, ROLE_PARAM, TYPE_PARAM),
            "description": f"The public event stream (stream {topo.events_stream}, limits retention). Subscribe "
            f"to {topo.events_filter()} or one goal's {topo.events_filter(GOAL_PARAM)}. `role` is the role of the "
            "node that emitted the event: each role may publish only under its own role (server permissions, "
            f"docs/DEPLOY.md); goal-level events come only from {topo.goal_role!r}, and the planner counts a "
            "step outcome only from the role the step was dispatched to. `type` is the event type, two tokens "
            "(step.completed). Schema-1 events (before schema 2.0) were published on "
            f"{topo.prefix}.event.{{goal_id}}.{{type}} and are still read from the stream's history.",
            "parameters": {"goal_id": {"description": "goal id, or _system for node events"},
                           "role": {"description": "role of the emitting node, e.g. coder or planner"},
                           "type": {"description": "event type"}},
            "messages": {"event": {"$ref": "#/components/messages/event"}},
        },
        "control": {
            "address": topo.control_subject(GOAL_PARAM),
            "description": f"Commands for one goal (cancel). Stream {topo.control_stream} (work-queue), durable "
            f"pull consumer {topo.control_consumer}: the planner applies each to the goal state by "
            "compare-and-swap and announces the result as an event. Clients never write goal state.",
            "parameters": {"goal_id": {"description": "goal id"}},
            "messages": {"goal_command": {"$ref": "#/components/messages/goal_command"}},
        },
        "dlq": {
            "address": topo.dlq_subject(ROLE_PARAM),
            "description": f"Dead letters (stream {topo.dlq_stream}): poison or exhausted messages with the reason.",
            "parameters": {"role": {"description": "role whose consumer gave up"}},
        },
    }
    operations = {
        "submitGoal": {"action": "send", "channel": {"$ref": "#/channels/goals"},
                       "description": "Sent by `mesh submit`/`mesh run` and any client."},
        "receiveGoal": {"action": "receive", "channel": {"$ref": "#/channels/goals"},
                        "description": "Received by the planner (orchestrator)."},
        "dispatchTask": {"action": "send", "channel": {"$ref": "#/channels/tasks"},
                         "description": "Sent by the planner when a step becomes ready."},
        "receiveTask": {"action": "receive", "channel": {"$ref": "#/channels/tasks"},
                        "description": "Received by the worker role named in the subject."},
        "publishEvent": {"action": "send", "channel": {"$ref": "#/channels/events"},
                         "description": "Sent by every node, under its own role."},
        "receiveEvent": {"action": "receive", "channel": {"$ref": "#/channels/events"},
                         "description": "Received by the ledger, the planner, `mesh watch` and anyone else."},
        "sendCommand": {"action": "send", "channel": {"$ref": "#/channels/control"},
                        "description": "Sent by `mesh cancel` and any client (MeshClient.cancel)."},
        "receiveCommand": {"action": "receive", "channel": {"$ref": "#/channels/control"},
                           "description": "Received by the planner (orchestrator)."},
        "deadLetter": {"action": "send", "channel": {"$ref": "#/channels/dlq"},
                       "description": "Sent by any consumer that gives up on a message."},
    }
    messages = {
        kind: {
            "name": kind,
            "contentType": "application/msgpack",
            "payload": {"$ref": f"{kind}.schema.json"},
            "headers": {"type": "object", "properties": {
                "Nats-Msg-Id": {"type": "string"}, "traceparent": {"type": "string"},
                "tracestate": {"type": "string"}}},
        }
        for kind in ("goal", "goal_command", "task", "event")
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Mesh",
            "version": SCHEMA_VERSION,
            "description": "Edge message-bus agent mesh. Payloads are msgpack envelopes "
            "(envelope.schema.json) whose body is the named message.",
        },
        "defaultContentType": "application/msgpack",
        "servers": {"local": {"host": "127.0.0.1:4222", "protocol": "nats"}},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def render(topo: Topology | None = None) -> dict[str, str]:
    topo = topo or Topology()
    files = {f"{kind}.schema.json": _json(schema) for kind, schema in message_schemas().items()}
    files["envelope.schema.json"] = _json(ENVELOPE_SCHEMA)
    files["asyncapi.json"] = _json(asyncapi(topo))
    files["gateway.openapi.json"] = _json(openapi_document())
    return files


def export(directory: Path) -> list[Path]:
    """Write every file of ``render()`` into ``directory``; remove stale ``*.json`` files."""
    directory.mkdir(parents=True, exist_ok=True)
    files = render()
    for stale in directory.glob("*.json"):
        if stale.name not in files:
            stale.unlink()
    written = []
    for name, text in files.items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
