"""Per-role NATS users against a real nats-server running the generated authorization config:
what a role needs works, what it does not need is refused by the server."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path

import nats
import pytest
import yaml
from nats.aio.client import Client
from nats.js import api

from mesh.backends.tiers import load_tiers
from mesh.bus import Bus, PullConsumer
from mesh.bus.topology import Topology
from mesh.config import MeshSettings
from mesh.contracts import ArtifactRef, Goal, GoalCompleted, NodeUp, Plan, Step, StepCompleted
from mesh.embedded import EmbeddedNats
from mesh.bus.refusals import Refusals
from mesh.client import MeshClient
from mesh.errors import BusError, ConfigError, PermissionDenied, ProvisioningError, PublishError, retryable
from mesh.metrics import Metrics
from mesh.roles.calls import ModelCaller
from mesh.roles.goalstate import GoalState
from mesh.roles.goalstore import GoalStore
from mesh.roles.orchestrator import Orchestrator
from mesh.roles.spec import load_specs
from mesh.router.policy import RulePolicy
from mesh.security import Credential, Generated, PermissionSet, generate

Eventually = Callable[..., Awaitable[None]]
FAST_BCRYPT = 4  # the lowest bcrypt cost: the config is the same, only each connect's check is cheaper
API_TIMEOUT = 5.0  # nats-py's JetStream API timeout (the bus keeps it): what a refused request would wait out


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    users = PermissionSet(Topology(), load_specs()).users()
    return generate(tmp_path_factory.mktemp("security") / "out", users, cost=FAST_BCRYPT)


def cred(generated: Generated, user: str) -> Credential:
    return next(c for c in generated.credentials if c.user == user)


@pytest.fixture
async def secured(tmp_path: Path, generated: Generated) -> AsyncIterator[EmbeddedNats]:
    """A nats-server whose only configuration is the generated authorization, topology provisioned by admin."""
    conf = tmp_path / "nats.conf"
    (tmp_path / "auth.conf").write_text(generated.auth_conf.read_text())  # includes are relative
    conf.write_text('include "auth.conf"\n')
    async with EmbeddedNats(tmp_path / "nats", extra_args=["-c", str(conf)]) as server:
        async with await Bus.connect(settings_for(server.url, cred(generated, "admin")), check=False) as admin:
            await admin.provision(load_specs())  # `mesh provision`
        yield server


def settings_for(url: str, c: Credential) -> MeshSettings:
    return MeshSettings(nats_url=url, nats_user=c.user, nats_password=c.password, nats_inbox_prefix=c.inbox_prefix,
                        connect_timeout=2.0)


class Session:
    """A raw client that records the errors the server sends (permission violations arrive that way)."""

    def __init__(self) -> None:
        self.nc = Client()
        self.errors: list[str] = []
        self.error_seen = asyncio.Event()

    async def connect(self, url: str, c: Credential) -> Session:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))
            self.error_seen.set()

        await self.nc.connect(url, user=c.user, password=c.password, inbox_prefix=c.inbox_prefix,
                              error_cb=on_error, allow_reconnect=False)
        return self

    async def refused(self, timeout: float = 5.0) -> str:
        await asyncio.wait_for(self.error_seen.wait(), timeout)
        return self.errors[-1].lower()


@pytest.fixture
async def session(secured: EmbeddedNats) -> AsyncIterator[Session]:
    s = Session()
    yield s
    if not s.nc.is_closed:
        await s.nc.close()


# --- derivation ----------------------------------------------------------------------------------


def test_each_role_publishes_events_only_under_its_own_role() -> None:
    specs = load_specs()
    perms = PermissionSet(Topology(), specs)
    for role, spec in specs.items():
        events = [s for s in perms.role(role).publish if s.startswith("mesh.event.")]
        assert events and all(s.startswith(f"mesh.event.*.{role}.") for s in events), (role, events)
        if spec.kind == "orchestrator":  # every type, today's and tomorrow's (approvals …), under its role only
            assert events == [f"mesh.event.*.{role}.>"]
        else:  # never a goal-level event or a dispatch
            assert not any(".goal." in s or s.endswith("step.dispatched") for s in events), (role, events)
    for user in ("operator", "gateway", "observer"):
        assert not any(s.startswith("mesh.event.") for s in getattr(perms, user)().publish), user


def test_permissions_follow_the_topology_prefix() -> None:
    perms = PermissionSet(Topology(prefix="acme"), load_specs()).role("coder")
    assert "$JS.API.CONSUMER.MSG.NEXT.ACME_TASKS.role-coder" in perms.publish
    assert all("mesh" not in s.lower() for s in perms.publish + perms.subscribe)


def test_planner_publishes_tasks_only_to_worker_roles() -> None:
    specs = load_specs()
    perms = PermissionSet(Topology(), specs).role("planner")
    tasks = sorted(s for s in perms.publish if s.startswith("mesh.task."))
    assert tasks == sorted(f"mesh.task.{r}" for r, s in specs.items() if s.kind == "worker")


# --- generated files -----------------------------------------------------------------------------


def test_generated_files_are_private_and_hold_no_plain_password(generated: Generated) -> None:
    conf = generated.auth_conf.read_text()
    for c in generated.credentials:
        assert c.password not in conf
        assert len(c.password) >= 40
        env = generated.env_file(c.user)
        assert stat.S_IMODE(env.stat().st_mode) == 0o600
        assert f"MESH_NATS_PASSWORD={c.password}\n" in env.read_text()
        assert c.password not in repr(c)
    assert stat.S_IMODE(generated.auth_conf.stat().st_mode) == 0o600
    assert stat.S_IMODE((generated.out / "credentials").stat().st_mode) == 0o700
    assert conf.count('"$2a$04$') == len(generated.credentials)


def test_secrets_yaml_carries_the_config_and_each_users_env(generated: Generated) -> None:
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all((generated.out / "secrets.yaml").read_text())}
    assert base64.b64decode(docs["nats-auth"]["data"]["auth.conf"]).decode() == generated.auth_conf.read_text()
    for c in generated.credentials:
        data = {k: base64.b64decode(v).decode() for k, v in docs[f"mesh-nats-{c.user}"]["data"].items()}
        assert data == c.env()
        assert docs[f"mesh-nats-{c.user}"]["metadata"]["namespace"] == "mesh"


def test_gen_refuses_to_overwrite_without_force(generated: Generated) -> None:
    with pytest.raises(ConfigError, match="--force"):
        generate(generated.out, {"x": None})


# --- the server enforces it ----------------------------------------------------------------------


async def test_every_user_connects_and_a_wrong_password_is_refused(secured: EmbeddedNats,
                                                                   generated: Generated) -> None:
    for c in generated.credentials:
        nc = await nats.connect(secured.url, user=c.user, password=c.password, allow_reconnect=False)
        await nc.close()
    with pytest.raises(Exception, match="(?i)authorization"):
        await nats.connect(secured.url, user="coder", password="wrong", allow_reconnect=False, max_reconnect_attempts=0)


async def test_a_role_cannot_publish_to_another_roles_task_subject(secured: EmbeddedNats, generated: Generated,
                                                                   session: Session) -> None:
    await session.connect(secured.url, cred(generated, "coder"))
    js = session.nc.jetstream(timeout=1.0)
    with pytest.raises(nats.errors.TimeoutError):
        await js.publish("mesh.task.researcher", b"forged")
    assert 'permissions violation for publish to "mesh.task.researcher"' in await session.refused()
    # the planner may: that is its job
    async with await Bus.connect(settings_for(secured.url, cred(generated, "planner")), check=False) as bus:
        ack = await bus.publish_raw("mesh.task.researcher", b"x")
        assert ack.stream == "MESH_TASKS"


async def test_a_role_cannot_pull_or_ack_another_roles_tasks(secured: EmbeddedNats, generated: Generated,
                                                             session: Session) -> None:
    await session.connect(secured.url, cred(generated, "coder"))
    await session.nc.publish("$JS.API.CONSUMER.MSG.NEXT.MESH_TASKS.role-researcher", b'{"batch": 1}',
                             reply=session.nc.new_inbox())
    assert "permissions violation for publish" in await session.refused()
    assert "role-researcher" in session.errors[-1]


async def test_a_role_cannot_subscribe_to_what_it_does_not_need(secured: EmbeddedNats, generated: Generated,
                                                                session: Session) -> None:
    await session.connect(secured.url, cred(generated, "coder"))
    await session.nc.subscribe("_INBOX_researcher.>")  # another role's replies and pull deliveries
    assert 'permissions violation for subscription to "_inbox_researcher.>"' in await session.refused()
    session.error_seen.clear()
    await session.nc.subscribe("mesh.goals")
    assert 'subscription to "mesh.goals"' in await session.refused()


async def test_a_worker_cannot_forge_goal_events(secured: EmbeddedNats, generated: Generated) -> None:
    async with await Bus.connect(settings_for(secured.url, cred(generated, "coder")), check=False) as bus:
        await bus.publish_raw("mesh.event.g1.coder.step.started", b"x")  # its own kind of event: allowed
        bus._js._timeout = 1.0
        with pytest.raises(PublishError):
            await bus.publish_raw("mesh.event.g1.coder.goal.completed", b"forged")
        with pytest.raises(PublishError):
            await bus.publish_raw("mesh.event.g1.step.completed", b"a schema-1 subject names no role")


# --- acceptance: the coder's credentials cannot forge another role's outcome ----------------------


def _reviewed_goal() -> GoalState:
    """A goal whose review step (role reviewer) is dispatched, attempt 1, and awaits its outcome."""
    goal = Goal(brief="review me")
    state = GoalState(goal=goal)
    state.apply_plan(Plan(goal_id=goal.goal_id, steps=[
        Step(step_id="review", role="reviewer", instruction="review it"),
        Step(step_id="sum", role="synthesizer", instruction="sum up", depends_on=["review"])]))
    state.mark_dispatched("review")
    return state


def _review_done(state: GoalState) -> StepCompleted:
    return StepCompleted(event_id=f"{state.goal.goal_id}.review.1.completed", goal_id=state.goal.goal_id,
                         step_id="review", role="reviewer", attempt=1, verdict="approve")


async def test_the_coder_cannot_publish_a_reviewer_outcome_under_the_reviewers_role(
        secured: EmbeddedNats, generated: Generated) -> None:
    """The server refuses it: the coder may publish events only under its own role token."""
    async with await Bus.connect(settings_for(secured.url, cred(generated, "coder")), check=False,
                                 role="reviewer") as impostor:  # claims the reviewer's role in the subject
        impostor._js._timeout = 1.0
        with pytest.raises(PublishError):
            await impostor.emit(_review_done(_reviewed_goal()))
    async with await Bus.connect(settings_for(secured.url, cred(generated, "reviewer")), check=False,
                                 role="reviewer") as reviewer:  # the same event from the reviewer is stored
        await reviewer.emit(_review_done(_reviewed_goal()))


async def test_the_planner_refuses_a_reviewer_outcome_the_coder_emits_as_itself(
        secured: EmbeddedNats, generated: Generated, eventually: Eventually) -> None:
    """Under its own role the server lets the coder publish step.completed; the planner's outcome consumer
    refuses it (the step was dispatched to the reviewer), counts it and changes nothing — and then
    accepts the reviewer's own outcome."""
    state = _reviewed_goal()
    specs = load_specs()
    planner_settings = settings_for(secured.url, cred(generated, "planner"))
    async with await Bus.connect(planner_settings, check=False, role="planner") as bus:
        metrics = Metrics("planner")
        caller = ModelCaller(bus, load_tiers(planner_settings), RulePolicy(), "planner-test", metrics)
        orchestrator = Orchestrator(bus, specs["planner"], specs, caller, GoalStore(bus), "planner-test")
        outcomes = PullConsumer(bus, stream=bus.topology.events_stream, durable=bus.topology.outcomes_consumer,
                                handler=orchestrator.on_step_event, dlq_subject=bus.topology.dlq_subject("planner"))
        assert await orchestrator.goals.create(state)

        def refused() -> float:
            return metrics.registry.get_sample_value("mesh_outcomes_refused_total", {"reason": "role"}) or 0.0

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(outcomes.run())
                async with await Bus.connect(settings_for(secured.url, cred(generated, "coder")), check=False,
                                             role="coder") as coder:
                    await coder.emit(_review_done(state))
                await eventually(lambda: refused() == 1.0, message="the forged outcome refused and counted")
                after = await orchestrator.goals.get(state.goal.goal_id)
                assert after is not None and after.steps["review"].status == "dispatched"
                assert after.steps["sum"].status == "pending"
                async with await Bus.connect(settings_for(secured.url, cred(generated, "reviewer")),
                                             check=False, role="reviewer") as reviewer:
                    await reviewer.emit(_review_done(state).model_copy(update={"event_id": "genuine"}))

                async def accepted() -> bool:
                    now = await orchestrator.goals.get(state.goal.goal_id)
                    return now is not None and now.steps["review"].status == "completed"

                await eventually(accepted, message="the reviewer's own outcome recorded")
                outcomes.stop()
        finally:
            await caller.gateway.aclose()
    assert refused() == 1.0


