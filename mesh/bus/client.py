"""The bus: one NATS connection, typed publish, claim-check, KV and object-store handles.

Publishing goes through JetStream and waits for the stream's ack. The envelope id is fresh per
message; the ``Nats-Msg-Id`` dedupe id is the caller's (task id, goal id, event id) so a re-publish
of the same thing inside the stream's duplicate window is dropped by the server.

Claim-check: an encoded message above ``settings.claim_check_bytes`` (default 256 KiB, well under
NATS' 1 MiB max_payload) has its body moved to the ``<prefix>_artifacts`` object store under its
sha256; the message carries an ``ArtifactRef`` instead. ``Bus.open`` resolves it transparently.

The raw nats-py clients are private (``_nc``, ``_js``): everything above this package uses the typed
methods here (publish, events, KV compare-and-swap, blobs, stream and consumer state) and in
``mesh.bus.pull`` / ``consumer`` / ``feed`` / ``service``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self, TypeVar

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.client import KV_PRE_TEMPLATE, KV_STREAM_TEMPLATE
from nats.js.errors import (
    KeyWrongLastSequenceError,
    NoKeysError,
    NoStreamResponseError,
    NotFoundError,
    ObjectNotFoundError,
)
from nats.js.kv import MSG_ROLLUP_SUBJECT, KeyValue
from nats.js.object_store import (
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_DEFAULT_CHUNK_SIZE,
    OBJ_DIGEST_TEMPLATE,
    OBJ_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
    ObjectStore,
)
from pydantic import BaseModel

from mesh.aio import together
from mesh.bus.refusals import Refusals
from mesh.bus.topology import Topology, ensure_consumers, provision, require_topology
from mesh.config import MeshSettings, get_settings
from mesh.contracts.codec import (
    EVENT_HISTORY_MAJORS,
    SCHEMA_MAJOR,
    Envelope,
    decode_body,
    encode,
    encode_body,
    encode_claim,
    open_envelope,
)
from mesh.contracts.events import Event, EventBase
from mesh.contracts.models import ArtifactRef, Goal, Task, new_id, sha256_hex
from mesh.errors import (
    BlobNotFound,
    BusError,
    CodecError,
    ConfigError,
    ContractError,
    MessageTooLarge,
    NoStreamForSubject,
    NotConnected,
    PayloadRefused,
    PublishError,
    SchemaViolation,
)
from mesh.tracing import trace_context

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
CLAIM_MEDIA_TYPE = "application/vnd.mesh.body+msgpack"
H = TypeVar("H")


@dataclass(frozen=True, slots=True)
class KvEntry:
    """One KV value and the revision to swap against."""

    key: str
    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class ConsumerState:
    """A durable consumer's backlog."""

    name: str
    pending: int  # stored, not yet delivered
    in_flight: int  # delivered, not yet acknowledged
    redelivered: int


@dataclass(frozen=True, slots=True)
class PreparedEvent:
    """An event encoded for its subject, ready to send (``Bus.prepare``)."""

    subject: str
    data: bytes
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class StreamState:
    name: str
    created: datetime | None  # tells a recreated stream from the one a reader knew
    first_seq: int
    last_seq: int
    messages: int


