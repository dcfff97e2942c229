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
     "at": "2026-...Z",
     "size": 1048000, "sha256": "", "claim": False}             the original's size; see below

with headers ``Mesh-Dlq-Reason`` (the reason, one line, truncated) and
``Nats-Msg-Id = dlq.<stream>.<consumer>.<stream_seq>`` so a retried dead-lettering is stored once (and each
consumer's letter for one message is kept).

A letter must fit the server's max_payload, and the original alone may nearly fill it. So an original
above the claim-check threshold travels by claim-check (``claim_checked``): ``data`` keeps its first
``PREVIEW_BYTES``, ``sha256`` names the whole of it in the artifacts object store (``original()`` reads
it back). When even storing it fails, the letter goes out ``truncated``: the preview and the digest,
``claim`` false — the reason and the evidence of what arrived, rather than no letter at all.

The DLQ stream also captures JetStream's own ``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>``
advisories (JSON, on those subjects) for messages whose consumer died on every delivery.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, cast

import msgpack
from nats.aio.msg import Msg

from mesh.contracts.codec import unpack
from mesh.errors import BlobNotFound, CodecError

DLQ_REASON_HEADER = "Mesh-Dlq-Reason"
PREVIEW_BYTES = 1024  # of an original that travels by claim-check or is cut
_MAX_HEADER_REASON = 200
_MAX_HEADER_VALUE = 256  # of an original header, in a letter that had to shrink


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
    size: int = 0  # of the original
    sha256: str = ""  # of the original, when ``data`` holds only its first PREVIEW_BYTES
    claim: bool = False  # the original is in the artifacts object store under ``sha256``

    @classmethod
    def from_msg(cls, msg: Msg, *, reason: str, error: str) -> DeadLetter:
        meta = msg.metadata
        return cls(
            reason=reason, error=error, stream=meta.stream, subject=msg.subject,
            stream_seq=meta.sequence.stream, consumer=meta.consumer, num_delivered=meta.num_delivered,
            data=bytes(msg.data), headers=dict(msg.headers or {}), size=len(msg.data),
        )

    def claim_checked(self, sha256: str) -> DeadLetter:
        """This letter with the original stored under ``sha256``: only a preview travels."""
        return replace(self, data=self.data[:PREVIEW_BYTES], sha256=sha256, claim=True)

    def truncated(self) -> DeadLetter:
        """This letter cut to fit any payload limit: the original's preview and digest, short headers."""
        return replace(self, data=self.data[:PREVIEW_BYTES], claim=False,
                       sha256=self.sha256 or hashlib.sha256(self.data).hexdigest(),
                       headers={k[:_MAX_HEADER_VALUE]: v[:_MAX_HEADER_VALUE]
                                for k, v in list(self.headers.items())[:32]})

    @property
    def whole(self) -> bool:
        """``data`` is the whole original."""
        return not self.sha256

    async def original(self, get_blob: Callable[[str], Awaitable[bytes]]) -> bytes:
        """The original bytes, read from the object store when they travelled by claim-check
        (``get_blob`` = ``Bus.get_blob``). ``BlobNotFound`` for a truncated letter's lost original."""
        if self.whole:
            return self.data
        if not self.claim:
            raise BlobNotFound(f"the original of {self.msg_id} ({self.size} bytes, sha256 {self.sha256}) was not "
                               f"stored; the letter holds its first {len(self.data)} bytes")
        return await get_blob(self.sha256)

    @property
    def msg_id(self) -> str:
        """Dedupes a consumer's second letter for one message (a redelivery), never another consumer's:
        the ledger and the planner both read step outcomes, and each dead-letters what it cannot use."""
        return f"dlq.{self.stream}.{self.consumer}.{self.stream_seq}"

    def nats_headers(self) -> dict[str, str]:
        one_line = " ".join(self.reason.split())[:_MAX_HEADER_REASON]
        return {DLQ_REASON_HEADER: one_line, "Nats-Msg-Id": self.msg_id}

    def encode(self) -> bytes:
        return cast(bytes, msgpack.packb(asdict(self), use_bin_type=True))

    @classmethod
    def decode(cls, data: bytes) -> DeadLetter:
        try:
            doc: Any = unpack(data)  # bounded like any message: letters are read by the dashboard and the CLI
            return cls(**doc)
        except Exception as exc:  # garbage, wrong shape, missing or unknown keys
            raise CodecError(f"not a Mesh dead letter: {exc!r}"[:300]) from exc