async def test_the_coder_cannot_publish_goal_completed(secured: EmbeddedNats, generated: Generated) -> None:
    """Neither under its own role nor under the planner's: goal-level events are the planner's alone."""
    event = GoalCompleted(goal_id="g1", result=ArtifactRef(digest="0" * 64, size=0))
    for claimed in ("coder", "planner"):
        async with await Bus.connect(settings_for(secured.url, cred(generated, "coder")), check=False,
                                     role=claimed) as coder:
            coder._js._timeout = 1.0
            with pytest.raises(PublishError):
                await coder.emit(event)
    async with await Bus.connect(settings_for(secured.url, cred(generated, "admin")), check=False) as admin:
        assert (await admin.stream_state(admin.topology.events_stream)).messages == 0


async def test_the_observer_reads_events_and_can_change_nothing(secured: EmbeddedNats, generated: Generated,
                                                                session: Session) -> None:
    async with await Bus.connect(settings_for(secured.url, cred(generated, "operator"))) as operator:
        await operator.submit_goal(Goal(brief="observe me"))
    async with await Bus.connect(settings_for(secured.url, cred(generated, "planner")), check=False,
                                 role="planner") as planner:
        await planner.emit(NodeUp(goal_id="g1", node="n1", role="planner", host="h", pid=1, version="0"))
    async with await Bus.connect(settings_for(secured.url, cred(generated, "observer")), check=False) as observer:
        async with aclosing(observer.watch_events("g1")) as events:
            first = await asyncio.wait_for(anext(events), 5)
        assert isinstance(first, NodeUp) and first.node == "n1"
    await session.connect(secured.url, cred(generated, "observer"))
    await session.nc.publish("mesh.goals", b"x")
    assert 'publish to "mesh.goals"' in await session.refused()


