"""Helpers of the reliability suite: a fleet of real node processes to kill, the whole event stream
read back, terminal events awaited for many goals, process memory, and the long-variant switch."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import msgpack
from nats.js import api

from mesh.bus import Bus
from mesh.contracts import Event, GoalCompleted, GoalPlanned, StepCompleted, StepFailed, StepStarted
from mesh.errors import ContractError
from mesh.roles.goalstore import GoalStore
from tests.meshkit import TERMINAL, NodeProcess

LONG = os.environ.get("MESH_LONG") == "1"
_STARTED = "health endpoint on"  # logged by a node once SIGTERM is handled


def padded_to(doc: dict[str, Any], size: int) -> bytes:
    """``doc`` (an envelope as a msgpack map) packed to exactly ``size`` bytes by padding its body's
    ``goal_id``: ids are at most 64 characters, so the message is poison (a schema violation)."""
    pad = 70_000  # msgpack's str32 from 65,536 characters on: the header length stays the same
    base = len(msgpack.packb(doc | {"body": doc["body"] | {"goal_id": "g" * pad}}))
    data: bytes = msgpack.packb(doc | {"body": doc["body"] | {"goal_id": "g" * (pad + size - base)}})
    assert len(data) == size, (len(data), size)
    return data


class Fleet:
    """One ``mesh node <role>`` process per role; any of them can be killed -9 and started again."""

    def __init__(self, roles: Iterable[str], env: dict[str, str], log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.env, self.log_dir = env, log_dir
        self.nodes = {role: NodeProcess(role, env, log_dir) for role in roles}
        self.retired: list[NodeProcess] = []  # kept alive: a log file is named by its object's id
        self.kills: list[str] = []
        self._killed = asyncio.Condition()

    def start(self) -> Fleet:
        for node in self.nodes.values():
            node.start()
        return self

    async def kill9(self, role: str) -> None:
        """SIGKILL the role's process (no drain, no goodbye) and start a fresh one in its place."""
        node = self.nodes[role]
        node.signal(signal.SIGKILL)
        assert await node.wait() == -signal.SIGKILL
        self.retired.append(node)
        self.nodes[role] = NodeProcess(role, self.env, self.log_dir).start()
        async with self._killed:
            self.kills.append(role)
            self._killed.notify_all()

    async def kill9_all(self) -> None:
        """SIGKILL every process at once (no drain, no goodbye), then start a fresh one per role."""
        for node in self.nodes.values():
            node.signal(signal.SIGKILL)
        for role, node in list(self.nodes.items()):
            assert await node.wait() == -signal.SIGKILL
            self.retired.append(node)
            self.kills.append(role)
        self.nodes = {role: NodeProcess(role, self.env, self.log_dir).start() for role in self.nodes}

    async def next_kill(self, seen: int) -> None:
        """Wait until more than ``seen`` kills have happened."""
        async with self._killed:
            await self._killed.wait_for(lambda: len(self.kills) > seen)

    async def started(self, timeout: float = 30.0) -> None:
        """Wait until every current process has its signal handlers in place (it logged its health
        endpoint), so a SIGTERM drains it instead of killing it mid-import."""
        deadline = time.monotonic() + timeout
        while not all(_STARTED in n.log() for n in self.nodes.values()):
            assert time.monotonic() < deadline, f"nodes not started within {timeout}s:\n{self.logs()}"
            await asyncio.sleep(0.1)

    def crashed(self) -> dict[str, int]:
        """Roles whose process exited by itself (a kill we did not send): role → exit code."""
        return {r: n.proc.returncode for r, n in self.nodes.items() if n.proc and n.proc.poll() is not None}

    async def terminate(self, roles: Iterable[str] | None = None, timeout: float = 30.0) -> dict[str, int]:
        """SIGTERM the nodes (default: all), wait for their drain; the exit codes by role."""
        chosen = {r: self.nodes[r] for r in (roles or self.nodes)}
        for node in chosen.values():
            if node.proc and node.proc.poll() is None:
                node.signal(signal.SIGTERM)
        return {role: await node.wait(timeout) for role, node in chosen.items()}

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def pids(self) -> dict[str, int]:
        return {r: n.proc.pid for r, n in self.nodes.items() if n.proc and n.proc.poll() is None}

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.log_dir.glob("*.log")))


class Activity:
    """Which worker roles have a step in flight right now, followed on the event stream, so a kill can
    be aimed at a worker mid-step rather than at an idle one."""

    def __init__(self, workers: Iterable[str]) -> None:
        self.running: dict[str, set[tuple[str, str, int]]] = {role: set() for role in workers}

    async def follow(self, bus: Bus) -> None:
        """Track steps until cancelled."""
        async with aclosing(bus.watch_events(from_start=False)) as stream:
            async for e in stream:
                if isinstance(e, StepStarted | StepCompleted | StepFailed) and e.role in self.running:
                    step = (e.goal_id, e.step_id, e.attempt)
                    if isinstance(e, StepStarted):
                        self.running[e.role].add(step)
                    else:
                        self.running[e.role].discard(step)

    def busy(self, role: str) -> bool:
        """A worker with a step in flight; any other role (planner, ledger) is always worth killing."""
        return role not in self.running or bool(self.running[role])


