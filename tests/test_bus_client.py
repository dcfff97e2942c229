"""Bus: connect errors, typed publish with dedupe and trace headers, claim-check, blobs, KV, event watch."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable

import pytest

from mesh.bus import Bus
from mesh.bus.outbox import MAX_HELD, Outbox
from mesh.config import MeshSettings
from mesh.contracts import Goal, GoalSubmitted, Step, StepCompleted, StepFailed, StepStarted, Task, sha256_hex
from mesh.embedded import EmbeddedNats, free_port
from mesh.errors import BlobNotFound, MessageTooLarge, NotConnected, PublishError


def _task(goal_id: str = "g1", attempt: int = 1, brief: str = "build it") -> Task:
    step = Step(step_id="s1", role="coder", instruction="write the code")
    return Task(task_id=Task.make_id(goal_id, "s1", attempt), goal_id=goal_id, step=step, attempt=attempt,
                brief=brief)


async def test_no_server_is_a_clear_not_connected(tmp_path: object) -> None:
    settings = MeshSettings(nats_url=f"nats://127.0.0.1:{free_port()}", connect_attempts=1, reconnect_wait=0.05,
                            connect_timeout=0.5)
    with pytest.raises(NotConnected, match="cannot connect to NATS"):
        await Bus.connect(settings)
    with pytest.raises(NotConnected, match="MESH_NATS_URL"):
        await Bus.connect(MeshSettings(nats_url=None))


async def test_duplicate_msg_id_is_dropped(bus: Bus) -> None:
    await bus.provision(["coder"])
    assert await bus.dispatch(_task()) is True
    assert await bus.dispatch(_task()) is False  # same goal.step.attempt: dropped by the stream
    assert await bus.dispatch(_task(attempt=2)) is True  # a new attempt is a new task
    info = await bus._js.stream_info(bus.topology.tasks_stream)
    assert info.state.messages == 2


async def test_publish_carries_trace_and_round_trips(bus: Bus) -> None:
    sub = await bus._js.pull_subscribe(bus.topology.task_subject("tester"), durable="probe",
                                      stream=bus.topology.tasks_stream)
    trace = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "tracestate": "mesh=1"}
    task = _task()
    await bus.publish(bus.topology.task_subject("tester"), task, msg_id="custom-id", trace=trace)
    [msg] = await sub.fetch(1, timeout=5)
    assert msg.headers is not None
    assert msg.headers["Nats-Msg-Id"] == "custom-id"
    assert msg.headers["traceparent"] == trace["traceparent"] and msg.headers["tracestate"] == "mesh=1"
    envelope = await bus.open(msg)
    assert envelope.trace == trace and envelope.kind == "task" and envelope.goal_id == "g1"
    assert envelope.message(Task) == task


async def test_blob_of_1_5_mb_round_trips_through_the_object_store(bus: Bus) -> None:
    data = os.urandom(1_500_000)
    ref = await bus.put_blob(data, media_type="application/x-test", name="big.bin")
    assert (ref.digest, ref.size, ref.media_type, ref.name) == (sha256_hex(data), len(data), "application/x-test",
                                                                "big.bin")
    assert await bus.put_blob(data) == ref.model_copy(update={"media_type": "application/octet-stream", "name": ""})
    assert await bus.get_blob(ref.digest) == data
    with pytest.raises(BlobNotFound):
        await bus.get_blob("0" * 64)


async def test_small_blob_round_trips_in_one_chunk(bus: Bus) -> None:
    ref = await bus.put_blob(b"notes", media_type="text/markdown", name="s1/note")
    assert await bus.get_blob(ref.digest) == b"notes"


async def test_a_small_blob_stored_again_still_reads_back(bus: Bus) -> None:
    """A one-chunk blob is stored without looking it up first: storing it again replaces its meta, and
    it still reads back, through the bus and through a plain object-store client."""
    first = await bus.put_blob(b"same bytes", media_type="text/markdown", name="s1/note")
    again = await bus.put_blob(b"same bytes", media_type="text/markdown", name="s2/note")
    assert (first.digest, first.name, again.name) == (sha256_hex(b"same bytes"), "s1/note", "s2/note")
    assert await bus.get_blob(first.digest) == b"same bytes"
    store = await bus.object_store(bus.topology.obj_artifacts)
    assert (await store.get(first.digest)).data == b"same bytes"


async def test_a_small_blob_keeps_one_chunk_under_its_digest(bus: Bus) -> None:
    """``get_blob`` reads a one-chunk blob by its digest alone (no meta read): the chunk's subject is the
    digest, and storing the bytes again replaces it rather than adding a second chunk there."""
    bucket = bus.topology.obj_artifacts
    for name in ("s1/note", "s2/note"):
        ref = await bus.put_blob(b"digest-named chunk", name=name)
    counts = await bus.subject_counts(f"OBJ_{bucket}", f"$O.{bucket}.C.>")
    assert counts == {f"$O.{bucket}.C.{ref.digest}": 1}
    assert await bus.get_blob(ref.digest) == b"digest-named chunk"


async def test_a_blob_stored_by_a_plain_object_store_client_is_read_through_its_meta(bus: Bus) -> None:
    """Bytes at the digest's chunk subject that are not the blob (here: put there by someone else) are
    passed over: the meta names the real chunk."""
    data = b"stored with a random nuid"
    digest = sha256_hex(data)
    bucket = bus.topology.obj_artifacts
    await (await bus.object_store(bucket)).put(digest, data)
    await bus._js.publish(f"$O.{bucket}.C.{digest}", b"not the blob")
    assert await bus.get_blob(digest) == data


async def test_outbox_stores_every_event_before_settle_returns(bus: Bus) -> None:
    sent = [StepStarted(goal_id="g8", step_id="s1", role="coder"),
            StepCompleted(goal_id="g8", step_id="s1", role="coder")]
    async with Outbox(bus) as outbox:
        for event in [*sent, sent[0]]:  # the duplicate is dropped by the stream, and acked as such
            await outbox.emit(event)
        await outbox.settle()
        info = await bus._js.stream_info(bus.topology.events_stream)
        assert info.state.messages == 2
    await bus.close()
    with pytest.raises(NotConnected):
        await Outbox(bus).emit(sent[0])


async def test_outbox_sends_held_events_after_the_linger_in_order_and_on_leaving(bus: Bus) -> None:
    """Held events go out by themselves once the linger passes (no settle: a watcher sees them while the
    step runs), a burst past ``MAX_HELD`` goes at once, order is kept, and leaving the block sends the rest."""
    steps = [StepStarted(goal_id="g9", step_id=f"s{i}", role="test") for i in range(MAX_HELD + 3)]
    got: list[str] = []
    async with contextlib.aclosing(bus.watch_events("g9")) as watch:
        async def seen(n: int) -> None:
            async for event in watch:
                got.append(event.step_id)  # type: ignore[attr-defined]
                if len(got) == n:
                    return
        async with Outbox(bus, linger=0.05) as outbox:
            await outbox.emit(steps[0])
            await asyncio.wait_for(seen(1), 10)  # sent by the outbox's own task, nobody settled
            for event in steps[1:MAX_HELD + 1]:  # the MAX_HELD-th held event sends the burst at once
                await outbox.emit(event)
        async with Outbox(bus, linger=3600) as outbox:  # would hold them for an hour: leaving sends them
            for event in steps[MAX_HELD + 1:]:
                await outbox.emit(event)
        await asyncio.wait_for(seen(len(steps)), 10)
    assert got == [e.step_id for e in steps]


async def test_outbox_refuses_a_bad_event_where_it_is_emitted(bus: Bus) -> None:
    async with Outbox(bus, linger=3600) as outbox:
        with pytest.raises(MessageTooLarge):  # not an hour later from the sender, nor at settle
            await outbox.emit(StepFailed(goal_id="g10", step_id="s1", role="test",
                                         error="x" * (bus.settings.max_message_bytes + 1)))
    with pytest.raises(RuntimeError, match="async with"):
        await Outbox(bus).emit(StepStarted(goal_id="g10", step_id="s1", role="test"))


async def test_large_message_travels_by_claim_check(bus: Bus) -> None:
    await bus.provision(["coder"])
    task = _task(brief="x" * 1_500_000)  # far above claim_check_bytes and NATS' 1 MiB max_payload
    assert await bus.dispatch(task)
    sub = await bus._js.pull_subscribe_bind(durable="role-coder", stream=bus.topology.tasks_stream)
    [msg] = await sub.fetch(1, timeout=5)
    assert len(msg.data) < bus.settings.claim_check_bytes  # only the reference travelled
    envelope = await bus.open(msg)
    assert envelope.claim is None and envelope.message(Task) == task
    objects = await (await bus.object_store(bus.topology.obj_artifacts)).list()
    assert len(objects) == 1


async def test_watch_events_yields_decoded_events_in_order(bus: Bus) -> None:
    goal = Goal(goal_id="g7", brief="watch me")
    sent = [GoalSubmitted(goal_id="g7", goal=goal), StepStarted(goal_id="g7", step_id="s1", role="test"),
            StepCompleted(goal_id="g7", step_id="s1", role="test")]
    await bus.emit(StepStarted(goal_id="other", step_id="s1", role="test"))
    async with await Bus.connect(bus.settings, name="planner", role="planner", check=False) as planner:
        await planner.emit(sent[0])  # goal-level events are the planner's (the fixture's bus is role "test")
        # role "test" may not report a coder's step: a watcher skips it (and the ledger dead-letters it)
        await bus.emit(StepCompleted(goal_id="g7", step_id="s1", role="coder", event_id="forged"))
        for event in sent[1:]:
            await bus.emit(event)
        await planner.emit(sent[0])  # a duplicate event id: dropped
    got = []
    async with contextlib.aclosing(bus.watch_events("g7")) as events:
        async for event in events:
            got.append(event)
            if len(got) == len(sent):
                break
    assert got == sent
    info = await bus._js.stream_info(bus.topology.events_stream)
    assert info.state.messages == 5


async def test_kv_handles_are_cached(bus: Bus) -> None:
    kv = await bus.kv(bus.topology.kv_goals)
    assert kv is await bus.kv(bus.topology.kv_goals)
    revision = await kv.put("g1", b"state")
    assert (await kv.get("g1")).value == b"state"
    await kv.update("g1", b"next", last=revision)  # compare-and-swap works on the provisioned bucket


async def test_watch_events_survives_a_server_restart(bus: Bus, nats_server: EmbeddedNats,
                                                      eventually: Callable[..., Awaitable[None]],
                                                      retry: Callable[..., Awaitable[object]]) -> None:
    got: list[str] = []

    async def watch() -> None:
        async with contextlib.aclosing(bus.watch_events("g9")) as events:
            async for event in events:
                got.append(event.type)
                if len(got) == 2:
                    return

    async with asyncio.TaskGroup() as tg:
        tg.create_task(watch())
        await bus.emit(StepStarted(goal_id="g9", step_id="s1", role="test"))
        await eventually(lambda: got == ["step.started"])
        nats_server.kill()
        await nats_server.start()
        await retry(lambda: bus.emit(StepCompleted(goal_id="g9", step_id="s1", role="test")),
                    errors=(PublishError,))
        await eventually(lambda: got == ["step.started", "step.completed"], timeout=20)