async def test_the_observer_with_the_default_check_is_refused_at_once_by_name(secured: EmbeddedNats,
                                                                               generated: Generated) -> None:
    """The default check asks every stream's info, which the observer may not: the server's refusal (it
    drops the request, no reply comes) is a PermissionDenied naming the user and the subject at once — not a
    timeout, retried with backoff, some 30 s later. With check=False the observer connects and reads."""
    settings = settings_for(secured.url, cred(generated, "observer"))
    started = time.monotonic()
    with pytest.raises(PermissionDenied) as refused:
        await Bus.connect(settings)
    waited = time.monotonic() - started
    message = str(refused.value)
    assert "NATS user 'observer' may not publish to $js.api.stream.info.mesh_goals" in message, message
    assert "check=False" in message and not retryable(refused.value)
    assert waited < API_TIMEOUT / 2, waited  # no request waited out its timeout, none was retried
    async with MeshClient.connect(settings, check=False) as observer:
        first, last = await observer.event_positions()
        assert first <= last


async def test_a_user_without_its_inbox_prefix_is_refused_at_once_with_the_fix(secured: EmbeddedNats,
                                                                               generated: Generated) -> None:
    """A role user may subscribe only to its own inbox prefix: without MESH_NATS_INBOX_PREFIX its replies'
    subscription is refused, and the check says so (and what to set) instead of timing out."""
    settings = settings_for(secured.url, cred(generated, "coder")).model_copy(update={"nats_inbox_prefix": "_INBOX"})
    started = time.monotonic()
    with pytest.raises(PermissionDenied, match=r"NATS user 'coder' \(role coder\) may not subscribe to _inbox\.") \
            as refused:
        await Bus.connect(settings, role="coder", roles=["coder"])
    assert "MESH_NATS_INBOX_PREFIX" in str(refused.value)
    assert time.monotonic() - started < API_TIMEOUT / 2