async def chaos(fleet: Fleet, stop: asyncio.Event, *, every: tuple[float, float], seed: int,
                activity: Activity | None = None, aim_for: float = 5.0) -> None:
    """Kill -9 (and restart) a node every ``every`` seconds until ``stop``: the roles in a fresh
    seeded random order per round, so each of them dies once per round. With ``activity``, a worker
    is killed once it has a step in flight (waiting up to ``aim_for`` seconds for one)."""
    rng = random.Random(seed)
    pool = list(fleet.nodes)
    while True:
        order = rng.sample(pool, len(pool))
        for role in order:
            try:
                await asyncio.wait_for(stop.wait(), rng.uniform(*every))
                return
            except TimeoutError:
                pass
            deadline = time.monotonic() + aim_for
            while activity is not None and not activity.busy(role) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # polling the tracked state: there is no event for "busy"
            await fleet.kill9(role)


async def stream_events(bus: Bus) -> list[Event]:
    """Every decodable message of the events stream, in order, up to its last sequence now."""
    info = await bus._js.stream_info(bus.topology.events_stream)
    last = info.state.last_seq
    events: list[Event] = []
    if not info.state.messages:
        return events
    sub = await bus._js.subscribe(bus.topology.events_filter(), stream=bus.topology.events_stream,
                                 ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL)
    try:
        async for msg in sub.messages:
            try:
                events.append((await bus.open(msg)).message())
            except ContractError:
                pass
            if msg.metadata.sequence.stream >= last:
                break
    finally:
        await sub.unsubscribe()
    return events


async def wait_terminal(bus: Bus, goal_ids: Iterable[str], timeout: float) -> dict[str, Event]:
    """The terminal event of each goal, from one watch of the whole stream."""
    waiting, ends = set(goal_ids), dict[str, Event]()

    async def watch() -> None:
        async with aclosing(bus.watch_events()) as stream:
            async for event in stream:
                if isinstance(event, TERMINAL) and event.goal_id in waiting:
                    ends[event.goal_id] = event
                    waiting.discard(event.goal_id)
                    if not waiting:
                        return

    try:
        await asyncio.wait_for(watch(), timeout)
    except TimeoutError:
        raise AssertionError(f"{len(waiting)} goal(s) did not end within {timeout:.0f}s:\n"
                             f"{await describe_goals(bus, sorted(waiting))}") from None
    return ends


async def steps_completed(bus: Bus, count: int, goal_id: str | None = None) -> None:
    """Wait until ``count`` steps have completed (of one goal, or of any)."""
    seen = 0
    async with aclosing(bus.watch_events(goal_id)) as stream:
        async for event in stream:
            seen += isinstance(event, StepCompleted)
            if seen >= count:
                return


async def describe_goals(bus: Bus, goal_ids: Iterable[str]) -> str:
    """Where each goal stands in its KV state: status and every step's status/attempt (for failures)."""
    goals = GoalStore(bus)
    lines = []
    for gid in goal_ids:
        state = await goals.get(gid)
        if state is None:
            lines.append(f"{gid}: no state")
            continue
        steps = ", ".join(f"{sid}={st.status}/{st.attempt}" for sid, st in state.steps.items())
        lines.append(f"{gid}: {state.status} v{state.plan_version} [{steps}]")
    return "\n".join(lines)


def check_applied_once(events: list[Event], goal_ids: Iterable[str]) -> None:
    """Nothing applied twice, nothing lost: per goal at most one ``step.completed`` per (step, attempt)
    and per step id across attempts, every step of its final plan completed, one ``goal.completed``."""
    goal_ids = set(goal_ids)
    done = Counter((e.goal_id, e.step_id) for e in events if isinstance(e, StepCompleted) and e.goal_id in goal_ids)
    twice = {k: n for k, n in done.items() if n > 1}
    assert not twice, f"steps completed more than once: {twice}"
    finals = Counter(e.goal_id for e in events if isinstance(e, GoalCompleted))
    plans: dict[str, GoalPlanned] = {}
    for e in events:
        newer = isinstance(e, GoalPlanned) and (e.goal_id not in plans or e.plan.version > plans[e.goal_id].plan.version)
        if newer and e.goal_id in goal_ids:
            plans[e.goal_id] = e  # type: ignore[assignment]
    for gid in goal_ids:
        assert finals[gid] == 1, f"goal {gid}: {finals[gid]} goal.completed events"
        assert gid in plans, f"goal {gid}: no goal.planned event"
        missing = [s.step_id for s in plans[gid].plan.steps if (gid, s.step_id) not in done]
        assert not missing, f"goal {gid}: planned steps without a step.completed: {missing}"


def rss_kb(pid: int) -> int:
    """Resident set size of a process (``VmRSS`` from /proc; psutil is not a dependency)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")
