"""The msgpack codec and its envelope.

On the wire every message is one msgpack map::

    {"v": "2.0",            schema version, major.minor
     "id": "<hex>",         message id (also the Nats-Msg-Id unless the caller picks a dedupe id)
     "kind": "event",       which contract the body is (see MESSAGE_KINDS)
     "goal": "<goal id>",   or nil
     "ts": "2026-...Z",     created_at, RFC 3339
     "trace": {"traceparent": "00-...", "tracestate": "..."},   W3C trace context (also in NATS headers)
     "body": {...},         the model, as JSON-compatible data
     "claim": {...}}        instead of body: an ArtifactRef to the body in the object store (claim-check)

Decoding is two steps so the bus can resolve a claim-check in between: ``open_envelope`` checks the
bytes and the version, ``Envelope.message`` validates the body against its contract.

Decoding is bounded (docs/RELIABILITY.md, "Bounded decoding"). A map or array costs one byte on the wire
and 56-200 bytes of heap, so a message may hold at most one map or array per ``BYTES_PER_CONTAINER``
bytes (plus ``CONTAINER_ALLOWANCE``); the count is kept by msgpack's hooks, which see every container as
it is built, and decoding stops at the first one over the budget (``DecodeLimitExceeded``). With
strings and scalars (≤ 20× their wire size) that bounds the heap at ~32× the wire size. Nesting
depth is bounded by msgpack (1,024) and the budget; the free-form fields, the only ones that may nest
at will, by ``models.FREEFORM_MAX_DEPTH`` / ``FREEFORM_MAX_BYTES``.

Schema 2 changed no body, only the event subjects (they name the emitting role). Readers of the
event history — the ledger and its rebuild, ``mesh watch``/``MeshClient.watch`` — also read schema-1
envelopes (``EVENT_HISTORY_MAJORS``); every other consumer speaks only the current major.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import msgpack
from pydantic import BaseModel, TypeAdapter, ValidationError

from mesh.contracts.events import EVENT_ADAPTER, EventBase
from mesh.contracts.models import (
    Artifact,
    ArtifactRef,
    Goal,
    GoalCommand,
    Plan,
    RouteDecision,
    Step,
    Task,
    Usage,
    new_id,
)
from mesh.errors import CodecError, DecodeLimitExceeded, MessageTooLarge, SchemaViolation, UnsupportedVersion
from mesh.tracing import trace_context

SCHEMA_VERSION = "2.0"
SCHEMA_MAJOR = 2
# Majors an event-history reader decodes: schema 1 events (no role in the subject) stay readable.
EVENT_HISTORY_MAJORS: tuple[int, ...] = (1, SCHEMA_MAJOR)

BYTES_PER_CONTAINER = 16  # wire bytes per map or array a message may hold
CONTAINER_ALLOWANCE = 32  # maps and arrays any message may hold, however small

# kind -> how to validate its body. Events validate through the discriminated union.
MESSAGE_KINDS: dict[str, TypeAdapter[Any]] = {
    "goal": TypeAdapter(Goal),
    "goal_command": TypeAdapter(GoalCommand),
    "plan": TypeAdapter(Plan),
    "step": TypeAdapter(Step),
    "task": TypeAdapter(Task),
    "artifact": TypeAdapter(Artifact),
    "artifact_ref": TypeAdapter(ArtifactRef),
    "route_decision": TypeAdapter(RouteDecision),
    "usage": TypeAdapter(Usage),
    "event": EVENT_ADAPTER,
}
_KIND_OF: dict[type, str] = {
    Goal: "goal", GoalCommand: "goal_command", Plan: "plan", Step: "step", Task: "task", Artifact: "artifact", ArtifactRef: "artifact_ref",
    RouteDecision: "route_decision", Usage: "usage",
}

M = TypeVar("M")


def kind_of(message: BaseModel) -> str:
    """The envelope kind of a contract instance."""
    if isinstance(message, EventBase):
        return "event"
    try:
        return _KIND_OF[type(message)]
    except KeyError:
        raise CodecError(f"{type(message).__name__} is not a Mesh wire contract") from None


# --- envelope ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Envelope:
    """A decoded envelope whose body has not been validated yet."""

    kind: str
    msg_id: str
    goal_id: str | None
    created_at: datetime
    version: str = SCHEMA_VERSION
    trace: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    claim: ArtifactRef | None = None
    size: int = 0  # bytes decoded: the message's, plus its claim-checked body's once resolved

    def message(self, expect: type[M] | None = None) -> M:
        """Validate the body against its contract; ``expect`` additionally checks the type."""
        if self.body is None:
            raise CodecError("envelope body is a claim-check reference that was not resolved")
        adapter = MESSAGE_KINDS.get(self.kind)
        if adapter is None:
            raise SchemaViolation(f"unknown message kind {self.kind!r}; known: {', '.join(MESSAGE_KINDS)}")
        try:
            value = adapter.validate_python(self.body)
        except ValidationError as exc:
            raise SchemaViolation(f"invalid {self.kind} message {self.msg_id}: {_summarise(exc)}") from exc
        if expect is not None and not isinstance(value, expect):
            raise SchemaViolation(f"expected {expect.__name__}, got {type(value).__name__} ({self.kind})")
        return cast(M, value)


def _summarise(exc: ValidationError, limit: int = 3) -> str:
    errs = exc.errors(include_url=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errs[:limit]]
    more = f" (+{len(errs) - limit} more)" if len(errs) > limit else ""
    return "; ".join(parts) + more


def encode(
    message: BaseModel,
    *,
    goal_id: str | None = None,
    msg_id: str | None = None,
    trace: dict[str, str] | None = None,
    max_bytes: int | None = None,
) -> bytes:
    """Serialise a contract into an envelope. ``goal_id`` defaults to the message's own goal id."""
    if goal_id is None:
        goal_id = getattr(message, "goal_id", None)
    doc = {
        "v": SCHEMA_VERSION,
        "id": msg_id or new_id(),
        "kind": kind_of(message),
        "goal": goal_id,
        "ts": datetime.now(UTC).isoformat(),
        "trace": trace or trace_context(),
        "body": message.model_dump(mode="json"),
    }
    data: bytes = msgpack.packb(doc, use_bin_type=True)
    if max_bytes is not None and len(data) > max_bytes:
        raise MessageTooLarge(len(data), max_bytes)
    return data


