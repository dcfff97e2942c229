"""The NATS topology, declared once; provisioned by an admin identity (``mesh provision``, ``mesh up``,
the Kubernetes provisioning Job), verified by every node at start.

    stream MESH_GOALS   mesh.goals                    work-queue; consumer role-<planner> (the role
                                                      whose spec is of kind orchestrator), which also
                                                      owns <planner>-outcomes on MESH_EVENTS:
                                                      step.completed / step.failed of any role
    stream MESH_TASKS   mesh.task.<role>              work-queue; one subject and one durable pull consumer
                                                      role-<role> per WORKER role of the role specs
    stream MESH_EVENTS  mesh.event.<goal_id>.<role>.<type>
                                                      limits retention, kept (the ledger can replay it all);
                                                      <role> is the emitting node's role (schema 2; schema 1
                                                      subjects, mesh.event.<goal_id>.<type>, are still read)
    stream MESH_CONTROL mesh.control.<goal_id>        work-queue; consumer <planner>-control: clients' commands
                                                      (cancel) that the planner applies by CAS
    stream MESH_DLQ     mesh.dlq.<role>               limits; also captures JetStream's MAX_DELIVERIES
                                                      advisories for the goal and task streams
    KV     mesh_goals   goal state, updated by CAS on revision
    KV     mesh_nodes   live-node heartbeats; entries expire after ``nodes_ttl``
    Object mesh_artifacts, mesh_models              content-addressed bytes (key = sha256 hex)
    KV     mesh_models  pointers into the models store (key ``router``: the current router model)
    stream MESH_EVENTS_<DOMAIN>                       on a hub only: an edge site's events, sourced from
                                                      that site's JetStream domain (``edge_domains``)

Every stream dedupes on ``Nats-Msg-Id`` over ``duplicate_window`` (2 minutes): a re-publish with the
same id inside that window is acknowledged as a duplicate and not stored. Task ids are
``goal.step.attempt``, so a re-driven dispatch of the same attempt is dropped while a new attempt passes.

Provisioning (``provision``) is idempotent: creating a stream or consumer whose identical config already
exists is a no-op on the server, and a mismatch (an older topology) is updated. Only the admin does it:
with the role specs of one place, so MESH_TASKS' subjects are no longer decided by whichever node started
last. A role node only checks (``require_topology``) that every stream and bucket exists and that the tasks
stream takes its role, failing fast with "mesh not provisioned ... run `mesh provision`", and then creates
(or re-creates after a loss) its own durable consumers (``ensure_consumers``) — all its user may create.

Why MESH_TASKS lists its subjects instead of taking ``mesh.task.>``: a work-queue stream keeps what
no consumer takes, so a task for a role nobody serves (``mesh.task.planner``, a typo) would wait there
forever, neither consumed nor dead-lettered. Listing the worker roles' subjects makes such a publish
fail at the publisher (``NoStreamForSubject``). Only worker roles get a consumer there; provisioning
with ``prune`` (an admin act: ``mesh up`` before its nodes start — role users may not delete) removes
``role-*`` consumers on the stream of roles that are not workers (the ledger once had one it never read).
"""

from __future__ import annotations

import asyncio
import logging
import tomllib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import nats.errors
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NotFoundError

from mesh.config import MeshSettings, default_nodes_dir
from mesh.contracts.events import (
    STEP_REPORTS,
    WORKER_EVENTS,
    EventAddress,
    EventBase,
    event_subject,
    parse_event_subject,
)
from mesh.errors import NodeSpecError, NotProvisioned, ProvisioningError

log = logging.getLogger(__name__)

# JetStream API error codes (nats-server/server/errors.json).
_STREAM_NAME_IN_USE = 10058  # "stream name already in use with a different configuration"
_CONSUMER_EXISTS = 10148  # "consumer already exists" (a create raced another create)
_CONSUMER_NAME_EXISTS = 10013
DEFAULT_GOAL_ROLE = "planner"  # the shipped orchestrator's name, for a folder without role specs


