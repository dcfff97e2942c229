"""Per-user NATS subject permissions, derived from the topology and the role specs.

Every allow-list is built from ``Topology`` names, so a different prefix or a new role spec changes
the permissions with it; nothing here is a hand-kept copy of a subject. What a user may do:

* every node publishes events only under its own role (``mesh.event.*.<role>.…``), so a worker cannot
  announce a step outcome as another role or any goal-level event;
* a **worker** pulls from its own durable consumer (``role-<role>`` on the tasks stream) and acks
  only there; publishes the event types a worker emits, its own dead letters, artifacts (object
  store) and its heartbeat; reads goal state (cancellation checks) but cannot write it;
* the **orchestrator** pulls goals and step outcomes, publishes tasks to the worker roles that
  exist, every event type under its role (goal-level events are its alone), and reads and writes
  goal state (compare-and-swap);
* the **recorder** owns the consumers of the event stream (except the orchestrator's) and serves
  the ledger's request/reply service (``allow_responses`` lets it answer any requester);
* the **operator** is the CLI (submit, watch, status, goals, show, cancel, sql, router publish);
* the **gateway** (`mesh gateway`) submits goals and sends control commands, and reads what it serves:
  events, goal state, objects (it stores uploaded workspaces), nodes, consumer and DLQ info, the ledger;
* the **observer** may only read the event stream (an ordered, server-named consumer) and the
  artifacts events refer to — what an outside dashboard or a Go/TypeScript client needs; not knowing the
  other streams, it connects without the start check (``check=False``), which it would fail at once;
* **admin** may do anything (break glass, topology changes by hand);
* **leaf-<domain>** is an edge site's leaf-node link: only the hub's copy of the site's events crosses.

Only the admin provisions (``mesh provision``: streams, KV buckets, object stores). No other user may
create, update, delete or purge a stream, or delete a message from one — denied explicitly on top of
the allow-lists (``ADMIN_ONLY``); shrinking a stream's limits would be a purge. Every mesh user may
inspect the mesh's streams (a node checks at start that the mesh is provisioned) and create, inspect and
pull from its own durable consumers only (``role-<role>``; the orchestrator's outcomes and control
consumers), re-creating one after a loss.

Object stores: objects are content-addressed (the name is the sha256 of the bytes) and shared, so who
wrote an object cannot be a subject permission. A writer publishes chunks (``$O.<bucket>.C.<nuid>``) and
one meta message per object (``$O.<bucket>.M.<name>``), so both stay allowed to the roles that store
blobs; purging a stream (what deleting an object's chunks is) and deleting messages are refused. A role
can still publish a meta message for a name that exists, or a rollup message on a chunk's subject (the
server cannot tell either from a new object's): that can make an object unreadable, never make a reader
accept other bytes, because every read is checked against the digest (``Bus.get_blob``). docs/DEPLOY.md
says the same for operators.

Replies: each user has its own inbox prefix (``_INBOX_<user>``) and may subscribe only to that, so
one role cannot read another role's replies or pull deliveries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mesh.bus.topology import Topology
from mesh.contracts.events import NODE_EVENTS, WORKER_EVENTS
from mesh.roles.spec import RoleSpec

JS_API = "$JS.API"

# The admin's alone (``mesh provision``); every other user is refused these even if an allow-list grew.
ADMIN_ONLY: tuple[str, ...] = tuple(f"{JS_API}.STREAM.{op}.>" for op in ("CREATE", "UPDATE", "DELETE", "PURGE",
                                                                         "MSG.DELETE"))


# Which event types each kind of process emits, always under its own role in the subject
# (``mesh.event.<goal>.<role>.<type>``), so no role can speak for another. The orchestrator (planner)
# emits every type under its own role: whatever it announces (goal.*, step.dispatched, approvals …)
# needs no grant per type, and nobody else may emit a type that is not listed here. A client's cancel
# is a command on ``mesh.control.<goal>``; the planner applies it and announces goal.cancelled.
EMITS: dict[str, frozenset[str]] = {"worker": WORKER_EVENTS, "recorder": NODE_EVENTS}


@dataclass(frozen=True)
class Permissions:
    """A NATS user's allow-lists (everything else is refused by the server)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    deny_publish: tuple[str, ...] = ()
    allow_responses: bool = False
    inbox_prefix: str = "_INBOX"

    def as_config(self) -> dict[str, object]:
        """The ``permissions`` block of a user in nats-server's configuration."""
        pub: dict[str, object] = {"allow": list(self.publish)}
        if self.deny_publish:
            pub["deny"] = list(self.deny_publish)
        out: dict[str, object] = {"publish": pub, "subscribe": {"allow": list(self.subscribe)}}
        if self.allow_responses:
            out["allow_responses"] = True
        return out


