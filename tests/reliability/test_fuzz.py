"""Bad input: 10,000 fuzzed messages — random bytes, truncated msgpack, wrong types, huge fields,
unknown versions, messages just under the server's 1 MiB limit, wrong kinds, dangling claim-checks —
on every task subject and the goal subject, published raw while a real goal runs, at the server's and
the nodes' real size limits. No node process dies, every fuzzed message ends in MESH_DLQ with a reason
(the near-limit ones with their original by claim-check), and the real goal completes meanwhile.

Payloads above the *server's* max_payload never reach a consumer: the server refuses them at
publish time, and the publisher gets a clear error (tested on its own below)."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from nats.js import api

from mesh.bus import Bus, DeadLetter
from mesh.bus.dlq import DLQ_REASON_HEADER
from mesh.config import MeshSettings
from mesh.contracts import ArtifactRef, Goal, GoalCompleted, Step, Task, encode, new_id, open_envelope
from mesh.embedded.readiness import wait_for_roles
from mesh.errors import MessageTooLarge, PublishError
from tests.ledgerkit import Eventually
from tests.meshkit import node_env, role_specs
from tests.reliability.kit import Fleet, padded_to, wait_terminal

pytestmark = pytest.mark.timeout(300)

FUZZ = 10_000
STORM_SECONDS = 40.0
SERVER_LIMIT = 1024 * 1024  # nats-server's default max_payload; the nodes keep their default limit too
Payload = tuple[str, bytes]  # (kind of fuzz, bytes)
Retry = Callable[..., Awaitable[object]]


def _valid(subject_role: str, rng: random.Random) -> dict[str, Any]:
    """A well-formed envelope of what the subject expects, as a msgpack-ready dict."""
    if subject_role == "planner":
        model: Any = Goal(brief="a goal " + "x" * rng.randrange(50))
    else:
        gid = new_id()
        model = Task(task_id=Task.make_id(gid, "s1", 1), goal_id=gid,
                     step=Step(step_id="s1", role=subject_role, instruction="do it"))
    doc: dict[str, Any] = msgpack.unpackb(encode(model), raw=False)
    return doc


def _wrong_types(doc: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    body = dict(doc["body"])
    key = rng.choice(sorted(body))
    body[key] = rng.choice([12345, -1.5, ["a", "list"], {"a": "map"}, True])  # (bytes pass as str: not wrong)
    if key in ("constraints", "options", "inputs", "brief", "memory", "budget_fraction_left", "prior_failures",
               "deadline", "position", "remaining", "submitted_at", "budget", "attempt"):
        body["goal_id"] = 7  # that key may accept the value (or coerce it): break a required one too
    return doc | {"body": body}


def _huge_field(doc: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A 100-200 KB value in a field bounded by the contract (ids are ≤ 64 characters)."""
    return doc | {"body": doc["body"] | {"goal_id": "g" * rng.randrange(100_000, 200_000)}}


def fuzz_one(role: str, rng: random.Random) -> Payload:
    doc = _valid(role, rng)
    kinds: list[tuple[str, int, Callable[[], bytes]]] = [
        ("random bytes", 20, lambda: rng.randbytes(rng.randrange(0, 2048))),
        ("truncated msgpack", 20, lambda: (b := msgpack.packb(doc))[: rng.randrange(0, len(b))]),
        ("wrong types", 20, lambda: msgpack.packb(_wrong_types(doc, rng))),
        ("unknown version", 10, lambda: msgpack.packb(doc | {"v": rng.choice(["2.0", "0.9", "99.1", "v1", ""])})),
        ("not a map", 9, lambda: msgpack.packb(rng.choice([[1, 2, 3], "envelope", 42, None, b"raw"]))),
        ("broken envelope", 10, lambda: msgpack.packb(rng.choice([
            doc | {"body": ["not", "a", "map"]}, doc | {"ts": "yesterday"}, doc | {"trace": {"a": 1}},
            {k: v for k, v in doc.items() if k != "kind"}, {k: v for k, v in doc.items() if k != "body"},
            doc | {"kind": "no-such-kind"}]))),
        ("wrong kind", 5, lambda: msgpack.packb(doc | {"kind": rng.choice(["event", "plan", "usage",
                                                                                "goal" if role != "planner" else "task"])})),
        ("dangling claim-check", 4, lambda: msgpack.packb({k: v for k, v in doc.items() if k != "body"} | {
            "claim": ArtifactRef(digest=rng.randbytes(32).hex(), size=10).model_dump(mode="json")})),
        ("huge field", 1, lambda: msgpack.packb(_huge_field(doc, rng))),
        ("near the size limit", 1, lambda: padded_to(doc, SERVER_LIMIT - rng.randrange(300, 2001))),
    ]
    name, _, make = rng.choices(kinds, weights=[w for _, w, _ in kinds])[0]
    return name, make()