def _role_kinds(directory: Path | None) -> list[tuple[str, object]]:
    """(role, kind) of every TOML role spec in ``directory`` (default: the role specs' folder). Only
    ``role`` and ``kind`` are read here; a node validates its whole spec when it starts."""
    kinds = []
    for path in sorted((directory or default_nodes_dir()).glob("*.toml")):
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise NodeSpecError(f"{path}: not a readable TOML role spec: {exc}") from exc
        kinds.append((str(doc.get("role", path.stem)), doc.get("kind")))
    return kinds


def worker_roles(directory: Path | None = None) -> tuple[str, ...]:
    """The roles whose spec in ``directory`` (default: the role specs' folder) is of kind ``worker``."""
    return tuple(role for role, kind in _role_kinds(directory) if kind == "worker")


def orchestrator_role(directory: Path | None = None) -> str:
    """The role whose spec in ``directory`` is of kind ``orchestrator``: it reads the goals and plans them.
    ``DEFAULT_GOAL_ROLE`` when the folder has none (a client's machine without role specs needs no
    planner of its own, only the consumer names); ``NodeSpecError`` when it has several."""
    roles = [role for role, kind in _role_kinds(directory) if kind == "orchestrator"]
    if len(roles) > 1:
        raise NodeSpecError(f"more than one role spec of kind orchestrator: {', '.join(roles)}; the goals "
                            "stream has one consumer, so one role plans")
    return roles[0] if roles else DEFAULT_GOAL_ROLE


