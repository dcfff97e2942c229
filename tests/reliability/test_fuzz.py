"""Bad input. On the task and goal subjects: 10,000 fuzzed messages — random bytes, truncated msgpack,
wrong types, huge fields, unknown versions (an old major among them), messages just under the server's
1 MiB limit, wrong kinds, dangling claim-checks — on every task subject and the goal subject, published raw while a real goal runs, at the server's and
the nodes' real size limits. No node process dies, every fuzzed message ends in MESH_DLQ with a reason
(the near-limit ones with their original by claim-check), and the real goal completes meanwhile.

Payloads above the *server's* max_payload never reach a consumer: the server refuses them at
publish time, and the publisher gets a clear error (tested on its own below).

On the event stream: 10,000 hostile events, forged outcomes among them, while real goals run (below)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from nats.js import api

from mesh.bus import Bus, DeadLetter, Topology
from mesh.bus.dlq import DLQ_REASON_HEADER
from mesh.config import MeshSettings
from mesh.contracts import (
    ArtifactRef,
    EventBase,
    Goal,
    GoalCompleted,
    Step,
    StepCompleted,
    StepDispatched,
    StepFailed,
    StepProgress,
    Task,
    encode,
    new_id,
    open_envelope,
)
from mesh.contracts.events import EVENT_TYPES
from mesh.embedded.readiness import wait_for_roles
from mesh.errors import ContractError, MessageTooLarge, PublishError
from mesh.roles.goalstore import GoalStore
from mesh.roles.ledger_service import LedgerClient
from mesh.store import Ledger
from tests.ledgerkit import Eventually, caught_up
from tests.meshkit import in_process_mesh, node_env, role_specs
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
        ("unknown version", 10, lambda: msgpack.packb(doc | {"v": rng.choice(["1.2", "3.0", "0.9", "99.1", "v1", ""])})),
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


async def _pull_dlq(bus: Bus) -> list[tuple[DeadLetter, dict[str, str]]]:
    """Every letter in MESH_DLQ, pulled in batches (a push consumer of ~10,000 letters outruns a busy client)."""
    stored = (await bus._js.stream_info(bus.topology.dlq_stream)).state.messages
    sub = await bus._js.pull_subscribe(f"{bus.topology.prefix}.dlq.>", stream=bus.topology.dlq_stream)
    letters: list[tuple[DeadLetter, dict[str, str]]] = []
    try:
        while len(letters) < stored:
            for msg in await sub.fetch(500, timeout=10):
                letters.append((DeadLetter.decode(msg.data), dict(msg.headers or {})))
                await msg.ack()
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


# --- the event stream ------------------------------------------------------------------------------
#
# 10,000 hostile messages on mesh.event.> while real goals run on the sim, published in acknowledged
# batches. Every reader of the stream survives: the ledger dead-letters what it cannot decode, and what a
# subject's role cannot have emitted (ForgedEvent); the planner dead-letters undecodable outcomes and
# refuses, counts and ignores every well-formed forged one — from another role, or from the step's own
# role for an attempt never dispatched.

EVENT_FUZZ = 10_000
EVENT_BATCH = 250
EVENT_STORM_SECONDS = 30.0
REAL_GOALS = 3
FAKE = ArtifactRef(digest="f" * 64, size=1, name="forged")  # what every forged outcome claims to have made
OUTCOMES = ("step.completed", "step.failed")
POISON = ("CodecError", "SchemaViolation", "UnsupportedVersion", "DecodeLimitExceeded", "MessageTooLarge")
Target = tuple[str, str, str, int]  # a dispatched real step: goal, step, role, attempt


@dataclass(frozen=True)
class Hostile:
    kind: str
    fate: str  # poison | forged role | forged goal | forged attempt | forged end | free (decodes: either fate)
    subject: str
    data: bytes


def _doc(event: EventBase) -> dict[str, Any]:
    doc: dict[str, Any] = msgpack.unpackb(encode(event), raw=False)
    return doc


def _nested(depth: int) -> bytes:
    """``{"a": {"a": … nil}}`` ``depth`` maps deep, written by hand: msgpack's packer stops at 512 levels."""
    return b"\x81\xa1a" * depth + b"\xc0"


