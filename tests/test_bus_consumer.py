"""The pull-consumer loop against a real nats-server: acks, in-progress, redelivery, DLQ, bounds, restarts."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest

from mesh.bus import Bus, DeadLetter, Delivery, PullConsumer
from mesh.bus.consumer import gives_up
from mesh.bus.dlq import DLQ_REASON_HEADER
from mesh.config import MeshSettings
from mesh.contracts import Goal, Step, Task, encode
from mesh.embedded import EmbeddedNats
from mesh.errors import (
    AllTiersFailed,
    AllTiersUnavailable,
    BadRequest,
    BlobNotFound,
    OptionInvalid,
    PayloadRefused,
    PublishError,
    RateLimited,
    retryable,
)
from tests.reliability.kit import padded_to

ROLE = "coder"
Eventually = Callable[..., Awaitable[None]]
Retry = Callable[..., Awaitable[object]]


def task(n: int = 1, attempt: int = 1) -> Task:
    step = Step(step_id=f"s{n}", role=ROLE, instruction="do it")
    return Task(task_id=Task.make_id("g1", f"s{n}", attempt), goal_id="g1", step=step, attempt=attempt)


@pytest.fixture
async def fast_bus(settings: MeshSettings) -> AsyncIterator[Bus]:
    """A bus whose consumers have a 1 s ack_wait, so redelivery tests are quick."""
    async with await Bus.connect(settings.model_copy(update={"ack_wait": 1.0}), roles=[ROLE]) as bus:
        yield bus


@asynccontextmanager
async def consuming(consumer: PullConsumer) -> AsyncIterator[asyncio.Task[None]]:
    """Run a consumer for the block, then stop it and wait for its drain."""
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(consumer.run())
        try:
            yield runner
        finally:
            consumer.stop()


class Recorder:
    """A handler that records what it saw; ``fail`` decides per delivery whether to raise."""

    def __init__(self, fail: Callable[[Delivery], BaseException | None] = lambda d: None,
                 hold: float = 0.0) -> None:
        self.seen: list[tuple[str, int]] = []
        self.fail = fail
        self.hold = hold
        self.running = 0
        self.max_running = 0

    async def __call__(self, delivery: Delivery) -> None:
        t = delivery.message(Task)
        self.seen.append((t.task_id, delivery.attempt))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.hold:
                await asyncio.sleep(self.hold)  # the handler's own work, not synchronisation
            error = self.fail(delivery)
            if error is not None:
                raise error
        finally:
            self.running -= 1


async def dlq_letters(bus: Bus, count: int) -> list[tuple[DeadLetter, dict[str, str]]]:
    sub = await bus._js.pull_subscribe(bus.topology.dlq_subject(ROLE), stream=bus.topology.dlq_stream)
    msgs = await sub.fetch(count, timeout=5)
    await sub.unsubscribe()
    return [(DeadLetter.decode(m.data), dict(m.headers or {})) for m in msgs]


async def test_handled_message_is_acked(fast_bus: Bus, eventually: Eventually) -> None:
    rec = Recorder()
    await fast_bus.dispatch(task(1))
    async with consuming(PullConsumer.for_role(fast_bus, ROLE, rec)):
        await eventually(lambda: rec.seen == [("g1.s1.1", 1)])
    info = await fast_bus._js.stream_info(fast_bus.topology.tasks_stream)
    assert info.state.messages == 0  # work-queue: the confirmed ack removed it


async def test_long_handler_is_not_redelivered(fast_bus: Bus, eventually: Eventually) -> None:
    rec = Recorder(hold=3.0)  # 3 × ack_wait
    await fast_bus.dispatch(task(1))
    async with consuming(PullConsumer.for_role(fast_bus, ROLE, rec, concurrency=2)) as runner:
        await eventually(lambda: len(rec.seen) == 1)
        await eventually(lambda: rec.running == 0, timeout=10)
    assert runner.done()
    assert rec.seen == [("g1.s1.1", 1)]
    info = await fast_bus._js.consumer_info(fast_bus.topology.tasks_stream, "role-coder")
    assert (info.num_redelivered, info.num_ack_pending, info.num_pending) == (0, 0, 0)


async def test_cancelled_handler_is_redelivered_to_another_consumer(fast_bus: Bus, eventually: Eventually) -> None:
    started = asyncio.Event()

    async def stuck(delivery: Delivery) -> None:
        started.set()
        await asyncio.Event().wait()

    await fast_bus.dispatch(task(1))
    runner = asyncio.create_task(PullConsumer.for_role(fast_bus, ROLE, stuck).run())
    await asyncio.wait_for(started.wait(), 5)
    runner.cancel()  # the node dies mid-handler: no ack, no nak
    with pytest.raises(asyncio.CancelledError):
        await runner

    rec = Recorder()
    async with consuming(PullConsumer.for_role(fast_bus, ROLE, rec)):
        await eventually(lambda: rec.seen == [("g1.s1.1", 2)])


_KILLED_WORKER = """
import asyncio, sys
from mesh.bus import Bus, PullConsumer
from mesh.config import MeshSettings