class Bus:
    """A connected Mesh bus. Create with ``await Bus.connect(settings)``; close with ``await bus.close()``."""

    def __init__(self, nc: Client, settings: MeshSettings, topology: Topology, *, name: str = "mesh",
                 domain: str | None = None, role: str | None = None) -> None:
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream(domain=domain)
        self.settings = settings
        self.topology = topology
        self.name = name
        # The role this connection emits events as: it names the role in every event subject, which is
        # what the server's per-role publish permissions and the planner's outcome check rely on.
        self.role = role
        self.reconnects = 0  # bumped on every reconnect; pull consumers re-issue their pull requests
        self._roles: dict[str, None] = {}
        self._kv: dict[tuple[str, bool], KeyValue] = {}  # (bucket, direct) → handle
        self._kv_checked: dict[str, KeyValue] = {}
        self._objects: dict[str, ObjectStore] = {}
        self._connect_errors: list[str] = []  # why a first connect failed, for its error message
        self._refusals = Refusals()  # permission refusals, which fail the topology check and consumer creation

    # --- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        settings: MeshSettings | None = None,
        *,
        name: str = "mesh",
        roles: Iterable[str] = (),
        check: bool = True,
        role: str | None = None,
        domain: str | None = None,
        topology: Topology | None = None,
    ) -> Bus:
        """Connect (failing fast with ``NotConnected`` when no server answers); with ``check``, verify the
        topology is provisioned (``NotProvisioned`` if not) and create the durable consumers ``roles`` own —
        ``PermissionDenied`` at once if the server refuses the user a request of the check (the observer
        may not ask every stream's info: it connects with ``check=False``).
        ``role``: the role this process emits events as (a node's role); without one it emits none.
        ``domain``: the JetStream domain to address (an edge site's); ``topology``: instead of the settings'
        (``mesh provision --nodes DIR`` takes the worker roles from other role specs)."""
        settings = settings or get_settings()
        servers = settings.servers
        if not servers:
            raise NotConnected("no NATS server configured: set MESH_NATS_URL (or use `mesh up` for a local one)")
        bus = cls(Client(), settings, topology or Topology.from_settings(settings), name=name, domain=domain,
                  role=role)
        try:
            # Bounded attempts for the first connection, so a missing server is a clear error ...
            await bus._nc.connect(
                servers=servers, name=name,
                # nats-py annotates these as int but uses them as float seconds
                connect_timeout=settings.connect_timeout,  # type: ignore[arg-type]
                reconnect_time_wait=settings.reconnect_wait,  # type: ignore[arg-type]
                max_reconnect_attempts=settings.connect_attempts,
                disconnected_cb=bus._on_disconnect, reconnected_cb=bus._on_reconnect, error_cb=bus._on_error,
                closed_cb=bus._on_closed, **_auth_options(settings),
            )
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            # a refusal (authorization) arrives through the error callback; connect itself ends "no servers"
            seen = [e for e in dict.fromkeys(bus._connect_errors) if e != repr(exc)]
            exc_text = f"{exc!r} after {', '.join(seen)}" if seen else repr(exc)
            hint = ""
            if "authorization" in exc_text.lower():
                hint = ("; the server wants credentials: MESH_NATS_USER / MESH_NATS_PASSWORD, or MESH_NATS_TOKEN "
                        "(a local `mesh up` keeps its token in <data dir>/nats-token, which `mesh` commands "
                        "run from the same data dir read)")
            raise NotConnected(f"cannot connect to NATS at {', '.join(servers)}: {exc_text}{hint}") from exc
        # ... then the configured policy (-1: forever) for reconnects once we have been up.
        bus._nc.options["max_reconnect_attempts"] = settings.max_reconnect_attempts
        if check:
            try:
                await bus.require_topology(roles)
                await bus.ensure_consumers(roles)
            except BaseException:
                await bus._nc.close()
                raise
        return bus

    async def _on_disconnect(self) -> None:
        if not self._nc.is_closed:  # our own close() reports a disconnect too
            log.warning("NATS disconnected (%s); reconnecting", self.name)

    async def _on_reconnect(self) -> None:
        self.reconnects += 1
        url = self._nc.connected_url
        log.warning("NATS reconnected (%s) to %s", self.name, url.netloc if url else "?")

    async def _on_error(self, exc: Exception) -> None:
        if len(self._connect_errors) < 8 and not self._nc.is_connected:
            self._connect_errors.append(repr(exc))
        self._refusals.report(exc)
        log.debug("NATS client error (%s): %r", self.name, exc)

    async def _on_closed(self) -> None:
        log.info("NATS connection closed (%s)", self.name)

    async def provision(self, roles: Iterable[str] = (), *, prune: bool = False) -> list[str]:
        """The admin's act (``mesh provision``): create or update every stream and bucket, and the consumers
        of ``roles``; ``prune``: also delete consumers of roles that are no worker (``mesh.bus.topology``).
        Returns what changed, one line each."""
        return await provision(self._js, self.topology, roles, prune=prune)

    async def require_topology(self, roles: Iterable[str] = ()) -> None:
        """``NotProvisioned`` unless every stream and bucket exists and the tasks stream takes ``roles``;
        ``PermissionDenied`` at once when the user may not ask a stream's info (the generated observer)."""
        await self._refusals.guard(
            require_topology(self._js, self.topology, roles), self._user(),
            f"checking that the {self.topology.prefix!r} topology is provisioned, which asks every stream's "
            "info; a user that may not ask it (the generated observer) connects with check=False")

    async def ensure_consumers(self, roles: Iterable[str] = ()) -> None:
        """(Re-)create the durable consumers of ``roles`` plus of every role ensured before on this bus;
        ``PermissionDenied`` at once when the user may not."""
        self._roles.update(dict.fromkeys(roles))
        await self._refusals.guard(ensure_consumers(self._js, self.topology, self._roles), self._user(),
                                   f"creating the durable consumers of {', '.join(self._roles) or 'no role'}")

    def _user(self) -> str:
        """Who this connection is, for an error message (never a secret)."""
        s = self.settings
        user = (f"NATS user {s.nats_user!r}" if s.nats_user else f"the NATS user of {s.nats_creds}"
                if s.nats_creds else "the NATS token's user" if s.nats_token else "this connection's NATS user")
        return f"{user} (role {self.role})" if self.role else user

    async def close(self) -> None:
        if not self._nc.is_closed:
            await self._nc.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    @property
    def closed(self) -> bool:
        return bool(self._nc.is_closed)

    @property
    def max_payload(self) -> int:
        """The largest message the server accepts (bytes)."""
        return int(self._nc.max_payload)

    # --- publish ---------------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        message: BaseModel,
        *,
        msg_id: str | None = None,
        trace: dict[str, str] | None = None,
    ) -> api.PubAck:
        """Encode ``message`` in an envelope and publish it to JetStream; returns the stream's ack.

        ``msg_id`` is the dedupe id (default: the envelope's fresh id). ``trace`` is the W3C trace
        context to continue; when missing, the task's current one (``mesh.tracing``), else a new trace.
        """
        data, headers = await self._encode(message, msg_id, trace)
        return await self.publish_raw(subject, data, headers=headers)

    async def _encode(self, message: BaseModel, msg_id: str | None,
                      trace: dict[str, str] | None) -> tuple[bytes, dict[str, str]]:
        """The envelope (claim-checked when too big) and its headers."""
        envelope_id = new_id()
        trace = trace or trace_context()
        data = encode(message, msg_id=envelope_id, trace=trace, max_bytes=self.settings.max_message_bytes)
        if len(data) > self.settings.claim_check_bytes:
            data = await self._claim_check(data)
        return data, {MSG_ID_HEADER: msg_id or envelope_id, **trace}

    async def publish_raw(self, subject: str, data: bytes, *, headers: dict[str, str] | None = None) -> api.PubAck:
        """JetStream publish of ready bytes, with the bus' error mapping."""
        # nats-py checks the payload alone, the server payload + headers: a message over the limit by its
        # headers would reach the server, which answers by closing the whole connection.
        _check_payload(subject, len(data) + _headers_size(headers), self._nc.max_payload)
        try:
            return await self._js.publish(subject, data, headers=headers)
        except nats.errors.MaxPayloadError as exc:  # refused before sending: no retry can help
            raise PayloadRefused(f"publish to {subject} refused: {len(data)} bytes exceed the server's "
                                 f"max_payload of {self._nc.max_payload} bytes") from exc
        except NoStreamResponseError as exc:
            if self.topology.takes(subject):  # a stream leader election in a cluster: it passes
                raise PublishError(f"publish to {subject}: JetStream did not answer (no stream leader "
                                   "right now?)") from exc
            raise NoStreamForSubject(f"publish to {subject}: no stream takes this subject") from exc
        except nats.errors.ConnectionClosedError as exc:
            raise NotConnected(f"publish to {subject}: the connection is closed") from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise PublishError(f"publish to {subject} was not acknowledged: {exc!r}") from exc

    def _event_subject(self, event: EventBase) -> str:
        """The only place an event's subject is made: its goal, this bus's role, its type."""
        if self.role is None:
            raise ConfigError(f"bus {self.name!r} was connected without a role (Bus.connect(role=...)): "
                              "it cannot emit events")
        return self.topology.event_subject(event.goal_id, self.role, event.type)  # type: ignore[attr-defined]

    async def emit(self, event: EventBase, *, trace: dict[str, str] | None = None) -> None:
        """Publish an event on its goal's event subject under this bus's role; deduped by ``event_id``.
        ``trace``: as ``publish`` (default: the task's current trace context, ``mesh.tracing.current``)."""
        await self.publish(self._event_subject(event), event, msg_id=event.event_id, trace=trace)

    async def prepare(self, event: EventBase) -> PreparedEvent:
        """An event encoded now (its subject, envelope and the current trace context) to be sent later
        by ``send_async``: ``mesh.bus.outbox.Outbox`` encodes each event as it is emitted, so a bad one
        fails where it is made, and sends them in batches."""
        subject = self._event_subject(event)
        data, headers = await self._encode(event, event.event_id, None)
        _check_payload(subject, len(data) + _headers_size(headers), self._nc.max_payload)
        return PreparedEvent(subject, data, headers)

    async def send_async(self, event: PreparedEvent) -> asyncio.Future[api.PubAck]:
        """Send a prepared event without waiting for its ack: the future resolves with the stream's ack.
        Whoever calls this owns the future (``mesh.bus.outbox.Outbox`` awaits or cancels it)."""
        try:
            return await self._js.publish_async(event.subject, event.data, headers=event.headers)
        except nats.errors.ConnectionClosedError as exc:
            raise NotConnected(f"publish to {event.subject}: the connection is closed") from exc
        except nats.errors.Error as exc:
            raise PublishError(f"publish to {event.subject} failed: {exc!r}") from exc

    async def submit_goal(self, goal: Goal) -> None:
        await self.publish(self.topology.goal_subject(), goal, msg_id=goal.goal_id)

    async def dispatch(self, task: Task, *, trace: dict[str, str] | None = None) -> bool:
        """Publish a task to its role; False when the stream already had it (a duplicate task id).
        ``NoStreamForSubject`` when the role is no worker role of the topology: nothing would take it.
        ``trace``: the goal's trace context, which the step's spans continue."""
        role = task.step.role
        try:
            ack = await self.publish(self.topology.task_subject(role), task, msg_id=task.task_id, trace=trace)
        except NoStreamForSubject as exc:
            raise NoStreamForSubject(
                f"no worker serves role {role!r}: {self.topology.task_subject(role)} has no stream (the tasks "
                f"stream takes the worker roles of the role specs: {', '.join(self.topology.task_roles)})") from exc
        return not ack.duplicate

    # --- receive ---------------------------------------------------------------------------

    async def open(self, msg: Msg, *, majors: tuple[int, ...] = (SCHEMA_MAJOR,)) -> Envelope:
        """Decode a received message; a claim-check reference is fetched and put back as the body.

        Raises ``CodecError`` for bytes that are not an envelope or a claim that cannot be resolved.
        """
        limit = self.settings.max_message_bytes
        envelope = open_envelope(msg.data, max_bytes=limit, majors=majors)
        if envelope.claim is not None:
            if envelope.claim.size > limit:  # what the reference says; get_blob checks what is stored
                raise MessageTooLarge(envelope.claim.size, limit)
            try:
                body = await self.get_blob(envelope.claim.digest, max_bytes=limit)
            except BlobNotFound as exc:
                raise CodecError(f"claim-check body {envelope.claim.digest} is missing: {exc}") from exc
            envelope.body, envelope.claim = decode_body(body), None
            envelope.size += len(body)
        return envelope

    async def open_event(self, msg: Msg) -> Event:
        """A message of the event stream as an event, of the current schema major or an earlier one still in
        the history (``EVENT_HISTORY_MAJORS``). ``ContractError`` when it is none."""
        return event_of(await self.open(msg, majors=EVENT_HISTORY_MAJORS))

    async def watch_events(self, goal_id: str | None = None, *, from_start: bool = True) -> AsyncGenerator[Event, None]:
        """Decoded events of one goal (or all) in stream order: ``events`` without the sequences."""
        async with contextlib.aclosing(self.events(goal_id, from_seq=1 if from_start else None)) as feed:
            async for _, event in feed:
                yield event

    async def events(self, goal_id: str | None = None, *,
                     from_seq: int | None = 1) -> AsyncGenerator[tuple[int, Event], None]:
        """(stream sequence, event) of one goal (or all), in stream order, from sequence ``from_seq`` on
        (``None``: only events published from now on). Resume after sequence ``n`` with ``from_seq=n + 1``:
        no gap, no duplicate.

        An ordered ephemeral consumer, which recreates itself after the last sequence it delivered when
        it misses a message or heartbeats, so a watch survives reconnects and server restarts.
        Undecodable events, and events their subject's role cannot have emitted (``Topology.forged``), are
        logged and skipped. Close the iterator (``contextlib.aclosing``) to
        remove the consumer.
        """
        async with contextlib.aclosing(self._event_messages(goal_id, from_seq)) as feed:
            async for msg, event in feed:
                if event is not None:
                    yield msg.metadata.sequence.stream, event

    async def _event_messages(self, goal_id: str | None,
                              from_seq: int | None) -> AsyncGenerator[tuple[Msg, Event | None], None]:
        """Each message of ``events`` with its event (None when undecodable, or when its subject's role
        cannot have emitted it: ``Topology.forged``; logged)."""
        if from_seq is None:
            config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.NEW)
        elif from_seq <= 1:
            config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
        else:
            config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=from_seq)
        sub = await self._js.subscribe(self.topology.events_filter(goal_id), stream=self.topology.events_stream,
                                      ordered_consumer=True, idle_heartbeat=1.0, config=config)
        try:
            async for msg in sub.messages:
                try:
                    event: Event | None = await self.open_event(msg)
                except ContractError as exc:
                    log.warning("skipping undecodable event on %s: %s", msg.subject, exc)
                    event = None
                if event is not None and (reason := self.topology.forged(msg.subject, event)):
                    log.warning("skipping forged event on %s: %s", msg.subject, reason)
                    event = None
                yield msg, event
        finally:
            if not self._nc.is_closed:
                await sub.unsubscribe()

    async def history(self, goal_id: str, *, timeout: float = 30.0) -> list[tuple[int, Event]]:
        """(stream sequence, event) of every event of one goal stored now, in order: a snapshot that ends,
        unlike ``events``. Read with the same ordered consumer (all a read-only user such as the gateway may
        create) up to the message after which the server has none pending; the goal's stored message count,
        asked first, returns a goal without events at once instead of waiting for one."""
        stored = await self.subject_counts(self.topology.events_stream, self.topology.events_filter(goal_id))
        out: list[tuple[int, Event]] = []
        if not sum(stored.values()):
            return out
        try:
            async with asyncio.timeout(timeout), contextlib.aclosing(self._event_messages(goal_id, 1)) as feed:
                async for msg, event in feed:
                    if event is not None:
                        out.append((msg.metadata.sequence.stream, event))
                    if not msg.metadata.num_pending:
                        break
        except TimeoutError as exc:
            raise BusError(f"reading the {len(out)}+ events of goal {goal_id} took over {timeout:g} s") from exc
        return out

    # --- objects and KV --------------------------------------------------------------------

    async def put_blob(self, data: bytes, *, media_type: str = "application/octet-stream",
                       name: str = "", bucket: str | None = None) -> ArtifactRef:
        """Store bytes under their sha256 (a blob of several chunks: skipped when already there) and return
        the reference.
        ``bucket``: an object store other than the artifacts (``topology.obj_models``)."""
        digest = sha256_hex(data)
        bucket = bucket or self.topology.obj_artifacts
        try:
            if 0 < len(data) <= OBJ_DEFAULT_CHUNK_SIZE:
                await self._put_chunk(bucket, data, digest, media_type, name)
            elif await self._blob_meta(bucket, digest, direct=True) is None:
                store = await self.object_store(bucket)
                await store.put(digest, data, meta=api.ObjectMeta(name=digest, description=name or None,
                                                                  headers={"Content-Type": media_type}))
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"storing blob {digest} ({len(data)} bytes) failed: {exc!r}") from exc
        return ArtifactRef(digest=digest, media_type=media_type, size=len(data), name=name)

    async def get_blob(self, digest: str, *, bucket: str | None = None, max_bytes: int | None = None) -> bytes:
        """The bytes stored under ``digest``, verified against it. ``max_bytes``: a larger object is refused
        (``MessageTooLarge``) from its info, before any of it is fetched (a one-chunk blob, ≤ 128 KiB, once read)."""
        bucket = bucket or self.topology.obj_artifacts
        stream = OBJ_STREAM_TEMPLATE.format(bucket=bucket)
        try:
            # A one-chunk blob stored by ``put_blob`` has its chunk under its digest: one read, no meta.
            with contextlib.suppress(NotFoundError):
                chunk = await self._js.get_last_msg(stream, OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=digest),
                                                    direct=True)
                data = bytes(chunk.data or b"")
                if sha256_hex(data) == digest:  # else (stored otherwise, or damaged): the meta decides below
                    if max_bytes is not None and len(data) > max_bytes:
                        raise MessageTooLarge(len(data), max_bytes)
                    return data
            # A replica that has not caught up may miss a blob just stored: the stream leader confirms a miss.
            info = (await self._blob_meta(bucket, digest, direct=True)
                    or await self._blob_meta(bucket, digest, direct=False))
            if info is None:
                raise BlobNotFound(f"no blob {digest} in {bucket}")
            if max_bytes is not None and (info.size or 0) > max_bytes:
                raise MessageTooLarge(info.size or 0, max_bytes)
            if info.chunks == 1 and not info.is_link():
                # One chunk (every blob up to 128 KiB): read it directly instead of through an ordered
                # consumer, which costs a consumer create and delete on the server per read.
                chunk = await self._js.get_last_msg(stream, OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=info.nuid),
                                                   direct=True)  # object stores allow direct gets
                data = bytes(chunk.data or b"")
            else:
                data = bytes((await (await self.object_store(bucket)).get(digest)).data or b"")
        except (ObjectNotFoundError, NotFoundError) as exc:
            raise BlobNotFound(f"no blob {digest} in {bucket}") from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"reading blob {digest} failed: {exc!r}") from exc
        if sha256_hex(data) != digest:
            raise BusError(f"blob {digest} failed its digest check ({len(data)} bytes read)")
        return data

    async def _put_chunk(self, bucket: str, data: bytes, digest: str, media_type: str, name: str) -> None:
        """A blob of one chunk, written as ``ObjectStore.put`` writes it (chunk, then the meta that points
        at it), but without its existence lookup first: the two go out in one write and their acks are
        awaited together. The stream stores them in that order, so a reader never finds the meta before
        its chunk. The chunk's subject is the digest (where ``ObjectStore.put`` takes a random nuid), so
        ``get_blob`` reads it without the meta; both are rollups, so storing the same bytes again replaces
        them and leaves nothing unreferenced."""
        nuid = digest
        sha = base64.urlsafe_b64encode(bytes.fromhex(digest)).decode()
        info = api.ObjectInfo(name=digest, description=name or None, headers={"Content-Type": media_type},
                              bucket=bucket, nuid=nuid, size=len(data), chunks=1, mtime=datetime.now(UTC).isoformat(),
                              options=api.ObjectMetaOptions(max_chunk_size=OBJ_DEFAULT_CHUNK_SIZE),
                              digest=OBJ_DIGEST_TEMPLATE.format(digest=sha))
        meta = OBJ_META_PRE_TEMPLATE.format(bucket=bucket, obj=base64.urlsafe_b64encode(digest.encode()).decode())
        await together(self._js.publish(OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=nuid), data,
                                        headers={api.Header.ROLLUP: MSG_ROLLUP_SUBJECT}),
                       self._js.publish(meta, json.dumps(info.as_dict()).encode(),
                                        headers={api.Header.ROLLUP: MSG_ROLLUP_SUBJECT}))

    async def _blob_meta(self, bucket: str, digest: str, *, direct: bool) -> api.ObjectInfo | None:
        """A blob's meta, None when there is none: what ``ObjectStore.get_info`` reads, but optionally by
        a direct get, which the server answers without a JSON API request and the client reads without
        decoding base64 and headers — it was the largest share of a blob lookup's CPU on both sides."""
        subject = OBJ_META_PRE_TEMPLATE.format(bucket=bucket, obj=base64.urlsafe_b64encode(digest.encode()).decode())
        try:
            msg = await self._js.get_last_msg(OBJ_STREAM_TEMPLATE.format(bucket=bucket), subject, direct=direct)
        except NotFoundError:
            return None
        try:
            info = api.ObjectInfo.from_response(json.loads(msg.data or b""))
        except (ValueError, KeyError, TypeError) as exc:
            raise BusError(f"blob {digest} has unreadable meta: {exc!r}") from exc
        return None if info.deleted else info

    # --- stream and consumer state -------------------------------------------------------------

    async def stream_state(self, stream: str) -> StreamState:
        try:
            info = await self._js.stream_info(stream)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot read the state of {stream}: {exc!r}") from exc
        return StreamState(name=info.config.name or stream, created=info.created, first_seq=info.state.first_seq,
                           last_seq=info.state.last_seq, messages=info.state.messages)

    async def subject_counts(self, stream: str, subjects: str) -> dict[str, int]:
        """Messages stored per subject of ``stream`` matching the filter ``subjects``."""
        try:
            info = await self._js.stream_info(stream, subjects_filter=subjects)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot count the messages of {stream}: {exc!r}") from exc
        return dict(info.state.subjects or {})

    async def consumers(self, stream: str) -> list[ConsumerState]:
        """The backlog of every consumer on ``stream``."""
        try:
            infos = await self._js.consumers_info(stream)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot list the consumers of {stream}: {exc!r}") from exc
        return [ConsumerState(name=i.name, pending=i.num_pending or 0, in_flight=i.num_ack_pending or 0,
                              redelivered=i.num_redelivered or 0) for i in infos]

    async def kv_get(self, bucket: str, key: str, *, direct: bool = False) -> KvEntry | None:
        """The key's latest value, or None when it does not exist (or was deleted). ``direct``: see ``kv``."""
        kv = await self.kv(bucket, direct=direct)
        try:
            entry = await kv.get(key)
        except NotFoundError:  # KeyNotFoundError and KeyDeletedError are NotFoundErrors
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"reading {bucket}/{key} failed: {exc!r}") from exc
        assert entry.revision is not None
        return KvEntry(key, entry.value or b"", entry.revision)

    async def kv_create(self, bucket: str, key: str, value: bytes) -> int | None:
        """Store a new key; its revision, or None when the key exists already."""
        kv = await self.kv(bucket)
        try:
            return await kv.create(key, value)
        except KeyWrongLastSequenceError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"creating {bucket}/{key} failed: {exc!r}") from exc

    async def kv_swap(self, bucket: str, key: str, value: bytes, *, revision: int) -> int | None:
        """Compare-and-swap: write only if ``revision`` is still the key's latest. The new revision, or
        None when someone wrote since."""
        kv = await self.kv(bucket)
        try:
            return await kv.update(key, value, last=revision)
        except KeyWrongLastSequenceError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"updating {bucket}/{key} failed: {exc!r}") from exc

    async def kv_put(self, bucket: str, key: str, value: bytes) -> int:
        """Unconditional write (heartbeats, pointers); the new revision."""
        kv = await self.kv(bucket)
        try:
            return await kv.put(key, value)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"writing {bucket}/{key} failed: {exc!r}") from exc

    async def kv_delete(self, bucket: str, key: str) -> None:
        kv = await self.kv(bucket)
        try:
            await kv.delete(key)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"deleting {bucket}/{key} failed: {exc!r}") from exc

    async def kv_keys(self, bucket: str) -> list[str]:
        kv = await self.kv(bucket)
        try:
            return list(await kv.keys())
        except NoKeysError:
            return []
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"listing {bucket} failed: {exc!r}") from exc

    async def kv_entries(self, bucket: str) -> list[KvEntry]:
        """Every live entry of a bucket (keys that vanish while it is read are left out)."""
        entries = await together(*(self.kv_get(bucket, key) for key in await self.kv_keys(bucket)))
        return [e for e in entries if e is not None]

    async def kv_watch(self, bucket: str, key: str = ">") -> AsyncGenerator[bytes, None]:
        """The key's value now (if any) and every later value written; deletes are skipped. The default
        key ``>`` watches every key of the bucket."""
        kv = await self.kv(bucket)
        try:
            watcher = await kv.watch(key)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot watch {bucket}/{key}: {exc!r}") from exc
        try:
            async for entry in watcher:
                if entry is not None and entry.operation is None and entry.value:
                    yield entry.value  # None: the "caught up" marker; an operation: a delete or purge
        finally:
            with contextlib.suppress(Exception):  # the connection may already be gone at shutdown
                await watcher.stop()

    async def kv(self, bucket: str, *, direct: bool = False) -> KeyValue:
        """A cached KV handle (``topology.kv_goals`` / ``topology.kv_nodes``). Its reads are answered by the
        stream's leader, or with ``direct`` by a direct get, which any replica may answer — no JSON API
        request on either side, but a follower can be a write behind (the bucket must allow direct gets:
        the goals bucket does)."""
        handle = self._kv.get((bucket, direct))
        if handle is None:
            await _cached(self._kv_checked, bucket, self._js.key_value, "KV bucket")  # the bucket exists
            # Built here, not taken from ``key_value``: that one reads directly whenever the bucket allows it.
            handle = self._kv[(bucket, direct)] = KeyValue(
                name=bucket, stream=KV_STREAM_TEMPLATE.format(bucket=bucket),
                pre=KV_PRE_TEMPLATE.format(bucket=bucket), js=self._js, direct=direct)
        return handle

    async def object_store(self, bucket: str) -> ObjectStore:
        """A cached object-store handle (``topology.obj_artifacts`` / ``topology.obj_models``)."""
        return await _cached(self._objects, bucket, self._js.object_store, "object store")

    async def _claim_check(self, data: bytes) -> bytes:
        envelope = open_envelope(data)
        ref = await self.put_blob(encode_body(envelope), media_type=CLAIM_MEDIA_TYPE, name=f"{envelope.kind}-body")
        return encode_claim(envelope, ref)