async def test_a_role_creating_another_roles_consumer_is_refused_at_once(secured: EmbeddedNats,
                                                                        generated: Generated) -> None:
    started = time.monotonic()
    with pytest.raises(PermissionDenied, match=r"NATS user 'coder' \(role coder\) may not publish to "
                                               r"\$js\.api\.consumer\.create\.mesh_tasks\.role-reviewer"):
        await Bus.connect(settings_for(secured.url, cred(generated, "coder")), role="coder", roles=["reviewer"])
    assert time.monotonic() - started < API_TIMEOUT / 2


async def test_only_a_refused_api_request_or_subscription_stops_a_guarded_operation() -> None:
    """A refused message elsewhere on the connection (an event the role may not emit) does not stop the
    check; the guarded operation's own errors pass as themselves, a retryable one still retryable."""
    refusals = Refusals()
    other = nats.errors.Error('nats: permissions violation for publish to "mesh.event.g1.coder.goal.completed"')
    api_request = nats.errors.Error('nats: permissions violation for publish to "$js.api.stream.info.mesh_goals"')

    async def check() -> None:
        refusals.report(other)  # the first refusal reported is the one raised: this one must not count
        refusals.report(nats.errors.Error("nats: slow consumer"))
        refusals.report(api_request)
        await asyncio.Event().wait()  # a request that never gets its reply

    with pytest.raises(PermissionDenied) as refused:
        await refusals.guard(check(), "NATS user 'coder'", "checking")
    assert str(refused.value) == ("NATS user 'coder' may not publish to $js.api.stream.info.mesh_goals "
                                  "(refused by the NATS server) while checking")

    async def timed_out() -> None:
        raise ProvisioningError("checking the 'mesh' topology timed out 5 times")

    with pytest.raises(ProvisioningError) as failed:
        await refusals.guard(timed_out(), "NATS user 'coder'", "checking")
    assert retryable(failed.value)