def _deep_progress(msg_id: str, goal: str, depth: int) -> bytes:
    marker = "NESTING-GOES-HERE"
    doc = _doc(StepProgress(event_id=msg_id, goal_id=goal, step_id="s1", role="coder", message="m",
                            detail={"x": marker}))
    return msgpack.packb(doc).replace(msgpack.packb(marker), _nested(depth))


def fuzz_event(msg_id: str, rng: random.Random, roles: list[str], targets: list[Target],
               topo: Topology) -> Hostile:
    goal = f"fz{rng.randrange(10**6)}"
    role = rng.choice(roles)
    subject = topo.event_subject(goal, role, rng.choice(OUTCOMES) if rng.random() < 0.5 else rng.choice(EVENT_TYPES))
    valid = _doc(StepCompleted(event_id=msg_id, goal_id=goal, step_id="s1", role=role, outputs=[FAKE]))

    def poison(kind: str, data: bytes) -> Hostile:
        return Hostile(kind, "poison", subject, data)

    def forged(target: Target | None, *, attempt_off: int = 0) -> Hostile:
        """A well-formed outcome of ``target`` (or of a goal nobody has) emitted under another role's
        subject, or, with ``attempt_off``, under the step's own role for an attempt never dispatched."""
        gid, step, owner, attempt = target or (goal, "s1", "coder", 1)
        claimed = owner if attempt_off else rng.choice([r for r in roles if r != owner])
        kind = rng.choice((StepCompleted, StepFailed))
        body: dict[str, Any] = {"outputs": [FAKE], "verdict": "approve"} if kind is StepCompleted else {"error": "forged"}
        event = kind(event_id=msg_id, goal_id=gid, step_id=step, role=owner, attempt=attempt + attempt_off, **body)
        fate = "forged attempt" if attempt_off else ("forged role" if target else "forged goal")
        return Hostile(f"forged outcome ({fate.removeprefix('forged ')})", fate,
                       topo.event_subject(gid, claimed, event.type), msgpack.packb(_doc(event)))

    def wrong_types() -> bytes:
        key, value = rng.choice([("attempt", "many"), ("outputs", "x"), ("usage", [1]), ("type", "no.such"),
                                 ("goal_id", 7), ("step_id", {"a": 1}), ("verdict", "maybe"), ("at", "then")])
        return msgpack.packb(valid | {"body": valid["body"] | {key: value}})

    kinds: list[tuple[int, Callable[[], Hostile]]] = [
        (12, lambda: poison("random bytes", rng.randbytes(rng.randrange(0, 2048)))),
        (12, lambda: poison("truncated msgpack", (b := msgpack.packb(valid))[: rng.randrange(0, len(b))])),
        (5, lambda: poison("not a map", msgpack.packb(rng.choice([[1, 2, 3], "envelope", 42, None, b"raw"])))),
        (6, lambda: poison("unknown version", msgpack.packb(valid | {"v": rng.choice(["3.0", "0.9", "99.1", "v1", ""])}))),
        (6, lambda: poison("broken envelope", msgpack.packb(rng.choice([
            valid | {"body": ["not", "a", "map"]}, valid | {"ts": "yesterday"}, valid | {"trace": {"a": 1}},
            {k: v for k, v in valid.items() if k != "body"}, valid | {"kind": "no-such-kind"}])))),
        (5, lambda: poison("wrong kind", msgpack.packb(valid | {"kind": rng.choice(["task", "goal", "plan"])}))),
        (12, lambda: poison("wrong types", wrong_types())),
        (2, lambda: poison("huge id", msgpack.packb(valid | {"body": valid["body"] | {
            "step_id": "s" * rng.randrange(100_000, 200_000)}}))),
        (2, lambda: poison("nesting past the decoder", _deep_progress(msg_id, goal, rng.randrange(1100, 5000)))),
        (4, lambda: Hostile("deep nesting", "free", topo.event_subject(goal, "coder", "step.progress"),
                            _deep_progress(msg_id, goal, rng.randrange(16, 1000)))),
        (3, lambda: Hostile("huge string", "free", topo.event_subject(goal, "coder", "step.progress"),
                            encode(StepProgress(event_id=msg_id, goal_id=goal, step_id="s1", role="coder",
                                                message="m" * rng.randrange(100_000, 300_000))))),
        (14, lambda: forged(rng.choice(targets) if targets and rng.random() < 0.8 else None)),
        (9, lambda: forged(rng.choice(targets), attempt_off=1000) if targets else forged(None)),
        (3, lambda: Hostile("forged goal end", "forged end", topo.event_subject(
            rng.choice(targets)[0] if targets else goal, role if role != topo.goal_role else "coder",
            "goal.completed"), encode(GoalCompleted(event_id=msg_id, goal_id=rng.choice(targets)[0] if targets
                                                    else goal, result=FAKE)))),
    ]
    return rng.choices([make for _, make in kinds], weights=[w for w, _ in kinds])[0]()