def encode_claim(envelope: Envelope, ref: ArtifactRef) -> bytes:
    """Re-encode an envelope with its body replaced by a claim-check reference."""
    doc = {
        "v": envelope.version, "id": envelope.msg_id, "kind": envelope.kind, "goal": envelope.goal_id,
        "ts": envelope.created_at.isoformat(), "trace": envelope.trace, "claim": ref.model_dump(mode="json"),
    }
    return cast(bytes, msgpack.packb(doc, use_bin_type=True))


def encode_body(envelope: Envelope) -> bytes:
    """The bytes stored in the object store for a claim-checked body."""
    return cast(bytes, msgpack.packb(envelope.body, use_bin_type=True))


def unpack(data: bytes) -> Any:
    """msgpack → Python, refused part-way (``DecodeLimitExceeded``) once the data holds more maps and arrays
    than its size allows; other failures are msgpack's own exceptions."""
    budget = CONTAINER_ALLOWANCE + len(data) // BYTES_PER_CONTAINER
    built = 0

    def count(container: Any) -> Any:
        nonlocal built
        built += 1
        if built > budget:
            raise DecodeLimitExceeded(len(data), budget)
        return container

    return msgpack.unpackb(data, raw=False, strict_map_key=True, object_hook=count, list_hook=count)


def decode_body(data: bytes) -> dict[str, Any]:
    try:
        body = unpack(data)
    except DecodeLimitExceeded:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise CodecError(f"claim-checked body is not valid msgpack: {exc}") from exc
    if not isinstance(body, dict):
        raise CodecError("claim-checked body is not a map")
    return body


def open_envelope(data: bytes, *, max_bytes: int | None = None,
                  majors: tuple[int, ...] = (SCHEMA_MAJOR,)) -> Envelope:
    """Check bytes are a Mesh envelope of a schema major in ``majors``. Never raises anything but ``CodecError``."""
    if max_bytes is not None and len(data) > max_bytes:
        raise MessageTooLarge(len(data), max_bytes)
    try:
        doc = unpack(data)
    except DecodeLimitExceeded:
        raise
    except Exception as exc:  # ExtraData, FormatError, StackError, ValueError, UnicodeDecodeError …
        raise CodecError(f"not a msgpack message ({type(exc).__name__}: {exc})"[:300]) from exc
    if not isinstance(doc, dict):
        raise CodecError(f"envelope must be a msgpack map, got {type(doc).__name__}")
    version = doc.get("v")
    if not isinstance(version, str):
        raise CodecError("envelope has no schema version 'v'")
    major, _, _minor = version.partition(".")
    if not major.isdigit():
        raise CodecError(f"malformed schema version {version!r}")
    if int(major) not in majors:
        raise UnsupportedVersion(version, SCHEMA_VERSION)
    kind, msg_id, goal_id, ts = doc.get("kind"), doc.get("id"), doc.get("goal"), doc.get("ts")
    if not isinstance(kind, str) or not isinstance(msg_id, str):
        raise CodecError("envelope lacks 'kind' or 'id'")
    if goal_id is not None and not isinstance(goal_id, str):
        raise CodecError("envelope 'goal' must be a string or nil")
    try:
        created_at = datetime.fromisoformat(ts) if isinstance(ts, str) else datetime.now(UTC)
    except ValueError as exc:
        raise CodecError(f"envelope 'ts' is not RFC 3339: {ts!r}") from exc
    trace = doc.get("trace") or {}
    if not isinstance(trace, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in trace.items()):
        raise CodecError("envelope 'trace' must map strings to strings")
    body, claim = doc.get("body"), doc.get("claim")
    if body is not None and not isinstance(body, dict):
        raise CodecError("envelope 'body' must be a map")
    ref: ArtifactRef | None = None
    if body is None:
        if claim is None:
            raise CodecError("envelope has neither 'body' nor 'claim'")
        try:
            ref = ArtifactRef.model_validate(claim)
        except ValidationError as exc:
            raise CodecError(f"envelope 'claim' is not an artifact reference: {_summarise(exc)}") from exc
    return Envelope(kind=kind, msg_id=msg_id, goal_id=goal_id, created_at=created_at, version=version,
                    trace=trace, body=body, claim=ref, size=len(data))


def decode(data: bytes, expect: type[M] | None = None, *, max_bytes: int | None = None) -> M:
    """Bytes → validated contract, for envelopes that carry their body inline."""
    return open_envelope(data, max_bytes=max_bytes).message(expect)