async def test_10000_fuzzed_messages_end_in_the_dlq_while_real_work_flows(
        bus: Bus, settings: MeshSettings, eventually: Eventually, retry: Retry, tmp_path: Path) -> None:
    roles = [r for r, s in role_specs().items()]
    env = node_env(settings, MESH_SIM_LATENCY_SCALE="0")
    topo = bus.topology
    assert bus.max_payload == SERVER_LIMIT
    rng = random.Random(2026)
    sent: dict[str, tuple[str, str]] = {}  # Nats-Msg-Id → (role, kind of fuzz)
    real = Goal(brief="Build me a login system")
    goal_over = asyncio.Event()

    async def storm() -> None:
        window = asyncio.Semaphore(64)

        async def publish(role: str, kind: str, data: bytes) -> None:
            msg_id = f"fuzz-{len(sent)}"
            sent[msg_id] = (role, kind)
            subject = topo.goal_subject() if role == topo.goal_role else topo.task_subject(role)
            try:  # an ack that times out on a loaded machine is ambiguous: publish again, the msg id dedupes
                await retry(lambda: bus.publish_raw(subject, data, headers={"Nats-Msg-Id": msg_id}),
                            errors=(PublishError,))
            finally:
                window.release()

        async with asyncio.TaskGroup() as tg:
            # FUZZ messages over STORM_SECONDS, and on at that rate until the real goal has ended: however
            # long it takes on this machine, it runs inside the storm.
            for i in itertools.count():
                if i >= FUZZ and goal_over.is_set():
                    break
                if i == FUZZ // 10:
                    await retry(lambda: bus.submit_goal(real), errors=(PublishError,))  # behind a tenth of the storm
                role = roles[i % len(roles)]
                await window.acquire()
                tg.create_task(publish(role, *fuzz_one(role, rng)))
                ahead = started + STORM_SECONDS * (i + 1) / FUZZ - time.monotonic()
                if i % 100 == 99 and ahead > 0:
                    await asyncio.sleep(ahead)  # pacing the storm, not waiting for anything

    fleet = Fleet(roles, env, tmp_path / "logs").start()
    try:
        # The storm starts on a running mesh: starting 6 node processes takes tens of seconds on a loaded
        # machine with a cold bytecode cache (a fresh clone), longer than the whole storm.
        await wait_for_roles(bus, roles)
        started = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(storm())
            ends = await wait_terminal(bus, [real.goal_id], timeout=180)
            goal_seconds = time.monotonic() - started
            goal_over.set()
        storm_seconds = time.monotonic() - started
        assert isinstance(ends[real.goal_id], GoalCompleted), ends
        await eventually(lambda: _all_disposed(bus, roles), timeout=120, interval=0.5, message="every message disposed")
        disposed_seconds = time.monotonic() - started
        assert fleet.crashed() == {}, fleet.crashed()
        assert set((await fleet.terminate()).values()) == {0}
    except BaseException:
        print(fleet.logs())
        for st in (topo.goals_stream, topo.tasks_stream, topo.dlq_stream):
            print(st, (await bus._js.stream_info(st, subjects_filter=">")).state)
        for r in roles:
            ci = await bus._js.consumer_info(topo.stream_for(r), topo.consumer_name(r))
            print(r, "pending", ci.num_pending, "ack pending", ci.num_ack_pending, "redelivered", ci.num_redelivered)
        raise
    finally:
        fleet.stop()

    letters = await _read_dlq(bus)
    lettered = {letter.headers.get("Nats-Msg-Id") for letter, _ in letters}
    missing = Counter(sent[m][1] for m in sent if m not in lettered)
    assert not missing, f"fuzzed messages that did not reach the DLQ, by kind: {dict(missing)}"
    assert len(letters) == len(sent) >= FUZZ
    by_kind: Counter[str] = Counter()
    for letter, headers in letters:
        role, kind = sent[letter.headers["Nats-Msg-Id"]]
        by_kind[kind] += 1
        assert letter.subject == (topo.goal_subject() if role == topo.goal_role else topo.task_subject(role))
        assert letter.reason and headers[DLQ_REASON_HEADER], letter
        assert letter.error in ("CodecError", "SchemaViolation", "UnsupportedVersion"), letter
        assert letter.num_delivered == 1, letter  # poison is recognised at once, never retried
        if kind == "near the size limit":  # a letter wrapping it whole would exceed the limit: by claim-check
            assert letter.claim and 300 <= SERVER_LIMIT - letter.size <= 2000, letter.reason
            assert len(await letter.original(bus.get_blob)) == letter.size  # get_blob checks the digest
    assert len(by_kind) == 10, by_kind  # every kind of fuzz was sent and dead-lettered
    print(f"figure: fuzz: {len(sent):,} bad messages over {storm_seconds:.0f} s on {len(roles) - 1} task subjects and the goal "
          f"subject ({', '.join(f'{k} {n}' for k, n in by_kind.most_common())}): {len(letters):,} dead letters, each "
          f"with its reason, on first delivery; no node died; a real goal completed during the storm "
          f"({goal_seconds:.0f} s); every message disposed of after {disposed_seconds:.0f} s")