async def test_10000_hostile_events_are_dead_lettered_or_refused_while_real_goals_run_unaltered(
        bus: Bus, fast: MeshSettings, eventually: Eventually, retry: Retry) -> None:
    topo = bus.topology
    roles = sorted(role_specs(with_ledger=True))
    rng = random.Random(6)
    sent: dict[str, Hostile] = {}
    targets: list[Target] = []
    reals = [Goal(brief="Build me a login system") for _ in range(REAL_GOALS)]
    real_ids = {g.goal_id for g in reals}

    async def follow_dispatches() -> None:
        """The real goals' dispatched steps, as the planner announces them: what the forgeries aim at."""
        sub = await bus._js.subscribe(topo.event_subject("*", topo.goal_role, "step.dispatched"),
                                      stream=topo.events_stream, ordered_consumer=True,
                                      deliver_policy=api.DeliverPolicy.NEW)
        try:
            async for msg in sub.messages:
                with contextlib.suppress(ContractError):
                    event = await bus.open_event(msg)
                    if isinstance(event, StepDispatched) and event.goal_id in real_ids:
                        targets.append((event.goal_id, event.step_id, event.role, event.attempt))
        finally:
            await sub.unsubscribe()

    async def publish(batch: list[tuple[str, Hostile]]) -> None:
        acks = [await bus._js.publish_async(h.subject, h.data, headers={"Nats-Msg-Id": m}) for m, h in batch]
        results = await asyncio.gather(*acks, return_exceptions=True)
        for (msg_id, hostile), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):  # an ambiguous ack on a loaded machine: the msg id dedupes
                await retry(lambda h=hostile, m=msg_id: bus.publish_raw(h.subject, h.data, headers={
                    "Nats-Msg-Id": m}), errors=(PublishError,))

    async with in_process_mesh(fast, specs=role_specs(with_ledger=True)) as nodes:
        await wait_for_roles(bus, roles)
        planner = next(n for n in nodes if n.spec.role == topo.goal_role)
        started = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            follower = tg.create_task(follow_dispatches())
            ends = tg.create_task(wait_terminal(bus, real_ids, timeout=240))
            # Paced: a storm faster than the planner takes outcomes would only queue the real goals' outcomes
            # behind it. The goals are submitted during its first quarter and run inside it.
            for i in range(EVENT_FUZZ // EVENT_BATCH):
                if i % 3 == 0 and i // 3 < REAL_GOALS:
                    await bus.submit_goal(reals[i // 3])
                batch = [(m, fuzz_event(m, rng, roles, targets, topo))
                         for m in (f"fuzz-{len(sent) + k}" for k in range(EVENT_BATCH))]
                sent.update(batch)
                await publish(batch)
                ahead = started + EVENT_STORM_SECONDS * (i + 1) * EVENT_BATCH / EVENT_FUZZ - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)  # pacing the storm, not waiting for anything
            storm_seconds = time.monotonic() - started
            await ends
            follower.cancel()
        client = LedgerClient(bus, timeout=10)
        await caught_up(eventually, client, bus, timeout=120)

        async def planner_drained() -> bool:
            info = await bus._js.consumer_info(topo.events_stream, topo.outcomes_consumer)
            return not info.num_pending and not info.num_ack_pending

        await eventually(planner_drained, timeout=120, message="the planner took every outcome")
        disposed_seconds = time.monotonic() - started
        refused = {reason: planner.metrics.registry.get_sample_value(
            "mesh_outcomes_refused_total", {"reason": reason}) or 0.0 for reason in ("role", "attempt", "goal", "step")}
        states = {gid: await GoalStore(bus).get(gid) for gid in real_ids}

    # the real goals: completed, holding nothing any forgery claimed
    finals = ends.result()
    assert all(isinstance(finals[gid], GoalCompleted) for gid in real_ids), finals
    for gid, state in states.items():
        assert state is not None and state.status == "completed", gid
        assert FAKE.digest not in state.model_dump_json(), f"a forged outcome reached goal {gid}"
        end = finals[gid]
        assert isinstance(end, GoalCompleted) and FAKE.digest not in end.model_dump_json()
        assert not any(st.error == "forged" for st in state.steps.values())

    # the planner: undecodable outcomes dead-lettered, every forged one refused and counted
    fates = Counter(h.fate for h in sent.values())
    letters = await _pull_dlq(bus)
    for letter, headers in letters:
        assert letter.reason and headers[DLQ_REASON_HEADER], letter
    ledger_letters = {l.headers.get("Nats-Msg-Id"): l for l, _ in letters if l.stream == topo.events_stream
                      and l.consumer == topo.consumer_name("ledger")}
    planner_letters = {l.headers.get("Nats-Msg-Id"): l for l, _ in letters if l.stream == topo.events_stream
                       and l.consumer == topo.outcomes_consumer}
    missing = Counter(h.kind for m, h in sent.items() if h.fate != "forged attempt" and h.fate != "free"
                      and m not in ledger_letters)
    assert not missing, f"hostile events the ledger neither recorded nor dead-lettered, by kind: {dict(missing)}"
    assert refused["role"] >= fates["forged role"] and refused["attempt"] >= fates["forged attempt"]
    assert refused["goal"] >= fates["forged goal"] and fates["forged attempt"] and fates["forged role"]
    for msg_id, hostile in sent.items():
        outcome = topo.event_address(hostile.subject).type in OUTCOMES  # type: ignore[union-attr]
        if hostile.fate == "poison":
            assert ledger_letters[msg_id].error in POISON, (hostile.kind, ledger_letters[msg_id])
            if outcome:
                assert planner_letters[msg_id].error in POISON, (hostile.kind, planner_letters[msg_id])
        elif hostile.fate in ("forged role", "forged goal", "forged end"):
            assert ledger_letters[msg_id].error == "ForgedEvent", (hostile.kind, ledger_letters[msg_id])
            assert msg_id not in planner_letters
        else:
            assert msg_id not in planner_letters, (hostile.kind, planner_letters[msg_id])

    # the ledger: what decodes and its subject's role may emit is recorded; everything else is a letter
    with Ledger(fast.ledger_file, read_only=True) as ledger:
        recorded = {r[0] for r in ledger.cursor().execute(
            "SELECT event_id FROM events WHERE event_id LIKE 'fuzz-%'").fetchall()}
    for msg_id, hostile in sent.items():
        if hostile.fate == "forged attempt":
            assert msg_id in recorded, hostile.kind  # subject and body agree: only the planner can tell
        elif hostile.fate == "free":
            assert (msg_id in recorded) != (msg_id in ledger_letters), hostile.kind
        else:
            assert msg_id not in recorded, hostile.kind
    kinds = Counter(h.kind for h in sent.values())
    print(f"figure: event fuzz: {len(sent):,} hostile events in {storm_seconds:.0f} s while {REAL_GOALS} real goals "
          f"completed unaltered; every message disposed of after {disposed_seconds:.0f} s; "
          f"{len(ledger_letters):,} ledger and {len(planner_letters):,} planner dead letters; forged outcomes "
          f"refused: {', '.join(f'{r} {int(n)}' for r, n in refused.items())} "
          f"({', '.join(f'{k} {n}' for k, n in kinds.most_common())})")