async def test_the_gateway_submits_and_commands_but_writes_no_goal_state(secured: EmbeddedNats, generated: Generated,
                                                                         session: Session) -> None:
    async with MeshClient.connect(settings_for(secured.url, cred(generated, "gateway"))) as client:
        goal_id = await client.submit(Goal(brief="through the front door"))
        assert await client.goal(goal_id) is None  # goal state is readable (nobody planned it here)
        assert await client.goals() == [] and await client.nodes() == []
        first, last = await client.event_positions()
        assert first <= last
        assert await client.history(goal_id) == [] and await client.dead_letters() == {}  # what the dashboard reads
        ack = await client.bus.publish_raw("mesh.control.g1", b"x")  # a command: the planner applies it
        assert ack.stream == "MESH_CONTROL"
        ref = await client.bus.put_blob(b"a starting workspace file")
        assert await client.bus.get_blob(ref.digest) == b"a starting workspace file"
    await session.connect(secured.url, cred(generated, "gateway"))
    for forged in ("$KV.mesh_goals.g1", "mesh.task.coder", "mesh.event.g1.planner.goal.completed"):
        session.error_seen.clear()
        await session.nc.publish(forged, b"forged")
        assert f'publish to "{forged.lower()}"' in await session.refused()


# --- only the admin reconfigures the topology ----------------------------------------------------


