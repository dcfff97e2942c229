"""``mesh node <role>``: one role process.

Lifecycle: load and validate the role spec → connect and provision → serve /healthz, /readyz,
/metrics → announce node.up and heartbeat into KV ``mesh_nodes`` → run the role's consumers →
on SIGTERM/SIGINT stop fetching, let in-flight work finish within the grace period (what does not
finish is handed back to JetStream for another replica) → node.down → exit 0.

Every long-lived task is owned by one ``asyncio.TaskGroup``; nothing is fire-and-forget.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Protocol

from mesh import __version__, tracing
from mesh.aio import run_loop, unless_set
from mesh.backends.tiers import load_tiers
from mesh.bus.client import Bus
from mesh.bus.consumer import PullConsumer
from mesh.config import MeshSettings, get_settings
from mesh.contracts import SYSTEM_GOAL_ID, NodeDown, NodeUp, new_id
from mesh.errors import BusError, ConfigError, PublishError
from mesh.logs import setup_json_logging
from mesh.metrics import Metrics
from mesh.node.beats import HEARTBEAT_SECONDS, beat
from mesh.node.health import HealthServer
from mesh.node.preflight import load_role, spec_problems
from mesh.roles.spec import RoleSpec, feedback_kinds
from mesh.tools.sandbox import harden_process
from mesh.tools.sandbox import select as select_sandbox

if TYPE_CHECKING:
    from mesh.roles.calls import ModelCaller

log = logging.getLogger(__name__)
ANNOUNCE_ATTEMPTS = 5
LAST_WORDS_SECONDS = 2.0  # node.down and the heartbeat removal at shutdown, each


class DrainTimeout(Exception):
    """In-flight work outlived the grace period; cancelling it hands the messages back."""


class Stoppable(Protocol):
    @property
    def in_flight(self) -> int: ...

    def stop(self) -> None: ...

    async def run(self) -> None: ...


class Node:
    def __init__(self, spec: RoleSpec, specs: dict[str, RoleSpec], settings: MeshSettings,
                 on_serving: Callable[[], None] | None = None) -> None:
        self.spec = spec
        self.on_serving = on_serving  # called once the consumers are built, just before they start
        self.specs = specs
        self.settings = settings
        self.node_id = f"{spec.role}-{socket.gethostname()}-{os.getpid()}-{new_id()[:6]}"
        self.metrics = Metrics(spec.role)
        self.stop = asyncio.Event()
        self.bus: Bus | None = None
        self._stoppable: list[Stoppable] = []

    def ready(self) -> bool:
        return self.bus is not None and self.bus.connected and bool(self._stoppable)

    async def run(self) -> None:
        detail: dict[str, Any] = {}
        if "shell.run" in self.spec.tools:
            box = await asyncio.to_thread(select_sandbox, self.settings.sandbox)  # ConfigError if required and absent
            detail["sandbox"] = box.describe()
            if box.warning:
                log.warning(box.warning)
        health = HealthServer(self.metrics, self.ready, self.settings.health_host, self.settings.health_port,
                              detail=detail)
        # In Kubernetes the probes expect the configured port: a busy one stays an error there.
        port = await health.start(any_port_if_busy="KUBERNETES_SERVICE_HOST" not in os.environ)
        if port != self.settings.health_port and self.settings.health_port:
            log.warning("port %d is in use: serving /healthz, /readyz and /metrics on port %d instead",
                        self.settings.health_port, port)
        log.info("health endpoint on http://%s:%d", self.settings.health_host, port)
        try:
            async with await Bus.connect(self.settings, name=self.node_id, roles=[self.spec.role],
                                         role=self.spec.role) as bus:
                self.bus = bus
                await self._serve(bus)
        finally:
            await health.stop()

    async def _serve(self, bus: Bus) -> None:
        topo = bus.topology
        up = NodeUp(goal_id=SYSTEM_GOAL_ID, node=self.node_id, role=self.spec.role, host=socket.gethostname(),
                    pid=os.getpid(), version=__version__)
        await _announce(bus, up)
        runners: list[Callable[[], Coroutine[Any, Any, None]]] = []
        caller: ModelCaller | None = None
        if self.spec.kind == "recorder":
            from mesh.roles.recorder import Recorder

            recorder = Recorder(bus, self.settings, batch_size=self.spec.limits.batch_size)
            self._stoppable.append(recorder)
            runners.append(recorder.run)
        else:
            # Imported here: a recorder needs none of the model SDKs, the router's onnxruntime or the roles.
            from mesh.roles.calls import ModelCaller
            from mesh.roles.gates import GatePolicy
            from mesh.roles.goalstore import GoalStore
            from mesh.roles.hotswap import watch_models
            from mesh.roles.orchestrator import Orchestrator
            from mesh.roles.worker import Worker
            from mesh.router.runtime import default_router

            router = default_router(epsilon=self.settings.router_epsilon, model_path=self.settings.router_model)
            caller = ModelCaller(bus, load_tiers(self.settings), router, self.node_id, self.metrics)
            runners.append(lambda: watch_models(bus, router, self.stop))
            goals = GoalStore(bus)
            dlq = topo.dlq_subject(self.spec.role)
            if self.spec.kind == "orchestrator":
                gates = GatePolicy(self.settings.approval_timeout, self.settings.approval_on_timeout)
                orch = Orchestrator(bus, self.spec, self.specs, caller, goals, self.node_id, gates)
                self._stoppable += [
                    PullConsumer(bus, stream=topo.goals_stream, durable=topo.consumer_name(self.spec.role),
                                 handler=orch.on_goal, concurrency=self.spec.concurrency, dlq_subject=dlq,
                                 on_give_up=orch.give_up_goal),
                    PullConsumer(bus, stream=topo.events_stream, durable=topo.outcomes_consumer,
                                 handler=orch.on_step_event, concurrency=self.spec.concurrency, dlq_subject=dlq,
                                 on_give_up=orch.give_up_outcome),
                    PullConsumer(bus, stream=topo.control_stream, durable=topo.control_consumer,
                                 handler=orch.on_command, concurrency=self.spec.concurrency, dlq_subject=dlq,
                                 on_give_up=orch.give_up_command),
                ]
                runners.append(lambda: orch.sweep(self.stop))
            else:
                worker = Worker(bus, self.spec, caller, goals, self.node_id, feedback_kinds=feedback_kinds(self.specs))
                self._stoppable.append(
                    PullConsumer(bus, stream=topo.tasks_stream, durable=topo.consumer_name(self.spec.role),
                                 handler=worker.handle, concurrency=self.spec.concurrency, dlq_subject=dlq,
                                 on_give_up=worker.give_up))
            runners += [c.run for c in self._stoppable]
        reason = "shutdown"
        if self.on_serving is not None:
            self.on_serving()
        try:
            async with asyncio.TaskGroup() as tg:
                work = [tg.create_task(runner()) for runner in runners]
                tg.create_task(self._heartbeat(bus, caller))
                tg.create_task(self._drain_on_stop(work))
        except* DrainTimeout:
            reason = "drain timeout: unfinished work handed back to JetStream"
            log.warning(reason)
        except* BaseException as group:
            reason = f"crashed: {group.exceptions[0]!r}"
            raise
        finally:
            await self._last_words(bus, reason)
            if caller is not None:
                await caller.gateway.aclose()

    async def _last_words(self, bus: Bus, reason: str) -> None:
        """node.down and the heartbeat's removal, when a server is there to take them: against a dead
        server each would wait for its ack timeout (a killed ``mesh up`` took its nodes 20 s to exit),
        and the heartbeat's TTL says the same thing a little later."""
        if not bus.connected:
            log.info("not connected: no node.down; the heartbeat expires instead")
            return
        down = NodeDown(goal_id=SYSTEM_GOAL_ID, node=self.node_id, role=self.spec.role, reason=reason)
        with suppress(Exception):
            await asyncio.wait_for(bus.emit(down), LAST_WORDS_SECONDS)
        with suppress(Exception):
            await asyncio.wait_for(bus.kv_delete(bus.topology.kv_nodes, self.node_id), LAST_WORDS_SECONDS)

    async def _drain_on_stop(self, work: list[asyncio.Task[None]]) -> None:
        """On stop: no new fetches; in-flight work gets ``drain_seconds`` to finish."""
        await self.stop.wait()
        log.info("draining: no new work, waiting up to %.0fs for %d in-flight task(s)",
                 self.settings.drain_seconds, self.in_flight)
        for stoppable in self._stoppable:
            stoppable.stop()
        _, unfinished = await asyncio.wait(work, timeout=self.settings.drain_seconds)
        if unfinished:
            raise DrainTimeout()

    @property
    def in_flight(self) -> int:
        return sum(s.in_flight for s in self._stoppable)

    async def _heartbeat(self, bus: Bus, caller: ModelCaller | None) -> None:
        interval = min(HEARTBEAT_SECONDS, bus.topology.nodes_ttl / 3)
        while not self.stop.is_set():
            doc = beat(self.node_id, self.spec.role, socket.gethostname(), os.getpid(), __version__, self.in_flight,
                       every=interval, breakers=caller.gateway.breakers() if caller is not None else None)
            try:
                await unless_set(self.stop, bus.kv_put(bus.topology.kv_nodes, self.node_id, json.dumps(doc).encode()))
            except BusError as exc:  # a missed beat is not fatal; the next one may land
                log.warning("heartbeat failed: %s", exc)
            with suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), interval)


