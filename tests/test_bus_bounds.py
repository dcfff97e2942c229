"""Bounded inputs on a real nats-server: a claim-checked body is size-checked from the object's info
before it is fetched, and the ledger's feed bounds a batch by decoded bytes as well as by count."""

from __future__ import annotations

import msgpack
import pytest
from nats.aio.msg import Msg

from mesh.bus import Bus, DeadLetter
from mesh.bus.client import CLAIM_MEDIA_TYPE
from mesh.bus.feed import EventFeed
from mesh.config import MeshSettings
from mesh.contracts import ArtifactRef, StepProgress, encode
from mesh.contracts.codec import encode_claim, open_envelope
from mesh.errors import CodecError, MessageTooLarge

pytestmark = pytest.mark.timeout(60)


def progress(i: int, size: int) -> StepProgress:
    return StepProgress(goal_id="g1", step_id="s1", role="test", attempt=1,
                        message=f"{i}:" + "x" * size)


async def _received(bus: Bus, subject: str, data: bytes) -> Msg:
    sub = await bus._nc.subscribe(subject, max_msgs=1)
    await bus._nc.publish(subject, data)
    return await sub.next_msg(timeout=5)


async def test_a_claim_check_body_is_refused_from_its_info_before_fetching(bus: Bus, settings: MeshSettings) -> None:
    body = msgpack.packb(progress(0, 300_000).model_dump(mode="json"))
    stored = await bus.put_blob(body, media_type=CLAIM_MEDIA_TYPE)
    small = settings.model_copy(update={"max_message_bytes": 100_000})
    async with await Bus.connect(small, name="reader") as reader:
        # a reference that tells the truth is refused on its own word
        honest = encode_claim(open_envelope(encode(progress(0, 10))), stored)
        with pytest.raises(MessageTooLarge, match="300.* bytes exceeds the limit of 100000"):
            await reader.open(await _received(reader, "t.honest", honest))
        # a reference that lies about the size is refused from the object store's info
        liar = ArtifactRef(digest=stored.digest, media_type=CLAIM_MEDIA_TYPE, size=10)
        forged = encode_claim(open_envelope(encode(progress(0, 10))), liar)
        with pytest.raises(MessageTooLarge, match=f"{len(body)} bytes exceeds"):
            await reader.open(await _received(reader, "t.liar", forged))
        # within the limit it decodes, and the envelope counts the body's bytes
        envelope = await bus.open(await _received(bus, "t.ok", honest))
        assert envelope.size > len(body) and envelope.message().message.startswith("0:xxx")


async def test_the_feed_bounds_a_batch_by_decoded_bytes(bus: Bus) -> None:
    events = [progress(i, 300_000) for i in range(12)]  # claim-checked: ~300 KB bodies behind tiny messages
    for event in events:
        await bus.emit(event)
    feed = EventFeed(bus, consumer="bounds-test", durable=False, batch_size=1_000, batch_bytes=1_000_000)
    await feed.open(1)
    try:
        sizes, mark = [], 0
        while mark < len(events):
            batch = await feed.decode(await feed.fetch(), mark)
            assert not batch.dead and not batch.resync
            sizes.append(len(batch.events))
            assert [seq for seq, _, _ in batch.events] == list(range(mark + 1, batch.upto + 1))
            mark = batch.upto
    finally:
        await feed.close(delete=True)
    assert sum(sizes) == 12 and max(sizes) == 4, sizes  # 4 × 300 KB passes 1 MB: the batch ends there


def test_a_forged_dead_letter_is_decoded_within_the_same_bounds() -> None:
    """Dead letters are read back by the dashboard and `mesh dlq`: forged ones amplify no more than messages."""
    with pytest.raises(CodecError, match="not a Mesh dead letter: DecodeLimitExceeded"):
        DeadLetter.decode(msgpack.packb({"reason": [{}] * 200_000}))
    letter = DeadLetter(reason="r", error="E", stream="S", subject="s", stream_seq=1, consumer="c", num_delivered=1,
                        data=b"x")
    assert DeadLetter.decode(letter.encode()) == letter