@dataclass(frozen=True)
class Topology:
    """Names of every subject, stream, bucket and consumer, derived from one prefix."""

    prefix: str = "mesh"
    replicas: int = 1
    ack_wait: float = 30.0
    max_deliver: int = 5
    duplicate_window: float = 120.0
    nodes_ttl: float = 15.0
    goal_role: str = field(default_factory=orchestrator_role)  # reads goals instead of tasks: the spec that plans
    max_ack_pending: int = 1000
    edge_domains: tuple[str, ...] = ()  # JetStream domains of edge sites whose events a hub keeps
    events_max_age: float = 0.0  # seconds the events stream keeps an event; 0 = forever
    task_roles: tuple[str, ...] = field(default_factory=worker_roles)  # the tasks stream's roles

    @classmethod
    def from_settings(cls, s: MeshSettings) -> Topology:
        return cls(prefix=s.subject_prefix, replicas=s.replicas, ack_wait=s.ack_wait, max_deliver=s.max_deliver,
                   edge_domains=tuple(d.strip() for d in s.edge_domains.split(",") if d.strip()),
                   events_max_age=s.events_max_age)

    # --- streams and buckets ---------------------------------------------------------------

    def _stream(self, suffix: str) -> str:
        return f"{self.prefix.upper()}_{suffix}"

    @property
    def goals_stream(self) -> str:
        return self._stream("GOALS")

    @property
    def tasks_stream(self) -> str:
        return self._stream("TASKS")

    @property
    def events_stream(self) -> str:
        return self._stream("EVENTS")

    @property
    def control_stream(self) -> str:
        return self._stream("CONTROL")

    @property
    def dlq_stream(self) -> str:
        return self._stream("DLQ")

    def edge_events_stream(self, domain: str) -> str:
        """The hub's copy of an edge site's events: sourced from the ``events_stream`` of that site's
        JetStream domain (a leaf node), so the site's results arrive whenever its link is up."""
        return self._stream(f"EVENTS_{domain.upper().replace('-', '_')}")

    @property
    def kv_goals(self) -> str:
        return f"{self.prefix}_goals"

    @property
    def kv_nodes(self) -> str:
        return f"{self.prefix}_nodes"

    @property
    def obj_artifacts(self) -> str:
        return f"{self.prefix}_artifacts"

    @property
    def obj_models(self) -> str:
        return f"{self.prefix}_models"

    @property
    def kv_models(self) -> str:
        """Pointers to the current models in ``obj_models`` (KV and object buckets have separate namespaces)."""
        return f"{self.prefix}_models"

    def bucket_streams(self) -> list[str]:
        """The streams behind the KV buckets and object stores (``KV_<bucket>``, ``OBJ_<bucket>``)."""
        return [f"KV_{self.kv_goals}", f"KV_{self.kv_nodes}", f"KV_{self.kv_models}",
                f"OBJ_{self.obj_artifacts}", f"OBJ_{self.obj_models}"]

    # --- subjects --------------------------------------------------------------------------

    def goal_subject(self) -> str:
        return f"{self.prefix}.goals"

    def task_subject(self, role: str) -> str:
        return f"{self.prefix}.task.{role}"

    def event_subject(self, goal_id: str, role: str, type: str) -> str:
        """An event's subject; wildcards make filters (``event_subject("*", "*", "goal.*")``). Only the bus
        builds the subject of an event it publishes (``Bus.emit``, from its own role)."""
        return event_subject(self.prefix, goal_id, role, type)

    def event_address(self, subject: str) -> EventAddress | None:
        """Goal, emitting role (``None``: a schema-1 subject) and type of an event subject."""
        return parse_event_subject(self.prefix, subject)

    def forged(self, subject: str, event: EventBase) -> str | None:
        """Why ``event`` cannot have been emitted by the role its subject names, or None. Checked are what
        the subject and body say of each other: a report on a step (started, progress, completed, failed)
        comes from the step's role, a type no worker emits (goal.*, step.dispatched, approval.* …) from the
        planner, and the subject names the event's goal and type. A schema-1 subject names no role: only
        goal and type are checked."""
        address = self.event_address(subject)
        type = str(getattr(event, "type", ""))
        if address is None or address.goal_id != event.goal_id or address.type != type:
            return f"subject {subject} does not address a {type} event of goal {event.goal_id}"
        if address.role is None:
            return None
        if type in STEP_REPORTS:
            expected = getattr(event, "role", None)
        elif type in WORKER_EVENTS:
            expected = address.role
        else:
            expected = self.goal_role
        if address.role != expected:
            return f"a {type} event emitted by role {address.role}: only {expected} emits it"
        return None

    def events_filter(self, goal_id: str | None = None) -> str:
        return f"{self.prefix}.event.{goal_id}.>" if goal_id else f"{self.prefix}.event.>"

    def control_subject(self, goal_id: str) -> str:
        """Where clients send a goal's commands (``GoalCommand``); only the planner consumes them."""
        return f"{self.prefix}.control.{goal_id}"

    def control_filter(self) -> str:
        return f"{self.prefix}.control.>"

    def dlq_subject(self, role: str) -> str:
        return f"{self.prefix}.dlq.{role}"

    # --- consumers -------------------------------------------------------------------------

    def consumer_name(self, role: str) -> str:
        return f"role-{role}"

    def stream_for(self, role: str) -> str:
        """The stream a role's consumer reads: goals for the planner, tasks for everyone else."""
        return self.goals_stream if role == self.goal_role else self.tasks_stream

    def task_subjects(self) -> list[str]:
        return [self.task_subject(role) for role in self.task_roles]

    def filter_for(self, role: str) -> str:
        return self.goal_subject() if role == self.goal_role else self.task_subject(role)

    @property
    def outcomes_consumer(self) -> str:
        """The orchestrator's durable consumer of step outcomes on the events stream."""
        return f"{self.goal_role}-outcomes"

    @property
    def control_consumer(self) -> str:
        """The orchestrator's durable consumer of goal commands."""
        return f"{self.goal_role}-control"

    def outcome_subjects(self) -> list[str]:
        """Step outcomes emitted by any role: the planner checks the role against the step's
        (a schema-1 outcome, which names no role, does not match)."""
        return [self.event_subject("*", "*", "step.completed"), self.event_subject("*", "*", "step.failed")]

    def takes(self, subject: str) -> bool:
        """Whether a stream of this topology takes ``subject`` (NATS wildcard matching).

        JetStream answers "no responders" both for a subject no stream takes and, briefly, while a
        clustered stream has no leader: only the first is permanent."""
        return any(_matches(pattern, subject) for config in self.stream_configs() for pattern in config.subjects or ())

    # --- configs ---------------------------------------------------------------------------

    def stream_configs(self) -> list[api.StreamConfig]:
        def cfg(name: str, subjects: list[str], retention: api.RetentionPolicy,
                max_age: float | None = None) -> api.StreamConfig:
            return api.StreamConfig(
                name=name, subjects=subjects, retention=retention, storage=api.StorageType.FILE,
                num_replicas=self.replicas, max_age=max_age,
                # the server refuses a duplicate window longer than the stream keeps messages
                duplicate_window=min(self.duplicate_window, max_age) if max_age else self.duplicate_window,
            )

        advisories = [f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{s}.>"
                      for s in (self.goals_stream, self.tasks_stream)]
        return [
            cfg(self.goals_stream, [self.goal_subject()], api.RetentionPolicy.WORK_QUEUE),
            cfg(self.tasks_stream, self.task_subjects(), api.RetentionPolicy.WORK_QUEUE),
            cfg(self.events_stream, [self.events_filter()], api.RetentionPolicy.LIMITS, self.events_max_age or None),
            cfg(self.control_stream, [self.control_filter()], api.RetentionPolicy.WORK_QUEUE),
            cfg(self.dlq_stream, [f"{self.prefix}.dlq.>", *advisories], api.RetentionPolicy.LIMITS),
        ] + [
            api.StreamConfig(  # no subjects of its own: nothing published at the hub lands here
                name=self.edge_events_stream(domain), retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE, num_replicas=self.replicas,
                sources=[api.StreamSource(name=self.events_stream,
                                          external=api.ExternalStream(api=f"$JS.{domain}.API"))],
            )
            for domain in self.edge_domains
        ]

    def consumer_configs(self, role: str) -> list[tuple[str, api.ConsumerConfig]]:
        """(stream, config) of every durable consumer a role owns.

        The goal role also owns ``outcomes_consumer``: step outcomes from the events stream, from
        the moment it is first created (``DeliverPolicy.NEW``: older history is the ledger's business),
        and ``control_consumer``: the goal commands clients send.
        A role that is neither (the recorder) owns none here: it reads the events stream its own way.
        """
        def durable(name: str, policy: api.DeliverPolicy, **filters: object) -> api.ConsumerConfig:
            return api.ConsumerConfig(
                name=name, durable_name=name, ack_policy=api.AckPolicy.EXPLICIT, deliver_policy=policy,
                ack_wait=self.ack_wait, max_deliver=self.max_deliver, max_ack_pending=self.max_ack_pending,
                num_replicas=self.replicas, **filters,  # type: ignore[arg-type]
            )

        own = (self.stream_for(role), durable(self.consumer_name(role), api.DeliverPolicy.ALL,
                                              filter_subject=self.filter_for(role)))
        if role in self.task_roles:
            return [own]
        if role != self.goal_role:
            return []
        outcomes = durable(self.outcomes_consumer, api.DeliverPolicy.NEW, filter_subjects=self.outcome_subjects())
        control = durable(self.control_consumer, api.DeliverPolicy.ALL, filter_subject=self.control_filter())
        return [own, (self.events_stream, outcomes), (self.control_stream, control)]


