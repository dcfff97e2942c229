"""The NATS topology, declared once and provisioned idempotently by every node at start.

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

Provisioning is safe when many nodes start at once: creating a stream or consumer whose identical
config already exists is a no-op on the server, and a mismatch (an older topology) is updated.

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
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import nats.errors
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NotFoundError

from mesh.config import MeshSettings, default_nodes_dir
from mesh.contracts.events import EventAddress, event_subject, parse_event_subject
from mesh.errors import NodeSpecError, ProvisioningError

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


async def provision(js: JetStreamContext, topo: Topology, roles: Iterable[str] = (), *, prune: bool = False) -> None:
    """Create or update every stream, bucket and store, and a durable pull consumer per role; with
    ``prune``, delete the tasks stream's consumers of roles that are no worker role.

    A JetStream API timeout is retried with backoff: when a whole mesh starts at once on a busy
    machine, the server can take longer than the client's API timeout to answer the burst, and
    every step here is idempotent, so trying again is safe.
    """
    roles = list(dict.fromkeys(roles))
    for attempt in range(1, PROVISION_ATTEMPTS + 1):
        try:
            await _provision_once(js, topo, roles)
            if prune:
                await _drop_stray_consumers(js, topo)
            return
        except TimeoutError as exc:  # nats.errors.TimeoutError is one too
            if attempt == PROVISION_ATTEMPTS:
                raise ProvisioningError(f"provisioning the {topo.prefix!r} topology timed out "
                                        f"{attempt} times: {exc!r}") from exc
            log.warning("provisioning timed out (attempt %d of %d); retrying", attempt, PROVISION_ATTEMPTS)
            await asyncio.sleep(0.5 * 2 ** (attempt - 1))
        except nats.errors.Error as exc:  # APIError is a nats.errors.Error
            raise ProvisioningError(f"provisioning the {topo.prefix!r} topology failed: {exc!r}") from exc


async def _provision_once(js: JetStreamContext, topo: Topology, roles: list[str]) -> None:
    for stream_config in topo.stream_configs():
        await _ensure_stream(js, stream_config)
    # Direct gets on the goal state: a worker checks it before every step, and a direct get costs neither
    # side a JSON API request (any replica may answer: see ``GoalStore.progress``).
    await _ensure_kv(js, api.KeyValueConfig(bucket=topo.kv_goals, history=8, replicas=topo.replicas,
                                            storage=api.StorageType.FILE, direct=True))
    await js.create_key_value(api.KeyValueConfig(bucket=topo.kv_nodes, history=1, ttl=topo.nodes_ttl,
                                                 replicas=topo.replicas, storage=api.StorageType.FILE))
    await js.create_key_value(api.KeyValueConfig(bucket=topo.kv_models, history=16, replicas=topo.replicas,
                                                 storage=api.StorageType.FILE))
    for bucket in (topo.obj_artifacts, topo.obj_models):
        await js.create_object_store(bucket, api.ObjectStoreConfig(replicas=topo.replicas,
                                                                   storage=api.StorageType.FILE))
    for role in roles:
        for stream, config in topo.consumer_configs(role):
            await _ensure_consumer(js, stream, config)


async def _ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
    try:
        await js.add_stream(config)  # identical config already there: the server answers with it
    except APIError as exc:
        if exc.err_code != _STREAM_NAME_IN_USE:
            raise
        log.info("stream %s exists with another configuration; updating it", config.name)
        await js.update_stream(config)


async def _ensure_kv(js: JetStreamContext, config: api.KeyValueConfig) -> None:
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


async def _drop_stray_consumers(js: JetStreamContext, topo: Topology) -> None:
    """Delete ``role-*`` consumers on the tasks stream whose role is no worker: nothing reaches them."""
    wanted = {topo.consumer_name(role) for role in topo.task_roles}
    for info in await js.consumers_info(topo.tasks_stream):
        if info.name.startswith(topo.consumer_name("")) and info.name not in wanted:
            log.info("deleting consumer %s on %s: %s is not a worker role", info.name, topo.tasks_stream,
                     info.name.removeprefix(topo.consumer_name("")))
            try:
                await js.delete_consumer(topo.tasks_stream, info.name)
            except NotFoundError:  # another node deleted it first
                pass


async def _ensure_consumer(js: JetStreamContext, stream: str, config: api.ConsumerConfig) -> None:
    try:
        await js.add_consumer(stream, config)  # create-or-update: a no-op when identical
    except APIError as exc:
        if exc.err_code not in (_CONSUMER_EXISTS, _CONSUMER_NAME_EXISTS):
            raise
        assert config.durable_name is not None
        await js.consumer_info(stream, config.durable_name)  # raced another node's create: it exists now
