"""Server faults: the nats-server (file storage) is killed and restarted mid-run, and one member of a
3-node cluster (R3 streams) is stopped mid-run. Every goal completes, each step exactly once.

And the crash window those faults open in the orchestrator, pinned down deterministically: a goal-state
write that landed while its side effects (dispatches, the final event) did not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from mesh.backends.tiers import load_tiers
from mesh.bus import Bus, Delivery
from mesh.config import MeshSettings
from mesh.contracts import Goal, GoalCompleted, Plan, Step, StepCompleted, Usage
from mesh.embedded import EmbeddedCluster, EmbeddedNats
from mesh.metrics import Metrics
from mesh.roles.calls import ModelCaller
from mesh.roles.goalstate import GoalState
from mesh.roles.goalstore import GoalStore
from mesh.roles.orchestrator import Orchestrator
from mesh.router.policy import RulePolicy
from tests.meshkit import in_process_mesh, role_specs
from tests.reliability.kit import LONG, check_applied_once, steps_completed, stream_events, wait_terminal

pytestmark = pytest.mark.timeout(240)

GOALS = 10 if LONG else 4
DOWN_SECONDS = 1.5  # how long the server stays dead: the fault's length, not a synchronisation


def _mesh_settings(settings: MeshSettings, **update: object) -> MeshSettings:
    # 100 ms per model call: the goals are mid-flight when the fault lands.
    return settings.model_copy(update={"sim_latency_ms": 100.0, "health_port": 0, "health_host": "127.0.0.1",
                                       "drain_seconds": 5.0, **update})


async def _through_a_fault(settings: MeshSettings, fault: Callable[[Bus], Awaitable[str]]) -> None:
    """GOALS goals on an in-process mesh; once GOALS steps have completed, ``fault`` strikes (and says what
    it did). Every goal must complete, each step once."""
    fast = _mesh_settings(settings)
    goals = [Goal(brief=f"Fault goal {i}: build me a login system") for i in range(GOALS)]
    async with await Bus.connect(fast, name="test") as bus, in_process_mesh(fast):
        for goal in goals:
            await bus.submit_goal(goal)
        await asyncio.wait_for(steps_completed(bus, GOALS), 60)
        what = await fault(bus)
        started = time.monotonic()
        ends = await wait_terminal(bus, [g.goal_id for g in goals], timeout=150)
        elapsed = time.monotonic() - started
        assert all(isinstance(e, GoalCompleted) for e in ends.values()), ends
        check_applied_once(await stream_events(bus), [g.goal_id for g in goals])
    print(f"figure: {what}: {GOALS} goals completed, the last {elapsed:.1f} s after it, each step once")


async def test_nats_server_killed_and_restarted_mid_run(settings: MeshSettings, nats_server: EmbeddedNats) -> None:
    async def restart(bus: Bus) -> str:
        nats_server.kill()  # SIGKILL: no flush, no goodbye; the file store is what survives
        await asyncio.sleep(DOWN_SECONDS)
        await nats_server.start()
        return "nats-server killed -9 mid-run and restarted on its file store"

    await _through_a_fault(settings, restart)


async def test_losing_one_cluster_member_mid_run(nats_cluster: EmbeddedCluster, tmp_path: Path) -> None:
    settings = MeshSettings(nats_url=nats_cluster.url, replicas=3, data_dir=tmp_path / "mesh", ack_wait=2.0,
                            nak_delay=0.1, reconnect_wait=0.1, connect_timeout=2.0)

    async def lose_the_leader(bus: Bus) -> str:
        info = await bus._js.stream_info(bus.topology.tasks_stream)
        assert info.config.num_replicas == 3 and info.cluster is not None
        # The member leading the task stream: its loss forces an election mid-dispatch.
        victim = next(s for s in nats_cluster.servers if s.server_name == info.cluster.leader)
        await victim.stop()
        return f"3-node cluster (R3), the task stream's leader {info.cluster.leader} stopped mid-run"

    await _through_a_fault(settings, lose_the_leader)


# --- the crash window between a goal-state write and its side effects ---------------------------------


@pytest.fixture
async def orchestrator(settings: MeshSettings) -> AsyncIterator[Orchestrator]:
    specs = role_specs()
    async with await Bus.connect(settings, name="planner-test", role="planner") as bus:
        caller = ModelCaller(bus, load_tiers(settings), RulePolicy(), "planner-test", Metrics("planner"))
        try:
            yield Orchestrator(bus, specs["planner"], specs, caller, GoalStore(bus), "planner-test")
        finally:
            await caller.gateway.aclose()


async def _outcome_delivery(bus: Bus, event: StepCompleted, attempt: int) -> Delivery:
    """``event``, emitted by a node of the step's role, as the planner's consumer hands it over, on its
    ``attempt``-th delivery."""
    async with await Bus.connect(bus.settings, name="worker-test", role=event.role, check=False) as worker:
        await worker.emit(event)
    sub = await bus._js.pull_subscribe(bus.topology.event_subject(event.goal_id, event.role, event.type),
                                      stream=bus.topology.events_stream)
    try:
        msg = (await sub.fetch(1, timeout=5))[0]
    finally:
        await sub.unsubscribe()
    return Delivery(envelope=await bus.open(msg), msg=msg, attempt=attempt, subject=msg.subject,
                    max_deliver=bus.topology.max_deliver)


async def _tasks_for(bus: Bus, role: str) -> list[str]:
    info = await bus._js.stream_info(bus.topology.tasks_stream, subjects_filter=bus.topology.task_subject(role))
    return list((info.state.subjects or {}).keys())


@pytest.mark.parametrize("attempt", [2, 1], ids=["redelivered", "redelivered-after-a-server-crash"])
async def test_a_redelivered_outcome_dispatches_what_the_dead_delivery_did_not(
        bus: Bus, orchestrator: Orchestrator, attempt: int) -> None:
    """The first delivery of "research done" recorded it (CAS) and died before dispatching the coder
    step. Its redelivery finds the transition applied; it must still dispatch, or the goal waits forever
    (the sweep only re-drives steps that were dispatched). A server that crashed may have lost the
    delivery count: the redelivery then says it is the first."""
    goal = Goal(brief="Build me a login system")
    plan = Plan(goal_id=goal.goal_id, steps=[
        Step(step_id="research", role="researcher", instruction="look around"),
        Step(step_id="implement", role="coder", instruction="write it", depends_on=["research"])])
    state = GoalState(goal=goal)
    state.apply_plan(plan)
    state.mark_dispatched("research")
    goals = orchestrator.goals
    assert await goals.create(state)
    await goals.mutate(goal.goal_id, lambda s: s.complete("research", 1, [], Usage(), None, None, "done"))
    done = StepCompleted(event_id=f"{goal.goal_id}.research.1.completed", goal_id=goal.goal_id,
                         step_id="research", role="researcher", attempt=1)
    assert await _tasks_for(bus, "coder") == []

    await orchestrator.on_step_event(await _outcome_delivery(bus, done, attempt=attempt))
    assert await _tasks_for(bus, "coder") == [bus.topology.task_subject("coder")]
    after = await goals.get(goal.goal_id)
    assert after is not None and after.steps["implement"].status == "dispatched"
    # Once more (a duplicate): the dispatch is not repeated — the task id dedupes it.
    await orchestrator.on_step_event(await _outcome_delivery(bus, done, attempt=attempt + 1))
    info = await bus._js.stream_info(bus.topology.tasks_stream)
    assert info.state.messages == 1


async def test_a_redelivered_outcome_of_a_finished_goal_announces_its_end(
        bus: Bus, orchestrator: Orchestrator) -> None:
    """The delivery that finished the goal wrote "completed" and died before goal.completed went out."""
    goal = Goal(brief="Build me a login system")
    state = GoalState(goal=goal)
    state.apply_plan(Plan(goal_id=goal.goal_id, steps=[Step(step_id="only", role="synthesizer", instruction="sum")]))
    state.mark_dispatched("only")
    result = await bus.put_blob(b"the final answer", media_type="text/markdown", name="only/synthesis")
    state.complete("only", 1, [result], Usage(), None, None, "done")
    state.result = result
    state.finish("completed")
    assert await orchestrator.goals.create(state)
    done = StepCompleted(goal_id=goal.goal_id, step_id="only", role="synthesizer", attempt=1, outputs=[result])

    ends = asyncio.create_task(wait_terminal(bus, [goal.goal_id], timeout=10))
    await orchestrator.on_step_event(await _outcome_delivery(bus, done, attempt=2))
    end = (await ends)[goal.goal_id]
    assert isinstance(end, GoalCompleted) and end.result == result