PROVISION_ATTEMPTS = 5


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(have) == len(want)


async def provision(js: JetStreamContext, topo: Topology, roles: Iterable[str] = (), *,
                    prune: bool = False) -> list[str]:
    """The admin's act: create or update every stream, bucket and store, and the durable pull consumers of
    ``roles``; with ``prune``, delete the tasks stream's consumers of roles that are no worker role.
    Returns what changed, one line each ("created stream MESH_TASKS"); empty when nothing did."""
    roles = list(dict.fromkeys(roles))
    changes: list[str] = []

    async def once() -> None:
        changes.clear()
        await _provision_once(js, topo, roles, changes)
        if prune:
            await _drop_stray_consumers(js, topo, changes)

    await _retrying(once, f"provisioning the {topo.prefix!r} topology")
    return changes


async def require_topology(js: JetStreamContext, topo: Topology, roles: Iterable[str] = ()) -> None:
    """``NotProvisioned`` unless every stream and bucket exists and the tasks stream takes each of ``roles``
    that is a worker role here: what a node checks at start instead of provisioning."""
    async def once() -> None:
        for name in [c.name for c in topo.stream_configs() if c.name] + topo.bucket_streams():
            try:
                info = await js.stream_info(name)
            except NotFoundError:
                raise NotProvisioned(f"mesh not provisioned: stream {name} missing — run `mesh provision`") from None
            if name == f"KV_{topo.kv_goals}" and not info.config.allow_direct:  # the workers' step checks read so
                raise NotProvisioned(f"mesh provisioned by an older version: bucket {topo.kv_goals} does not allow "
                                     "direct gets — run `mesh provision`")
            if name == topo.tasks_stream:
                taken = set(info.config.subjects or ())
                for role in roles:
                    if role in topo.task_roles and topo.task_subject(role) not in taken:
                        raise NotProvisioned(
                            f"mesh not provisioned for role {role!r}: stream {name} does not take "
                            f"{topo.task_subject(role)} — run `mesh provision` with this role's spec in nodes/")

    await _retrying(once, f"checking the {topo.prefix!r} topology")