async def main():
    bus = await Bus.connect(MeshSettings(), roles=["coder"])
    async def handler(delivery):
        print("started", delivery.message(__import__("mesh.contracts").contracts.Task).task_id, flush=True)
        await asyncio.Event().wait()
    await PullConsumer.for_role(bus, "coder", handler).run()

asyncio.run(main())
"""


async def test_killed_process_mid_handler_is_redelivered(fast_bus: Bus, settings: MeshSettings,
                                                         eventually: Eventually) -> None:
    await fast_bus.dispatch(task(1))
    env = {**os.environ, "MESH_NATS_URL": settings.nats_url or "", "MESH_ACK_WAIT": "1"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _KILLED_WORKER, env=env,
                                                stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.decode().split() == ["started", "g1.s1.1"]
    finally:
        proc.kill()  # SIGKILL mid-handler
        await proc.wait()

    rec = Recorder()
    async with consuming(PullConsumer.for_role(fast_bus, ROLE, rec)):
        await eventually(lambda: rec.seen == [("g1.s1.1", 2)])


async def test_poison_goes_to_dlq_and_the_loop_keeps_consuming(fast_bus: Bus, eventually: Eventually) -> None:
    subject = fast_bus.topology.task_subject(ROLE)
    await fast_bus.publish_raw(subject, b"\xc1 definitely not msgpack")
    await fast_bus.publish(subject, Goal(brief="a goal on a task subject"))  # valid envelope, wrong contract
    await fast_bus.dispatch(task(3))
    rec = Recorder()
    async with consuming(PullConsumer.for_role(fast_bus, ROLE, rec)):
        await eventually(lambda: rec.seen == [("g1.s3.1", 1)])

    letters = await dlq_letters(fast_bus, 2)
    assert [(d.error, d.subject, d.stream, d.stream_seq, d.num_delivered) for d, _ in letters] == [
        ("CodecError", subject, "MESH_TASKS", 1, 1), ("SchemaViolation", subject, "MESH_TASKS", 2, 1)]
    assert letters[0][0].data == b"\xc1 definitely not msgpack"
    assert "not a msgpack message" in letters[0][0].reason
    assert "expected Task, got Goal" in letters[1][0].reason
    assert letters[1][1][DLQ_REASON_HEADER].startswith("SchemaViolation: ")
    info = await fast_bus._js.stream_info(fast_bus.topology.tasks_stream)
    assert info.state.messages == 0  # poison was terminated, not left to redeliver


async def test_poison_near_the_servers_max_payload_reaches_the_dlq_at_once_by_claim_check(
        settings: MeshSettings, eventually: Eventually) -> None:
    """20 hostile task messages 300-2,000 bytes under the server's real 1 MiB limit, half on the goal
    subject: a letter wrapping one whole would exceed the limit. Each is dead-lettered on its first
    delivery with its reason, its original retrievable by claim-check, and a goal queued behind them
    is taken at once (the planner's 4 slots are not held by messages that can never be lettered)."""
    async with await Bus.connect(settings, roles=["planner", ROLE]) as bus:
        topo, limit = bus.topology, bus.max_payload
        assert limit == 1024 * 1024  # the server's own default, not lowered for the test
        rng = random.Random(14)
        sent: dict[str, bytes] = {}
        for i in range(20):
            subject = topo.goal_subject() if i % 2 else topo.task_subject(ROLE)
            doc: dict[str, Any] = msgpack.unpackb(encode(task(i)), raw=False)
            sent[f"hostile-{i}"] = data = padded_to(doc, limit - rng.randrange(300, 2001))
            await bus.publish_raw(subject, data, headers={"Nats-Msg-Id": f"hostile-{i}"})
        goal = Goal(brief="a real goal behind the hostile ones")
        await bus.submit_goal(goal)
        goals: list[tuple[str, int]] = []

        async def on_goal(d: Delivery) -> None:
            goals.append((d.message(Goal).goal_id, d.attempt))

        async def on_task(d: Delivery) -> None:
            d.message(Task)

        started = time.monotonic()
        async with consuming(PullConsumer.for_role(bus, "planner", on_goal, concurrency=4)), \
                consuming(PullConsumer.for_role(bus, ROLE, on_task, concurrency=2)):
            await eventually(lambda: goals == [(goal.goal_id, 1)], timeout=30, message="the real goal taken")
            await eventually(lambda: _stored(bus, topo.dlq_stream, 20), timeout=30, message="20 letters")
        seconds = time.monotonic() - started
        sub = await bus._js.pull_subscribe(f"{topo.prefix}.dlq.>", stream=topo.dlq_stream)
        msgs = await sub.fetch(20, timeout=5)
        for m in msgs:
            letter = DeadLetter.decode(m.data)
            original = sent[letter.headers["Nats-Msg-Id"]]
            assert (letter.error, letter.num_delivered, letter.claim, letter.size) == \
                ("SchemaViolation", 1, True, len(original)), letter.reason
            assert letter.reason and m.headers and m.headers[DLQ_REASON_HEADER].startswith("SchemaViolation: ")
            assert len(m.data) < bus.settings.claim_check_bytes and letter.data == original[:len(letter.data)]
            assert await letter.original(bus.get_blob) == original
        for stream in (topo.goals_stream, topo.tasks_stream):
            assert (await bus._js.stream_info(stream)).state.messages == 0  # each one terminated, none left
    print(f"figure: 20 poison messages 300-2,000 bytes under 1 MiB: all dead-lettered by claim-check in {seconds:.1f} s")


async def _stored(bus: Bus, stream: str, count: int) -> bool:
    return (await bus._js.stream_info(stream)).state.messages >= count


async def test_a_letter_refused_for_size_goes_out_truncated_with_its_digest(
        settings: MeshSettings, eventually: Eventually) -> None:
    """With a claim-check threshold above the server's limit (misconfigured), the whole letter of a
    near-limit original is refused for size, which no retry can change: it goes out at once, cut to
    the original's preview and digest."""
    big_claims = settings.model_copy(update={"claim_check_bytes": 4 * 1024 * 1024})
    async with await Bus.connect(big_claims, roles=[ROLE]) as bus:
        doc: dict[str, Any] = msgpack.unpackb(encode(task()), raw=False)
        original = padded_to(doc, bus.max_payload - 500)
        await bus.publish_raw(bus.topology.task_subject(ROLE), original)
        async with consuming(PullConsumer.for_role(bus, ROLE, Recorder())):
            await eventually(lambda: _stored(bus, bus.topology.dlq_stream, 1), timeout=10)
        [(letter, _)] = await dlq_letters(bus, 1)
    assert (letter.error, letter.num_delivered, letter.claim, letter.size) == \
        ("SchemaViolation", 1, False, len(original))
    assert letter.data == original[:1024] and letter.sha256 == hashlib.sha256(original).hexdigest()
    with pytest.raises(BlobNotFound, match="was not stored"):
        await letter.original(bus.get_blob)


async def test_transient_failure_is_retried_with_backoff(fast_bus: Bus, eventually: Eventually) -> None:
    rec = Recorder(fail=lambda d: RuntimeError("flaky") if d.attempt < 3 else None)
    await fast_bus.dispatch(task(1))
    consumer = PullConsumer.for_role(fast_bus, ROLE, rec, nak_delay=0.05)
    async with consuming(consumer):
        await eventually(lambda: [a for _, a in rec.seen] == [1, 2, 3])
    assert consumer.backoff(1) == 0.05 and consumer.backoff(3) == 0.2
    assert consumer.backoff(30) == 60.0  # capped
    info = await fast_bus._js.stream_info(fast_bus.topology.tasks_stream)
    assert info.state.messages == 0


async def test_exhausted_and_permanent_failures_are_dead_lettered(fast_bus: Bus, eventually: Eventually) -> None:
    def fail(d: Delivery) -> BaseException:
        if d.message(Task).step.step_id == "s1":
            return RuntimeError("always broken")
        return BadRequest("HTTP 400: the request itself is wrong")  # retryable = False

    rec = Recorder(fail=fail)
    await fast_bus.dispatch(task(1))
    await fast_bus.dispatch(task(2))
    async with consuming(PullConsumer.for_role(fast_bus, ROLE, rec, max_deliver=3, nak_delay=0.01)):
        await eventually(lambda: sorted(rec.seen) == [("g1.s1.1", 1), ("g1.s1.1", 2), ("g1.s1.1", 3),
                                                      ("g1.s2.1", 1)])
        letters = {d.error: d for d, _ in await dlq_letters(fast_bus, 2)}
    assert letters["BadRequest"].num_delivered == 1
    assert letters["RuntimeError"].num_delivered == 3 and "always broken" in letters["RuntimeError"].reason


async def test_giving_up_is_announced_before_the_letter_even_when_the_announcement_fails(
        fast_bus: Bus, eventually: Eventually) -> None:
    heard: list[tuple[str, int, str, int]] = []

    async def give_up(delivery: Delivery, exc: BaseException) -> None:
        t = delivery.message(Task)
        letters = (await fast_bus._js.stream_info(fast_bus.topology.dlq_stream)).state.messages
        heard.append((t.task_id, delivery.attempt, type(exc).__name__, letters))
        if t.step.step_id == "s2":
            raise RuntimeError("the announcement itself fails")

    subject = fast_bus.topology.task_subject(ROLE)
    await fast_bus.publish_raw(subject, b"\xc1 poison is not announced: it has no task")
    await fast_bus.dispatch(task(1))
    await fast_bus.dispatch(task(2))
    rec = Recorder(fail=lambda d: RuntimeError("broken") if d.message(Task).step.step_id == "s1"
                   else BadRequest("HTTP 400"))
    consumer = PullConsumer.for_role(fast_bus, ROLE, rec, max_deliver=2, nak_delay=0.01, on_give_up=give_up)
    async with consuming(consumer):
        await eventually(lambda: len(heard) == 2)
        letters = {d.error: d for d, _ in await dlq_letters(fast_bus, 3)}
    # Told once per message given up, on its last delivery; the letters stored by then are the poison's
    # and the other one's if it was given up first — never its own.
    assert sorted(h[:3] for h in heard) == [("g1.s1.1", 2, "RuntimeError"), ("g1.s2.1", 1, "BadRequest")]
    assert [h[3] for h in heard] == [1, 2]
    assert set(letters) == {"CodecError", "RuntimeError", "BadRequest"}  # a failing announcement loses nothing


async def test_never_holds_more_than_its_workers(fast_bus: Bus, eventually: Eventually) -> None:
    ack_pending: list[int] = []

    class Probe(Recorder):
        async def __call__(self, delivery: Delivery) -> None:
            info = await fast_bus._js.consumer_info(fast_bus.topology.tasks_stream, "role-coder")
            ack_pending.append(info.num_ack_pending or 0)
            await super().__call__(delivery)

    rec = Probe(hold=0.05)
    for n in range(20):
        await fast_bus.dispatch(task(n))
    async with consuming(PullConsumer.for_role(fast_bus, ROLE, rec, concurrency=3)):
        await eventually(lambda: len(rec.seen) == 20)
    assert rec.max_running == 3
    assert max(ack_pending) <= 3  # delivered-but-unacked never exceeds the worker slots
    assert sorted(t for t, _ in rec.seen) == sorted(task(n).task_id for n in range(20))


async def test_stop_drains_in_flight_work(fast_bus: Bus, eventually: Eventually) -> None:
    release = asyncio.Event()
    done: list[str] = []

    async def slow(delivery: Delivery) -> None:
        await release.wait()
        done.append(delivery.message(Task).task_id)

    consumer = PullConsumer.for_role(fast_bus, ROLE, slow)
    await fast_bus.dispatch(task(1))
    runner = asyncio.create_task(consumer.run())
    await eventually(lambda: consumer.in_flight == 1)
    consumer.stop()
    await asyncio.sleep(0.2)  # give run() a chance to (wrongly) return early
    assert not runner.done()
    release.set()
    await asyncio.wait_for(runner, 5)
    assert done == ["g1.s1.1"]
    info = await fast_bus._js.stream_info(fast_bus.topology.tasks_stream)
    assert info.state.messages == 0


async def test_keeps_consuming_after_server_kill_and_restart(fast_bus: Bus, nats_server: EmbeddedNats,
                                                             eventually: Eventually, retry: Retry) -> None:
    rec = Recorder()
    async with consuming(PullConsumer.for_role(fast_bus, ROLE, rec, concurrency=2)):
        await fast_bus.dispatch(task(1))
        await eventually(lambda: len(rec.seen) == 1)

        nats_server.kill()  # SIGKILL: no goodbye, pending pull requests vanish with it
        await eventually(lambda: not fast_bus.connected)
        await nats_server.start()  # same port, same data directory
        await eventually(lambda: fast_bus.connected, timeout=15)

        for n in (2, 3):  # the first attempts may time out while the client reconnects
            await retry(lambda n=n: fast_bus.dispatch(task(n)), errors=(PublishError,))
        await eventually(lambda: len(rec.seen) == 3, timeout=20)
    assert [t for t, _ in rec.seen] == ["g1.s1.1", "g1.s2.1", "g1.s3.1"]


def test_dead_letter_round_trips() -> None:
    letter = DeadLetter(reason="CodecError: bad\nbytes", error="CodecError", stream="S", subject="x.y",
                        stream_seq=7, consumer="role-x", num_delivered=1, data=b"\x00\xff",
                        headers={"Nats-Msg-Id": "m"})
    assert DeadLetter.decode(letter.encode()) == letter
    assert letter.nats_headers() == {DLQ_REASON_HEADER: "CodecError: bad bytes", "Nats-Msg-Id": "dlq.S.role-x.7"}
    assert encode(task()) != letter.encode()


def test_retry_is_a_property_of_the_error_class() -> None:
    """One rule for every consumer and role: the class says whether a retry can help, the delivery
    count says whether one is left; nothing patches ``retryable`` onto an instance."""
    tiers = {"edge": RateLimited("429"), "long_context": BadRequest("400")}
    assert AllTiersFailed.of("x", tiers).retryable and isinstance(AllTiersFailed.of("x", tiers), AllTiersUnavailable)
    assert not AllTiersFailed.of("x", {"edge": BadRequest("400")}).retryable
    assert retryable(PublishError("no ack")) and not retryable(PayloadRefused("too big"))
    assert retryable(RuntimeError("a bug")) and not retryable(OptionInvalid("bad option"))
    assert not gives_up(RateLimited("429"), attempt=2, max_deliver=3)
    assert gives_up(RateLimited("429"), attempt=3, max_deliver=3)
    assert gives_up(BadRequest("400"), attempt=1, max_deliver=3)
    assert "retryable" not in vars(AllTiersFailed.of("x", tiers))  # the class's, not the instance's