async def _announce(bus: Bus, up: NodeUp) -> None:
    """Publish node.up, retrying while the server is too busy to acknowledge in time: a node that just
    connected must not die of one slow ack (the fault suite's storms on a loaded machine saw it). The
    event keeps its id, so a retry whose first attempt did land is dropped as a duplicate."""
    for attempt in range(1, ANNOUNCE_ATTEMPTS + 1):
        try:
            await bus.emit(up)
            return
        except PublishError as exc:
            if attempt == ANNOUNCE_ATTEMPTS or not exc.retryable:
                raise
            log.warning("node.up not acknowledged (attempt %d of %d): %s", attempt, ANNOUNCE_ATTEMPTS, exc)
            await asyncio.sleep(0.5 * attempt)


def _stop_before_serving(signum: int, _: object) -> None:
    """SIGTERM/SIGINT before the node serves: nothing is in flight, so it exits at once. A Python-level
    handler runs between bytecodes, even while the loop is blocked for seconds importing the model SDKs
    (a killed `mesh up` once left its starting nodes alive for 20 s); once serving, the loop's handler
    drains instead."""
    log.info("%s before serving: nothing in flight, exiting", signal.Signals(signum).name)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(0)


def run_node(role: str, settings: MeshSettings | None = None) -> int:
    """Entry point of ``mesh node <role>``; returns the process exit code. The preflight's findings
    (``mesh node <role> --check``) stop the node before it serves anything."""
    settings = settings or get_settings()
    spec, specs = load_role(role)
    if problems := spec_problems(spec, settings):
        raise ConfigError(f"node {role} cannot start:\n  " + "\n  ".join(problems))
    setup_json_logging(settings.log_level, role=role)
    if settings.allow_sim and spec.kind != "recorder":
        sims = [t for t, cfg in load_tiers(settings).items() if cfg.simulated]
        if sims:
            log.warning("tiers %s are SIMULATED (MESH_ALLOW_SIM=1): their outputs are not a real model's",
                        ", ".join(sims))
    # A node process is non-dumpable (a same-uid tool run cannot read its environment) and the subreaper
    # of whatever a run leaves behind; not in Node.run, which tests also run inside the test process.
    harden_process()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_before_serving)

    def drain_on_signals() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, node.stop.set)

    node = Node(spec, specs, settings, on_serving=drain_on_signals)
    if tracing.configure(f"mesh-{role}", node.node_id):
        log.info("exporting traces over OTLP/HTTP to %s", os.environ[tracing.ENDPOINT_ENV])

    async def main() -> None:
        await node.run()

    try:
        run_loop(main())
    finally:
        tracing.shutdown()  # the spans still queued go out before the process ends
    return 0