@dataclass
class _Grants:
    """Accumulates subjects; duplicates are dropped, order kept (readable configs)."""

    pub: dict[str, None] = field(default_factory=dict)
    sub: dict[str, None] = field(default_factory=dict)

    def publish(self, *subjects: str) -> None:
        self.pub.update(dict.fromkeys(subjects))

    def subscribe(self, *subjects: str) -> None:
        self.sub.update(dict.fromkeys(subjects))


def inbox_prefix(user: str) -> str:
    return f"_INBOX_{user}"


def leaf_user(domain: str) -> str:
    return f"leaf-{domain}"


class PermissionSet:
    """The permissions of every mesh user for one topology and set of role specs."""

    def __init__(self, topo: Topology, specs: Mapping[str, RoleSpec]) -> None:
        self.topo = topo
        self.specs = dict(specs)

    # --- building blocks -------------------------------------------------------------------------

    def _buckets(self, kind: str) -> list[str]:
        """Every KV (``kv``) or object-store (``obj``) bucket the topology names (its ``kv_*`` /
        ``obj_*`` properties), so a bucket added there is provisionable without an edit here."""
        return sorted({getattr(self.topo, n) for n in dir(type(self.topo)) if n.startswith(f"{kind}_")})

    def _streams(self) -> list[str]:
        return ([c.name for c in self.topo.stream_configs() if c.name] + [f"KV_{b}" for b in self._buckets("kv")]
                + [f"OBJ_{b}" for b in self._buckets("obj")])

    def _inspect(self, g: _Grants) -> None:
        """Stream info of the whole topology: how a process checks at start that the mesh is provisioned."""
        g.publish(*(f"{JS_API}.STREAM.INFO.{s}" for s in self._streams()))

    def _durable(self, g: _Grants, stream: str, name: str) -> None:
        """Create (re-create after a loss), inspect, pull from and ack one named durable consumer."""
        g.publish(f"{JS_API}.CONSUMER.CREATE.{stream}.{name}", f"{JS_API}.CONSUMER.CREATE.{stream}.{name}.>",
                  f"{JS_API}.CONSUMER.DURABLE.CREATE.{stream}.{name}",
                  f"{JS_API}.CONSUMER.INFO.{stream}.{name}", f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.{name}",
                  f"$JS.ACK.{stream}.{name}.>")

    def _read_stream(self, g: _Grants, stream: str) -> None:
        """Ordered (server-named, ephemeral) consumers and direct gets: how KV keys, object reads and
        event watches read a stream. The server names these consumers, so no durable can be hijacked."""
        g.publish(f"{JS_API}.STREAM.INFO.{stream}", f"{JS_API}.CONSUMER.CREATE.{stream}",
                  f"{JS_API}.CONSUMER.INFO.{stream}.*", f"{JS_API}.DIRECT.GET.{stream}",
                  f"{JS_API}.DIRECT.GET.{stream}.>", f"{JS_API}.STREAM.MSG.GET.{stream}", f"$JS.FC.{stream}.>",
                  f"{JS_API}.STREAM.NAMES")  # a subscribe by subject looks its stream up by name

    def _kv(self, g: _Grants, bucket: str, *, write: bool) -> None:
        self._read_stream(g, f"KV_{bucket}")
        if write:
            g.publish(f"$KV.{bucket}.>")

    def _objects(self, g: _Grants, bucket: str, *, write: bool) -> None:
        self._read_stream(g, f"OBJ_{bucket}")
        if write:
            g.publish(f"$O.{bucket}.C.>", f"$O.{bucket}.M.>")

    def _models(self, g: _Grants, *, write: bool) -> None:
        """The router's models: the object store and, where the topology declares one, the KV bucket
        of the same name holding the pointers to the current model (separate namespaces in NATS)."""
        models = self.topo.obj_models
        self._objects(g, models, write=write)
        if models in self._buckets("kv"):
            self._kv(g, models, write=write)

    def _events(self, g: _Grants, role: str, kind: str) -> None:
        """Events under the role's own subject token only: every type for the orchestrator, the
        listed types for the others."""
        t = self.topo
        if kind == "orchestrator":
            g.publish(t.event_subject("*", role, ">"))
        else:
            g.publish(*(t.event_subject("*", role, type) for type in sorted(EMITS.get(kind, ()))))

    def _node(self, g: _Grants, role: str, kind: str) -> None:
        """What every ``mesh node`` process does: check the topology, its role's consumer, heartbeat, events,
        dead letters, claim-checked bodies and artifacts."""
        t = self.topo
        self._inspect(g)
        self._durable(g, t.stream_for(role), t.consumer_name(role))
        self._kv(g, t.kv_nodes, write=True)
        self._objects(g, t.obj_artifacts, write=True)
        self._events(g, role, kind)
        g.publish(t.dlq_subject(role))

    # --- users -----------------------------------------------------------------------------------

    def role(self, role: str) -> Permissions:
        spec = self.specs[role]
        t = self.topo
        g = _Grants()
        self._node(g, role, spec.kind)
        allow_responses = False
        deny: tuple[str, ...] = ()
        if spec.kind != "recorder":  # the router runs in workers and the planner and hot-swaps its model
            self._models(g, write=False)
        if spec.kind == "worker":
            self._kv(g, t.kv_goals, write=False)
        elif spec.kind == "orchestrator":
            self._kv(g, t.kv_goals, write=True)
            self._durable(g, t.events_stream, t.outcomes_consumer)
            self._durable(g, t.control_stream, t.control_consumer)
            g.publish(*(t.task_subject(r) for r, s in sorted(self.specs.items()) if s.kind == "worker"))
        else:  # recorder: every consumer of the event stream but the orchestrator's, and the query service
            ev = t.events_stream
            g.publish(f"{JS_API}.CONSUMER.CREATE.{ev}.>", f"{JS_API}.CONSUMER.INFO.{ev}.>",
                      f"{JS_API}.CONSUMER.DELETE.{ev}.>", f"{JS_API}.CONSUMER.MSG.NEXT.{ev}.>", f"$JS.ACK.{ev}.>")
            self._read_stream(g, ev)
            g.subscribe(f"{t.prefix}.ledger.>", "$SRV.>")
            deny = tuple(f"{JS_API}.CONSUMER.{op}.{ev}.{t.outcomes_consumer}{tail}"
                         for op in ("CREATE", "DELETE") for tail in ("", ".>"))
            allow_responses = True
        return self._finish(role, g, deny=deny, allow_responses=allow_responses)

    def operator(self) -> Permissions:
        """The CLI against a running mesh: submit, watch, status, goals, show, cancel, ledger queries."""
        t = self.topo
        g = _Grants()
        self._inspect(g)
        g.publish(t.goal_subject(), t.control_filter(), f"{t.prefix}.ledger.>", "$SRV.>")
        self._read_stream(g, t.events_stream)
        self._kv(g, t.kv_goals, write=False)  # cancel is a command on the control subject
        self._kv(g, t.kv_nodes, write=False)
        self._objects(g, t.obj_artifacts, write=True)
        self._models(g, write=True)  # `mesh router publish`
        g.publish(*(f"{JS_API}.CONSUMER.{op}.{s}{tail}" for s in (t.goals_stream, t.tasks_stream)
                    for op, tail in (("LIST", ""), ("INFO", ".>"))))
        return self._finish("operator", g)

    def gateway(self) -> Permissions:
        """`mesh gateway` (and later front doors): publish goals and control commands (cancel — clients never
        write goal state); read events, goal state, live nodes, consumer and DLQ info, the ledger service;
        store and read objects (an uploaded starting workspace is stored there). Nothing else."""
        t = self.topo
        g = _Grants()
        self._inspect(g)  # MeshClient checks at connect that the mesh is provisioned
        g.publish(t.goal_subject(), t.control_filter(), f"{t.prefix}.ledger.>", "$SRV.>")
        self._read_stream(g, t.events_stream)
        self._kv(g, t.kv_goals, write=False)
        self._kv(g, t.kv_nodes, write=False)
        self._objects(g, t.obj_artifacts, write=True)
        g.publish(*(f"{JS_API}.CONSUMER.{op}.{s}{tail}" for s in (t.goals_stream, t.tasks_stream)
                    for op, tail in (("LIST", ""), ("INFO", ".>"))), f"{JS_API}.STREAM.INFO.{t.dlq_stream}")
        return self._finish("gateway", g)

    def observer(self) -> Permissions:
        """Read-only: the event stream and the artifacts its events refer to."""
        g = _Grants()
        self._read_stream(g, self.topo.events_stream)
        self._objects(g, self.topo.obj_artifacts, write=False)
        g.subscribe(self.topo.events_filter())  # live events without JetStream (core subscription)
        return self._finish("observer", g)

    def leaf(self, domain: str) -> Permissions:
        """An edge site's leaf-node connection to the hub. For a leaf connection, ``subscribe`` is what
        the hub may send into the site and ``publish`` what the site may send out: here only what the
        hub's sourcing of the site's events needs (consumer requests to the site's JetStream domain,
        flow control in; replies and the sourced messages out). Tasks, goals, KV and objects never
        cross, so each side's streams capture only their own traffic."""
        ev = self.topo.events_stream
        api = f"$JS.{domain}.API"
        return Permissions(
            publish=("$JSC.R.>", "$JS.S.>"),
            subscribe=(f"{api}.CONSUMER.CREATE.{ev}", f"{api}.CONSUMER.CREATE.{ev}.>", f"{api}.CONSUMER.INFO.{ev}.>",
                       f"{api}.CONSUMER.DELETE.{ev}.>", f"{api}.STREAM.INFO.{ev}", f"$JS.FC.{ev}.>"),
            inbox_prefix=inbox_prefix(leaf_user(domain)))

    def users(self, edge_domains: Iterable[str] = ()) -> dict[str, Permissions | None]:
        """Every user: one per role spec, operator, observer, admin (``None``: unrestricted) and a leaf
        user per edge site."""
        out: dict[str, Permissions | None] = {r: self.role(r) for r in sorted(self.specs)}
        out |= {"operator": self.operator(), "gateway": self.gateway(), "observer": self.observer(), "admin": None}
        out |= {leaf_user(d): self.leaf(d) for d in edge_domains}
        return out

    @staticmethod
    def _finish(user: str, g: _Grants, *, deny: tuple[str, ...] = (), allow_responses: bool = False) -> Permissions:
        inbox = inbox_prefix(user)
        g.subscribe(f"{inbox}.>")
        return Permissions(publish=tuple(g.pub), subscribe=tuple(g.sub), deny_publish=ADMIN_ONLY + deny,
                           allow_responses=allow_responses, inbox_prefix=inbox)