def event_of(envelope: Envelope) -> Event:
    """An opened envelope of the event stream as its event; ``ContractError`` when it is not one."""
    if envelope.kind != "event":
        raise SchemaViolation(f"a {envelope.kind!r} message on the event stream")
    event: Event = envelope.message()
    return event


async def _cached(cache: dict[str, H], bucket: str, opener: Callable[[str], Awaitable[H]], what: str) -> H:
    """Open a bucket handle once per bus; later calls reuse it."""
    handle = cache.get(bucket)
    if handle is None:
        try:
            handle = cache[bucket] = await opener(bucket)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"{what} {bucket} is not available: {exc!r}") from exc
    return handle


def _check_payload(subject: str, size: int, max_payload: int) -> None:
    if size > max_payload:
        raise PayloadRefused(f"publish to {subject} refused: {size} bytes exceed the server's "
                             f"max_payload of {max_payload} bytes")


def _headers_size(headers: dict[str, str] | None) -> int:
    """Bytes of the headers block as nats-py writes it (``NATS/1.0``, ``key: value`` lines, a blank line)."""
    if not headers:
        return 0
    return 12 + sum(len(k.encode()) + len(str(v).encode()) + 4 for k, v in headers.items())


def _auth_options(s: MeshSettings) -> dict[str, Any]:
    """Credentials and TLS for ``nats.connect`` from settings."""
    opts: dict[str, Any] = {"inbox_prefix": s.nats_inbox_prefix}
    if s.nats_user:
        opts["user"] = s.nats_user
    if s.nats_password:
        opts["password"] = s.nats_password.get_secret_value()
    if s.nats_token:
        opts["token"] = s.nats_token.get_secret_value()
    if s.nats_creds:
        opts["user_credentials"] = str(s.nats_creds)
    if s.nats_tls_ca or s.nats_tls_cert:
        ctx = ssl.create_default_context(cafile=str(s.nats_tls_ca) if s.nats_tls_ca else None)
        if s.nats_tls_cert:
            ctx.load_cert_chain(str(s.nats_tls_cert), str(s.nats_tls_key) if s.nats_tls_key else None)
        opts["tls"] = ctx
    return opts
