"""Topology names, idempotent and race-safe provisioning, and what a node checks, against a real server."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path

import nats
import pytest
from nats.js import api

from mesh.bus import Bus, Topology, provision
from mesh.bus.topology import orchestrator_role
from mesh.config import MeshSettings, default_nodes_dir
from mesh.contracts import (
    GoalCancelled,
    NodeUp,
    RouteDecided,
    RouteDecision,
    Step,
    StepDispatched,
    StepStarted,
    Task,
)
from mesh.contracts.events import EventAddress
from mesh.embedded import EmbeddedNats
from mesh.errors import NodeSpecError, NoStreamForSubject, NotProvisioned, PublishError
from mesh.roles.spec import load_specs
from tests.ledgerkit import Eventually


def test_names_follow_the_prefix() -> None:
    t = Topology.from_settings(MeshSettings(subject_prefix="acme", nats_url=None))
    assert (t.goals_stream, t.tasks_stream, t.events_stream, t.dlq_stream) == (
        "ACME_GOALS", "ACME_TASKS", "ACME_EVENTS", "ACME_DLQ")
    assert (t.kv_goals, t.kv_nodes, t.obj_artifacts, t.obj_models) == (
        "acme_goals", "acme_nodes", "acme_artifacts", "acme_models")
    assert t.goal_subject() == "acme.goals"
    assert t.task_subject("coder") == "acme.task.coder"
    assert t.event_subject("g1", "coder", "step.completed") == "acme.event.g1.coder.step.completed"
    assert t.event_address("acme.event.g1.coder.step.completed") == EventAddress("g1", "coder", "step.completed")
    assert t.event_address("acme.event.g1.step.completed") == EventAddress("g1", None, "step.completed")  # schema 1
    assert t.event_address("mesh.event.g1.coder.step.completed") is None  # another prefix
    assert t.event_address("acme.event.g1.a.b.step.completed") is None
    assert t.events_filter() == "acme.event.>" and t.events_filter("g1") == "acme.event.g1.>"
    assert t.dlq_subject("coder") == "acme.dlq.coder"
    assert t.consumer_name("coder") == "role-coder"
    assert (t.stream_for("planner"), t.filter_for("planner")) == ("ACME_GOALS", "acme.goals")
    assert (t.stream_for("coder"), t.filter_for("coder")) == ("ACME_TASKS", "acme.task.coder")


def test_forged_tells_what_a_subjects_role_cannot_have_emitted() -> None:
    t = Topology()
    started = StepStarted(goal_id="g1", step_id="s1", role="coder")
    assert t.forged("mesh.event.g1.coder.step.started", started) is None
    assert t.forged("mesh.event.g1.step.started", started) is None  # schema 1: no role to check
    assert "only coder emits it" in (t.forged("mesh.event.g1.reviewer.step.started", started) or "")
    assert "does not address" in (t.forged("mesh.event.g2.coder.step.started", started) or "")
    assert "does not address" in (t.forged("mesh.event.g1.coder.step.failed", started) or "")
    dispatched = StepDispatched(goal_id="g1", step_id="s1", role="coder", task_id="g1.s1.1")
    assert t.forged("mesh.event.g1.planner.step.dispatched", dispatched) is None
    assert "only planner emits it" in (t.forged("mesh.event.g1.coder.step.dispatched", dispatched) or "")
    cancelled = GoalCancelled(goal_id="g1")  # any type no worker emits (approvals too) is the planner's
    assert "only planner emits it" in (t.forged("mesh.event.g1.coder.goal.cancelled", cancelled) or "")
    assert t.forged("mesh.event._system.ledger.node.up", NodeUp(goal_id="_system", role="ledger")) is None
    assert t.forged("mesh.event.g1.planner.route.decided", RouteDecided(
        goal_id="g1", step_id="plan", role="planner", decision=RouteDecision(tier="edge"))) is None


def test_the_role_that_reads_goals_is_the_orchestrator_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Renaming the planner (file and role) renames its consumers; no name is fixed in the topology."""
    nodes = tmp_path / "nodes"
    shutil.copytree(default_nodes_dir(), nodes)
    (nodes / "conductor.toml").write_text((nodes / "planner.toml").read_text().replace('role = "planner"',
                                                                                      'role = "conductor"'))
    (nodes / "planner.toml").unlink()
    monkeypatch.setenv("MESH_NODES_DIR", str(nodes))
    t = Topology()
    assert t.goal_role == "conductor" and "conductor" not in t.task_roles
    assert (t.stream_for("conductor"), t.filter_for("conductor")) == ("MESH_GOALS", "mesh.goals")
    assert (t.outcomes_consumer, t.control_consumer) == ("conductor-outcomes", "conductor-control")
    assert [stream for stream, _ in t.consumer_configs("conductor")] == ["MESH_GOALS", "MESH_EVENTS", "MESH_CONTROL"]
    (nodes / "planner.toml").write_text((nodes / "conductor.toml").read_text().replace('role = "conductor"',
                                                                                      'role = "planner"'))
    with pytest.raises(NodeSpecError, match="more than one role spec of kind orchestrator: conductor, planner"):
        orchestrator_role(nodes)
    with pytest.raises(NodeSpecError, match="only one role may plan"):
        load_specs(nodes)