async def ensure_consumers(js: JetStreamContext, topo: Topology, roles: Iterable[str]) -> None:
    """Create (or re-create after a loss, or update) the durable consumers ``roles`` own — all a role
    user may create."""
    async def once() -> None:
        for role in dict.fromkeys(roles):
            for stream, config in topo.consumer_configs(role):
                await _ensure_consumer(js, stream, config)

    await _retrying(once, f"creating the consumers of {', '.join(roles) or 'no role'}")


async def _retrying(step: Callable[[], Awaitable[None]], what: str) -> None:
    """``step`` with a JetStream API timeout retried with backoff: when a whole mesh starts at once on a busy
    machine, the server can take longer than the client's API timeout to answer the burst, and every step
    here is idempotent, so trying again is safe."""
    for attempt in range(1, PROVISION_ATTEMPTS + 1):
        try:
            await step()
            return
        except TimeoutError as exc:  # nats.errors.TimeoutError is one too
            if attempt == PROVISION_ATTEMPTS:
                raise ProvisioningError(f"{what} timed out {attempt} times: {exc!r}") from exc
            log.warning("%s timed out (attempt %d of %d); retrying", what, attempt, PROVISION_ATTEMPTS)
            await asyncio.sleep(0.5 * 2 ** (attempt - 1))
        except nats.errors.Error as exc:  # APIError is a nats.errors.Error
            raise ProvisioningError(f"{what} failed: {exc!r}") from exc


