"""The ledger query service's bounds, on a real nats-server with the real recorder and DuckDB file: a query
returning 1 GB is refused with a clear error (and never materialises) while a concurrent small query
answers; queries run side by side; past ``MESH_LEDGER_MAX_QUERIES`` a request is refused as busy. And the
recorder's side: hostile events are dead-lettered with the reason while the rest is recorded."""

from __future__ import annotations

import json
import resource
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bench.codec import hostile_corpus
from mesh.bus import Bus, DeadLetter
from mesh.config import MeshSettings
from mesh.errors import LedgerBusy, QueryRefused
from mesh.roles.ledger_service import LedgerClient, subject
from tests.ledgerkit import Eventually, burst, caught_up, publish_burst, recording

pytestmark = pytest.mark.timeout(120)

HUGE = "SELECT repeat('x', 1000) AS s FROM range(1000000)"  # 1,000,000 rows of 1 KB: 1 GB
SLOW = "SELECT sum(a.range * b.range) FROM range(100000000) a, range(1000) b"  # runs until its time limit


async def ask(bus: Bus, body: dict[str, Any]) -> Subscription:
    """Send one sql request in connection order; its reply arrives on the returned subscription."""
    inbox = bus._nc.new_inbox()
    sub = await bus._nc.subscribe(inbox, max_msgs=1)
    await bus._nc.publish(subject(bus.topology.prefix, "sql"), json.dumps(body).encode(), reply=inbox)
    return sub


def error(reply: Msg) -> tuple[str, str]:
    headers = reply.headers or {}
    return headers.get("Nats-Service-Error-Code", ""), headers.get("Nats-Service-Error", "")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def test_a_1gb_query_is_refused_while_a_small_one_answers(bus: Bus, settings: MeshSettings,
                                                                eventually: Eventually) -> None:
    settings = settings.model_copy(update={"ledger_max_rows": 2_000_000})  # only the byte cap stops HUGE
    client = LedgerClient(bus, timeout=30)
    async with recording(bus, settings):
        await publish_burst(bus, burst(200))
        await caught_up(eventually, client, bus)
        before = peak_rss_mb()
        # one connection: the service receives these in this order
        slow = await ask(bus, {"sql": SLOW, "timeout": 8})
        huge = await ask(bus, {"sql": HUGE})
        small = await ask(bus, {"sql": "SELECT count(*) FROM events"})

        answer = await small.next_msg(timeout=30)
        assert error(answer) == ("", "") and json.loads(answer.data)["rows"] == [[200]]
        assert slow.pending_msgs == 0  # the small query was answered while the slow one still ran
        code, why = error(await huge.next_msg(timeout=30))
        assert code == "400" and "exceeds the limit of" in why and "refused" in why
        code, why = error(await slow.next_msg(timeout=30))
        assert code == "400" and "time limit of 8 s" in why
        assert peak_rss_mb() - before < 256, "the 1 GB result was materialised"

        with pytest.raises(QueryRefused, match="exceeds the limit of"):
            await client.sql(HUGE)
        assert (await client.sql("SELECT count(*) FROM events")).rows == [(200,)]  # and it still serves


async def test_past_the_query_limit_a_request_is_refused_as_busy(bus: Bus, settings: MeshSettings,
                                                                 eventually: Eventually) -> None:
    settings = settings.model_copy(update={"ledger_max_queries": 1})
    client = LedgerClient(bus, timeout=30)
    async with recording(bus, settings):
        await publish_burst(bus, burst(50))
        await caught_up(eventually, client, bus)
        slow = await ask(bus, {"sql": SLOW, "timeout": 5})
        with pytest.raises(LedgerBusy, match="busy: 1 requests in progress") as caught:
            await client.sql("SELECT 1")
        assert caught.value.retryable
        code, _ = error(await slow.next_msg(timeout=30))
        assert code == "400"
        assert (await client.sql("SELECT count(*) FROM events")).rows == [(50,)]  # a free slot serves again


async def test_hostile_events_are_dead_lettered_with_the_reason(bus: Bus, settings: MeshSettings,
                                                                eventually: Eventually) -> None:
    """Messages of the pinned hostile corpus on the event stream: each is refused part-way, dead-lettered
    with its reason, and nothing else is lost."""
    corpus = hostile_corpus()
    hostile = {name: corpus[name] for name in ("empty maps in detail", "short strings in detail",
                                               "deep nesting, 1,000 levels", "invalid items in a typed list")}
    client = LedgerClient(bus, timeout=30)
    events = burst(60)
    async with recording(bus, settings):
        await publish_burst(bus, events[:30])
        for data in hostile.values():
            await bus._nc.publish(bus.topology.event_subject("g", "coder", "step.progress"), data)
        await publish_burst(bus, events[30:])
        await caught_up(eventually, client, bus)
        assert (await client.sql("SELECT count(*), max(seq) FROM events")).rows == [(60, 64)]

    sub = await bus._js.pull_subscribe(bus.topology.dlq_subject("ledger"), stream=bus.topology.dlq_stream)
    letters = [DeadLetter.decode(m.data) for m in await sub.fetch(len(hostile), timeout=5)]
    assert [(letter.stream_seq, letter.data) for letter in letters] == [(31 + i, d) for i, d in
                                                                         enumerate(hostile.values())]
    assert [letter.error for letter in letters] == ["DecodeLimitExceeded", "SchemaViolation",
                                                    "DecodeLimitExceeded", "DecodeLimitExceeded"]
    assert "maps and arrays, the most a message of its size may hold" in letters[0].reason
    assert "free-form data larger than" in letters[1].reason