async def test_a_role_cannot_create_update_delete_or_purge_a_stream(secured: EmbeddedNats, generated: Generated,
                                                                    session: Session) -> None:
    """With the coder's credentials, shrinking MESH_EVENTS or the goal-state bucket (a purge in disguise),
    creating, deleting or purging a stream are each refused by the server; the streams are unchanged."""
    await session.connect(secured.url, cred(generated, "coder"))
    js = session.nc.jetstream(timeout=1.0)
    attempts = [
        ("$JS.API.STREAM.UPDATE.MESH_EVENTS",
         lambda: js.update_stream(api.StreamConfig(name="MESH_EVENTS", subjects=["mesh.event.>"], max_msgs=1))),
        ("$JS.API.STREAM.UPDATE.KV_mesh_goals",
         lambda: js.update_stream(api.StreamConfig(name="KV_mesh_goals", subjects=["$KV.mesh_goals.>"], max_msgs=1))),
        ("$JS.API.STREAM.CREATE.MESH_ROGUE", lambda: js.add_stream(name="MESH_ROGUE", subjects=["rogue.>"])),
        ("$JS.API.STREAM.PURGE.MESH_EVENTS", lambda: js.purge_stream("MESH_EVENTS")),
        ("$JS.API.STREAM.DELETE.MESH_TASKS", lambda: js.delete_stream("MESH_TASKS")),
    ]
    for subject, attempt in attempts:
        session.error_seen.clear()
        with pytest.raises(nats.errors.TimeoutError):  # the server drops the request: no reply comes
            await attempt()
        assert f'permissions violation for publish to "{subject.lower()}"' in await session.refused()
    async with await Bus.connect(settings_for(secured.url, cred(generated, "admin")), check=False) as admin:
        for name in ("MESH_EVENTS", "KV_mesh_goals"):
            assert (await admin._js.stream_info(name)).config.max_msgs == -1  # not shrunk
        assert "MESH_ROGUE" not in await admin._js.streams_info() and await admin._js.stream_info("MESH_TASKS")


async def test_a_role_cannot_delete_or_purge_an_artifact_and_a_rewritten_meta_is_caught(
        secured: EmbeddedNats, generated: Generated, session: Session) -> None:
    """Artifacts are shared and content-addressed: with the coder's credentials, purging an object's chunks
    (what an object delete does) and deleting its meta message are refused by the server, and the blob
    still reads back. What stays possible (a new meta for an existing name, new bytes on a chunk's subject)
    cannot make a reader accept other bytes: every read is checked against the digest."""
    coder = settings_for(secured.url, cred(generated, "coder"))
    async with await Bus.connect(coder, check=False) as bus:
        ref = await bus.put_blob(b"the reviewed code")
        other = await bus.put_blob(b"something else entirely")
        bucket = bus.topology.obj_artifacts
        meta_subject = f"$O.{bucket}.M.{base64.urlsafe_b64encode(ref.digest.encode()).decode()}"
        meta = await bus._js.get_last_msg(f"OBJ_{bucket}", meta_subject)
    await session.connect(secured.url, cred(generated, "coder"))
    js = session.nc.jetstream(timeout=1.0)
    store = await js.object_store(bucket)
    info = await store.get_info(ref.digest)
    attempts = [
        ("$JS.API.STREAM.PURGE.OBJ_mesh_artifacts",
         lambda: js.purge_stream(f"OBJ_{bucket}", subject=f"$O.{bucket}.C.{info.nuid}")),
        ("$JS.API.STREAM.MSG.DELETE.OBJ_mesh_artifacts", lambda: js.delete_msg(f"OBJ_{bucket}", meta.seq)),
    ]
    for subject, attempt in attempts:
        session.error_seen.clear()
        with pytest.raises(nats.errors.TimeoutError):
            await attempt()
        assert f'permissions violation for publish to "{subject.lower()}"' in await session.refused()
    async with await Bus.connect(coder, check=False) as bus:
        assert await bus.get_blob(ref.digest) == b"the reviewed code"
        # a forged meta pointing the name at other bytes: stored (the server cannot tell); the read takes the
        # chunk under the digest, and once that is overwritten too, the meta's bytes are refused on read
        forged = (await store.get_info(other.digest)).as_dict() | {"name": ref.digest}
        await bus._js.publish(meta_subject, json.dumps(forged).encode(), headers={"Nats-Rollup": "sub"})
        assert await bus.get_blob(ref.digest) == b"the reviewed code"
        await bus._js.publish(f"$O.{bucket}.C.{ref.digest}", b"forged", headers={"Nats-Rollup": "sub"})
        with pytest.raises(BusError, match="failed its digest check"):
            await bus.get_blob(ref.digest)