async def _all_disposed(bus: Bus, roles: list[str]) -> bool:
    """Every role's consumer has nothing left to deliver and nothing unacknowledged."""
    topo = bus.topology
    for role in roles:
        info = await bus._js.consumer_info(topo.stream_for(role), topo.consumer_name(role))
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def _read_dlq(bus: Bus) -> list[tuple[DeadLetter, dict[str, str]]]:
    sub = await bus._js.subscribe(f"{bus.topology.prefix}.dlq.>", stream=bus.topology.dlq_stream,
                                 ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL)
    letters: list[tuple[DeadLetter, dict[str, str]]] = []
    try:
        async for msg in sub.messages:
            letters.append((DeadLetter.decode(msg.data), dict(msg.headers or {})))
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return letters


async def test_a_payload_above_the_servers_max_payload_is_refused_at_publish(bus: Bus) -> None:
    limit = bus._nc.max_payload
    with pytest.raises(PublishError, match=f"{limit + 1} bytes exceed the server's max_payload of {limit}") as info:
        await bus.publish_raw(bus.topology.task_subject("coder"), b"x" * (limit + 1))
    assert getattr(info.value, "retryable", None) is False  # a handler raising it is dead-lettered, not retried
    # The bus' own publish never gets there: a body above claim_check_bytes travels by reference ...
    big = Goal(brief="y" * 90_000, constraints=["z" * 1000] * 1200)
    await bus.submit_goal(big)
    stored = await bus._js.get_last_msg(bus.topology.goals_stream, bus.topology.goal_subject())
    assert stored.data is not None and len(stored.data) < bus.settings.claim_check_bytes < len(encode(big))
    assert open_envelope(stored.data).claim is not None
    # ... and past the configured message size it is refused before anything is sent.
    with pytest.raises(MessageTooLarge):
        encode(big, max_bytes=1_000_000)