async def _snapshot(js: nats.js.JetStreamContext) -> dict[str, object]:
    """Creation times and message counts: a no-op re-provision changes none of them."""
    streams = {s.config.name: (s.created, s.state.messages) for s in await js.streams_info()}
    consumers = {c.name: c.created for name in ("MESH_GOALS", "MESH_TASKS", "MESH_EVENTS")
                 for c in await js.consumers_info(name)}
    return {"streams": streams, "consumers": consumers}


async def test_provisioning_twice_is_a_no_op(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    topo = Topology()
    try:
        await provision(js, topo, ["planner", "coder", "reviewer"])
        await js.publish("mesh.task.coder", b"pending work")
        before = await _snapshot(js)
        await provision(js, topo, ["planner", "coder", "reviewer"])
        assert await _snapshot(js) == before
        assert set(before["streams"]) >= {  # type: ignore[call-overload]
            "MESH_GOALS", "MESH_TASKS", "MESH_EVENTS", "MESH_DLQ", "KV_mesh_goals", "KV_mesh_nodes",
            "OBJ_mesh_artifacts", "OBJ_mesh_models"}
        assert set(before["consumers"]) == {  # type: ignore[call-overload]
            "role-planner", "planner-outcomes", "role-coder", "role-reviewer"}
        goals = await js.consumer_info("MESH_GOALS", "role-planner")
        assert goals.config.filter_subject == "mesh.goals"
        outcomes = await js.consumer_info("MESH_EVENTS", topo.outcomes_consumer)
        assert outcomes.config.filter_subjects == ["mesh.event.*.*.step.completed", "mesh.event.*.*.step.failed"]
        coder = await js.consumer_info("MESH_TASKS", "role-coder")
        assert coder.config.filter_subject == "mesh.task.coder"
        assert coder.config.ack_policy == api.AckPolicy.EXPLICIT
        assert (coder.config.ack_wait, coder.config.max_deliver) == (topo.ack_wait, topo.max_deliver)
        assert coder.num_pending == 1  # the pending task survived the second provisioning
        nodes = await js.stream_info("KV_mesh_nodes")
        assert nodes.config.max_age == topo.nodes_ttl
    finally:
        await nc.close()


async def test_concurrent_provisioners_both_succeed(nats_url: str) -> None:
    conns = [await nats.connect(nats_url) for _ in range(4)]
    try:
        topo = Topology(task_roles=("coder", "r0", "r1", "r2", "r3"))
        await asyncio.gather(*(provision(nc.jetstream(), topo, ["planner", "coder", f"r{i}"])
                               for i, nc in enumerate(conns)))
        consumers = {c.name for c in await conns[0].jetstream().consumers_info("MESH_TASKS")}
        assert consumers == {"role-coder", "role-r0", "role-r1", "role-r2", "role-r3"}
    finally:
        for nc in conns:
            await nc.close()


async def test_changed_topology_updates_in_place(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        await provision(js, Topology(), ["coder"])
        await js.publish("mesh.event.g1.goal.submitted", b"kept")
        await provision(js, Topology(ack_wait=7.0, duplicate_window=30.0), ["coder"])
        events = await js.stream_info("MESH_EVENTS")
        assert events.config.duplicate_window == 30.0
        assert events.state.messages == 1
        assert (await js.consumer_info("MESH_TASKS", "role-coder")).config.ack_wait == 7.0
    finally:
        await nc.close()


async def test_a_goals_bucket_of_an_older_topology_is_given_direct_gets(bare_nats: EmbeddedNats) -> None:
    """The goals bucket allows direct gets (the workers' step check reads by them); one created before
    that is updated in place, its goals kept, and read back both ways."""
    nats_url = bare_nats.url
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        old = await js.create_key_value(api.KeyValueConfig(bucket="mesh_goals", history=8,
                                                           storage=api.StorageType.FILE))
        await old.put("g1", b"state")
        assert "updated KV bucket mesh_goals (direct gets allowed)" in await provision(js, Topology(), ["coder"])
        goals = await js.stream_info("KV_mesh_goals")
        assert goals.config.allow_direct and goals.state.messages == 1
        assert await provision(js, Topology(), ["coder"]) == []  # and again: a no-op
        assert (await js.stream_info("KV_mesh_goals")).created == goals.created
    finally:
        await nc.close()
    async with await Bus.connect(MeshSettings(nats_url=nats_url), check=False) as bus:
        for direct in (True, False):
            entry = await bus.kv_get("mesh_goals", "g1", direct=direct)
            assert entry is not None and entry.value == b"state"
            assert await bus.kv_get("mesh_goals", "g2", direct=direct) is None


async def test_a_node_against_a_goals_bucket_without_direct_gets_asks_for_provisioning(
        bare_nats: EmbeddedNats) -> None:
    """A server provisioned by an older version: a node refuses to start (its step checks would find no
    responder) and names the fix."""
    nc = await nats.connect(bare_nats.url)
    js = nc.jetstream()
    try:
        await provision(js, Topology())
        info = await js.stream_info("KV_mesh_goals")
        await js.update_stream(dataclasses.replace(info.config, allow_direct=False))
        with pytest.raises(NotProvisioned, match="bucket mesh_goals does not allow direct gets — run `mesh provision`"):
            await Bus.connect(MeshSettings(nats_url=bare_nats.url), roles=["coder"])
        await provision(js, Topology())
        async with await Bus.connect(MeshSettings(nats_url=bare_nats.url), roles=["coder"]):
            pass
    finally:
        await nc.close()


async def test_events_expire_after_the_configured_age(nats_url: str, eventually: Eventually) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        await provision(js, Topology(), ["coder"])
        await js.publish("mesh.event.g1.goal.submitted", b"kept while the stream keeps everything")
        await provision(js, Topology(events_max_age=1.0), ["coder"])
        events = await js.stream_info("MESH_EVENTS")
        assert (events.config.max_age, events.config.duplicate_window) == (1.0, 1.0)

        async def expired() -> bool:
            return (await js.stream_info("MESH_EVENTS")).state.messages == 0

        await eventually(expired, timeout=10)
    finally:
        await nc.close()


async def test_the_tasks_stream_takes_the_worker_roles_only(bus: Bus) -> None:
    """A task for a role no worker serves (the planner, the ledger, a typo) gets no stream and a clear
    error at the publisher, instead of waiting in a work-queue stream that nobody consumes."""
    workers = sorted(r for r, s in load_specs().items() if s.kind == "worker")
    assert sorted(bus.topology.task_roles) == workers and "planner" not in workers and "ledger" not in workers
    info = await bus._js.stream_info(bus.topology.tasks_stream)
    assert sorted(info.config.subjects or []) == [f"mesh.task.{r}" for r in workers]
    for role in ("planner", "ledger", "nosuchrole"):
        with pytest.raises(NoStreamForSubject, match=f"mesh.task.{role}: no stream takes this subject"):
            await bus.publish_raw(bus.topology.task_subject(role), b"stray")
        task = Task(task_id=Task.make_id("g1", "s1", 1), goal_id="g1",
                    step=Step(step_id="s1", role=role, instruction="do it"))
        with pytest.raises(NoStreamForSubject, match=f"no worker serves role '{role}'") as caught:
            await bus.dispatch(task)
        assert caught.value.retryable is False
    assert (await bus._js.stream_info(bus.topology.tasks_stream)).state.messages == 0
    await bus.dispatch(Task(task_id=Task.make_id("g1", "s1", 1), goal_id="g1",
                            step=Step(step_id="s1", role="coder", instruction="do it")))


async def test_no_answer_for_a_subject_the_topology_streams_is_retryable(bus: Bus) -> None:
    """JetStream answers "no responders" also while a clustered stream has no leader (a member lost):
    a task for a worker role then must be retried, not given up as if nobody served the role (CI once
    failed a goal that way when one cluster member was killed mid-run)."""
    await bus._js.delete_stream(bus.topology.tasks_stream)  # what a publisher sees without a leader
    task = Task(task_id=Task.make_id("g1", "s1", 1), goal_id="g1",
                step=Step(step_id="s1", role="coder", instruction="do it"))
    with pytest.raises(PublishError, match="JetStream did not answer") as caught:
        await bus.dispatch(task)
    assert not isinstance(caught.value, NoStreamForSubject) and caught.value.retryable is True
    assert bus.topology.takes("mesh.event.g1.step.completed") and not bus.topology.takes("mesh.task.planner")


async def test_provisioning_replaces_the_catch_all_subject_and_drops_stray_consumers(bare_nats: EmbeddedNats) -> None:
    """A server provisioned by an older release (``mesh.task.>``, a ``role-ledger`` consumer that nothing
    read) is brought to the worker roles' subjects, and the ledger gets no consumer on the tasks stream."""
    nc = await nats.connect(bare_nats.url)
    js = nc.jetstream()
    try:
        await js.add_stream(api.StreamConfig(name="MESH_TASKS", subjects=["mesh.task.>"],
                                             retention=api.RetentionPolicy.WORK_QUEUE))
        await js.add_consumer("MESH_TASKS", api.ConsumerConfig(
            durable_name="role-ledger", filter_subject="mesh.task.ledger", ack_policy=api.AckPolicy.EXPLICIT))
        topo = Topology(task_roles=("coder", "tester"))
        assert topo.consumer_configs("ledger") == []
        changes = await provision(js, topo, ["planner", "coder", "ledger"])  # without prune: no deletes
        assert {c.name for c in await js.consumers_info("MESH_TASKS")} == {"role-coder", "role-ledger"}
        assert "updated stream MESH_TASKS (subjects: mesh.task.coder, mesh.task.tester)" in changes
        assert "created consumer role-coder on MESH_TASKS" in changes
        changes = await provision(js, topo, ["planner", "coder", "ledger"], prune=True)  # `mesh provision`
        info = await js.stream_info("MESH_TASKS")
        assert info.config.subjects == ["mesh.task.coder", "mesh.task.tester"]
        assert {c.name for c in await js.consumers_info("MESH_TASKS")} == {"role-coder"}
        assert changes == ["deleted consumer role-ledger on MESH_TASKS: ledger is not a worker role"]
        assert await provision(js, topo, ["planner", "coder"], prune=True) == []  # nothing left to change
    finally:
        await nc.close()


async def test_a_node_against_an_unprovisioned_server_fails_with_the_reason(bare_nats: EmbeddedNats) -> None:
    """Nodes no longer create streams: against a bare server a role's connect fails fast, naming the first
    missing stream and the command that fixes it; after provisioning for other workers, it names the role."""
    settings = MeshSettings(nats_url=bare_nats.url, connect_timeout=2.0)
    with pytest.raises(NotProvisioned, match="mesh not provisioned: stream MESH_GOALS missing — run `mesh provision`"):
        await Bus.connect(settings, roles=["coder"])
    nc = await nats.connect(bare_nats.url)
    try:
        await provision(nc.jetstream(), Topology(task_roles=("tester",)))
        with pytest.raises(NotProvisioned, match="role 'coder': stream MESH_TASKS does not take mesh.task.coder"):
            await Bus.connect(settings, roles=["coder"])
        assert [c.name for c in await nc.jetstream().consumers_info("MESH_TASKS")] == []  # it created nothing
        await provision(nc.jetstream(), Topology())
        async with await Bus.connect(settings, roles=["coder"]):  # its own consumer is all it creates
            assert [c.name for c in await nc.jetstream().consumers_info("MESH_TASKS")] == ["role-coder"]
    finally:
        await nc.close()
