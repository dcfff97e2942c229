"""Dead letters: what ``MESH_DLQ`` holds, and how to read it back.

A pull consumer that gives up on a message (poison, a permanent error, or its last delivery
failed) publishes a dead letter on ``<prefix>.dlq.<role>`` and then terminates the original.
The payload is one msgpack map::

    {"reason": "SchemaViolation: invalid task message ...",   human-readable why
     "error": "SchemaViolation",                                exception class name
     "stream": "MESH_TASKS", "subject": "mesh.task.coder",      where the original lived
     "stream_seq": 42, "consumer": "role-coder", "num_delivered": 1,
     "headers": {...},                                          the original NATS headers
     "data": b"...",                                            the original bytes, untouched
     "at": "2026-...Z"}

with headers ``Mesh-Dlq-Reason`` (the reason, one line, truncated) and
``Nats-Msg-Id = dlq.<stream>.<stream_seq>`` so a retried dead-lettering is stored once.

The DLQ stream also captures JetStream's own ``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>``
advisories (JSON, on those subjects) for messages whose consumer died on every delivery.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import msgpack
from nats.aio.msg import Msg

from mesh.errors import CodecError

DLQ_REASON_HEADER = "Mesh-Dlq-Reason"
_MAX_HEADER_REASON = 200


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    error: str
    stream: str
    subject: str
    stream_seq: int
    consumer: str
    num_delivered: int
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @classmethod
    def from_msg(cls, msg: Msg, *, reason: str, error: str) -> DeadLetter:
        meta = msg.metadata
        return cls(
            reason=reason, error=error, stream=meta.stream, subject=msg.subject,
            stream_seq=meta.sequence.stream, consumer=meta.consumer, num_delivered=meta.num_delivered,
            data=bytes(msg.data), headers=dict(msg.headers or {}),
        )

    @property
    def msg_id(self) -> str:
        return f"dlq.{self.stream}.{self.stream_seq}"

    def nats_headers(self) -> dict[str, str]:
        one_line = " ".join(self.reason.split())[:_MAX_HEADER_REASON]
        return {DLQ_REASON_HEADER: one_line, "Nats-Msg-Id": self.msg_id}

    def encode(self) -> bytes:
        return cast(bytes, msgpack.packb(asdict(self), use_bin_type=True))

    @classmethod
    def decode(cls, data: bytes) -> DeadLetter:
        try:
            doc: Any = msgpack.unpackb(data, raw=False)
            return cls(**doc)
        except Exception as exc:  # garbage, wrong shape, missing or unknown keys
            raise CodecError(f"not a Mesh dead letter: {exc!r}"[:300]) from exc