async def _provision_once(js: JetStreamContext, topo: Topology, roles: list[str], changes: list[str]) -> None:
    for stream_config in topo.stream_configs():
        await _ensure_stream(js, stream_config, changes)
    # Direct gets on the goal state: a worker checks it before every step, and a direct get costs neither
    # side a JSON API request (any replica may answer: see ``GoalStore.progress``).
    goals = api.KeyValueConfig(bucket=topo.kv_goals, history=8, replicas=topo.replicas, storage=api.StorageType.FILE,
                               direct=True)
    others = [api.KeyValueConfig(bucket=topo.kv_nodes, history=1, ttl=topo.nodes_ttl, replicas=topo.replicas,
                                 storage=api.StorageType.FILE),
              api.KeyValueConfig(bucket=topo.kv_models, history=16, replicas=topo.replicas,
                                 storage=api.StorageType.FILE)]
    for kv in (goals, *others):
        new = not await _exists(js, f"KV_{kv.bucket}")
        if kv is goals:
            await _ensure_kv(js, kv, changes)
        else:
            await js.create_key_value(kv)
        if new:
            changes.append(f"created KV bucket {kv.bucket}")
    for bucket in (topo.obj_artifacts, topo.obj_models):
        new = not await _exists(js, f"OBJ_{bucket}")
        await js.create_object_store(bucket, api.ObjectStoreConfig(replicas=topo.replicas,
                                                                   storage=api.StorageType.FILE))
        if new:
            changes.append(f"created object store {bucket}")
    for role in roles:
        for stream, config in topo.consumer_configs(role):
            await _ensure_consumer(js, stream, config, changes)


async def _exists(js: JetStreamContext, stream: str) -> bool:
    try:
        await js.stream_info(stream)
    except NotFoundError:
        return False
    return True


async def _ensure_stream(js: JetStreamContext, config: api.StreamConfig, changes: list[str]) -> None:
    new = not await _exists(js, str(config.name))
    try:
        await js.add_stream(config)  # identical config already there: the server answers with it
    except APIError as exc:
        if exc.err_code != _STREAM_NAME_IN_USE:
            raise
        log.info("stream %s exists with another configuration; updating it", config.name)
        await js.update_stream(config)
        changes.append(f"updated stream {config.name} (subjects: {', '.join(config.subjects or ['sourced'])})")
        return
    if new:
        changes.append(f"created stream {config.name} (subjects: {', '.join(config.subjects or ['sourced'])})")


async def _ensure_kv(js: JetStreamContext, config: api.KeyValueConfig, changes: list[str]) -> None:
    """Create a bucket; one made before its direct gets were allowed (an older topology) is updated to allow them."""
    try:
        await js.create_key_value(config)
    except APIError as exc:
        if exc.err_code != _STREAM_NAME_IN_USE:
            raise
        info = await js.stream_info(f"KV_{config.bucket}")
        if bool(info.config.allow_direct) == bool(config.direct):
            raise  # another difference: not ours to change
        log.info("bucket %s: allowing direct gets", config.bucket)
        await js.update_stream(replace(info.config, allow_direct=config.direct))
        changes.append(f"updated KV bucket {config.bucket} (direct gets allowed)")


async def _drop_stray_consumers(js: JetStreamContext, topo: Topology, changes: list[str]) -> None:
    """Delete ``role-*`` consumers on the tasks stream whose role is no worker: nothing reaches them."""
    wanted = {topo.consumer_name(role) for role in topo.task_roles}
    for info in await js.consumers_info(topo.tasks_stream):
        if info.name.startswith(topo.consumer_name("")) and info.name not in wanted:
            try:
                await js.delete_consumer(topo.tasks_stream, info.name)
            except NotFoundError:  # deleted by someone else first
                continue
            changes.append(f"deleted consumer {info.name} on {topo.tasks_stream}: "
                           f"{info.name.removeprefix(topo.consumer_name(''))} is not a worker role")


async def _ensure_consumer(js: JetStreamContext, stream: str, config: api.ConsumerConfig,
                           changes: list[str] | None = None) -> None:
    assert config.durable_name is not None
    if changes is not None:
        try:
            await js.consumer_info(stream, config.durable_name)
        except NotFoundError:
            changes.append(f"created consumer {config.durable_name} on {stream}")
    try:
        await js.add_consumer(stream, config)  # create-or-update: a no-op when identical
    except APIError as exc:
        if exc.err_code not in (_CONSUMER_EXISTS, _CONSUMER_NAME_EXISTS):
            raise
        await js.consumer_info(stream, config.durable_name)  # raced another node's create: it exists now
