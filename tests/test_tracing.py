"""Traces: one trace per goal across every process (mesh/tracing.py, docs/TRACING.md).

- Off (no ``OTEL_EXPORTER_OTLP_ENDPOINT``): the OTel SDK is never imported, spans are one shared no-op,
  and still every message of a goal — the submission, its tasks, its events — carries the goal's trace id.
- On: real node processes export over OTLP/HTTP to a receiver in this test (protobuf decoded with
  opentelemetry-proto); one goal gives one trace: the goal span, a ``plan`` span, one ``invoke_agent``
  span per step under the goal span, ``chat`` spans with token usage under them, ``execute_tool`` spans.
"""

from __future__ import annotations

import asyncio
import gzip
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from nats.aio.msg import Msg

from mesh import tracing
from mesh.backends.gateway import CallRecord
from mesh.backends.tiers import TierConfig, load_tiers
from mesh.bus.client import Bus
from mesh.config import MeshSettings
from mesh.contracts import Goal, GoalCompleted, Plan, RouteDecision, Step, Usage, open_envelope
from mesh.metrics import Metrics
from mesh.roles import spans
from mesh.roles.calls import ModelCaller
from mesh.roles.goalstate import GoalState
from mesh.roles.goalstore import GoalStore
from mesh.roles.orchestrator import Orchestrator
from mesh.router.policy import RulePolicy
from tests import gatewaykit
from tests.meshkit import NodeProcess, http_receiver, in_process_mesh, node_env, role_specs, run_goal

ROOT = Path(__file__).resolve().parents[1]


def _trace_id(traceparent: str | None) -> int:
    parsed = tracing.parse(traceparent)
    assert parsed is not None, traceparent
    return parsed[0]


async def test_every_message_of_a_goal_carries_the_goal_trace_and_no_sdk_is_loaded(fast: MeshSettings,
                                                                                     bus: Bus) -> None:
    assert not tracing.on()
    goal = Goal(brief="Build me a login system")
    seen: list[Msg] = []
    ended = asyncio.Event()

    async def keep(msg: Msg) -> None:
        seen.append(msg)
        if msg.subject.endswith(".goal.completed"):
            ended.set()

    topo = bus.topology
    subs = [await bus._nc.subscribe(subject, cb=keep)
            for subject in (topo.goal_subject(), topo.task_subject(">"), topo.events_filter(goal.goal_id))]
    try:
        async with in_process_mesh(fast):
            events = await run_goal(bus, goal)
        await asyncio.wait_for(ended.wait(), 10)
    finally:
        for sub in subs:
            await sub.unsubscribe()
    assert isinstance(events[-1], GoalCompleted), events[-1]
    state = await GoalStore(bus).get(goal.goal_id)
    assert state is not None and state.traceparent is not None
    trace = _trace_id(state.traceparent)

    envelopes = [open_envelope(m.data) for m in seen]
    mine = [e for e in envelopes if e.goal_id == goal.goal_id]
    kinds = Counter(e.kind for e in mine)
    assert kinds["goal"] == 1 and kinds["task"] >= len(state.steps) and kinds["event"] > 3 * len(state.steps), kinds
    assert {_trace_id(e.trace.get("traceparent")) for e in mine} == {trace}, "one trace id for the whole goal"
    # the tasks name the goal span as their parent: the steps' spans are its children
    assert {e.trace["traceparent"] for e in mine if e.kind == "task"} == {state.traceparent}
    assert {m.headers["traceparent"] for m in seen if m.headers and open_envelope(m.data).goal_id == goal.goal_id} \
        == {e.trace["traceparent"] for e in mine}, "the NATS header and the envelope agree"
    assert not [m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))]


async def test_a_restarted_planner_redrives_a_step_in_the_goals_trace(bus: Bus, settings: MeshSettings) -> None:
    """The trace lives in the goal state, not in a process: a planner with nothing in memory (a restarted
    node, or another replica) that re-drives a dispatched step publishes its task and event in the goal's
    trace, the task naming the goal span as parent."""
    specs = role_specs()
    goal = Goal(brief="Build me a login system")
    state = GoalState(goal=goal, traceparent=tracing.new_traceparent())
    state.apply_plan(Plan(goal_id=goal.goal_id, steps=[Step(step_id="research", role="researcher",
                                                             instruction="look around")]))
    state.mark_dispatched("research")
    assert await GoalStore(bus).create(state)
    caller = ModelCaller(bus, load_tiers(settings), RulePolicy(), "planner-restarted", Metrics("planner"))
    try:
        await Orchestrator(bus, specs["planner"], specs, caller, GoalStore(bus), "planner-restarted").redrive(
            goal.goal_id)
    finally:
        await caller.gateway.aclose()
    topo = bus.topology
    for subject, stream in ((topo.task_subject("researcher"), topo.tasks_stream),
                            (topo.event_subject(goal.goal_id, "*", "step.dispatched"), topo.events_stream)):
        sub = await bus._js.pull_subscribe(subject, stream=stream)
        try:
            (msg,) = await sub.fetch(1, timeout=5)
        finally:
            await sub.unsubscribe()
        envelope = open_envelope(msg.data)
        assert envelope.trace["traceparent"] == state.traceparent == (msg.headers or {})["traceparent"], subject


def test_off_nothing_is_exported_and_the_sdk_is_not_imported() -> None:
    """A fresh interpreter without the endpoint: configure declines, spans are the shared no-op, a
    recorded span goes nowhere, and no OTel SDK or exporter module is ever imported."""
    code = textwrap.dedent("""
        import sys
        from mesh import tracing
        assert not tracing.configure("mesh-test", "n1")
        parent = tracing.new_traceparent()
        with tracing.span("invoke_agent coder", parent=parent) as outer:
            assert tracing.current() == parent  # the context still propagates
            with tracing.span("execute_tool fs.write") as inner:
                assert inner is tracing.NO_SPAN and tracing.active() is tracing.NO_SPAN
                inner.update({"a": 1})
        tracing.record("chat m", start_ns=0, end_ns=1, attributes={"x": 1})
        assert tracing.current() is None and not tracing.on()
        loaded = [m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))]
        assert not loaded, loaded
        print("ok")
    """)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}  # no OTEL_EXPORTER_OTLP_ENDPOINT
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_goal_traceparent_continues_the_submitters_trace() -> None:
    submitted = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    goal, parent = tracing.goal_traceparent({"traceparent": submitted})
    assert goal.startswith("00-" + "a" * 32 + "-") and goal != submitted and tracing.parse(goal) is not None
    assert parent == "b" * 16, "a submitter inside a trace: the goal span is its span's child"
    fresh = tracing.trace_context()  # published outside any trace: a new one, marked as having no span
    goal, parent = tracing.goal_traceparent(fresh)
    assert parent is None and goal.split("-")[1] == fresh["traceparent"].split("-")[1]
    goal, parent = tracing.goal_traceparent({"traceparent": "garbage"})  # a fresh trace, never an error
    assert tracing.parse(goal) is not None and parent is None
    assert tracing.parse("00-" + "0" * 32 + "-" + "b" * 16 + "-01") is None  # all-zero ids are invalid
    assert tracing.valid(submitted + "\r\nX-Evil: 1") is None and tracing.valid(submitted.upper()) == submitted


@pytest.mark.parametrize(("kind", "model", "base_url", "expected"), [
    ("openai", "deepseek-v4-flash", "https://api.deepseek.com", "deepseek"),
    ("openai", "kimi-k2.6", "https://api.moonshot.ai/v1", "moonshot_ai"),
    ("anthropic", "kimi-k2.6", "https://api.moonshot.ai/anthropic", "anthropic"),
    ("openai", "gpt-5-mini", "https://api.openai.com/v1", "openai"),
    ("sim", "deepseek-v4-pro", None, "deepseek"),
])
def test_provider_names_follow_the_conventions(kind: str, model: str, base_url: str | None, expected: str) -> None:
    assert tracing.provider_name(kind, model, base_url) == expected


# --- exported, through real node processes ------------------------------------------------------


class Receiver:
    """An OTLP/HTTP trace receiver on loopback: every span of every export request, decoded."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest.FromString(body)
        self.requests += 1
        for resource_spans in export.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    self.spans.append({
                        "name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                        "parent": s.parent_span_id.hex(), "kind": s.kind, "service": resource.get("service.name"),
                        "scope": (scope_spans.scope.name, scope_spans.scope.version, scope_spans.schema_url),
                        "attrs": {a.key: _value(a.value) for a in s.attributes},
                        "start": s.start_time_unix_nano, "end": s.end_time_unix_nano})
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    async with http_receiver("/v1/traces", rec.handle) as url:
        yield rec, url


async def test_one_goal_is_one_trace_across_the_node_processes(fast: MeshSettings, bus: Bus, tmp_path: Path,
                                                              receiver: tuple[Receiver, str]) -> None:
    rec, endpoint = receiver
    env = node_env(fast, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_BSP_SCHEDULE_DELAY="200")
    nodes = [NodeProcess(role, env, tmp_path).start() for role in role_specs()]
    goal = Goal(brief="Build me a login system")
    caller = "00-" + "c" * 32 + "-" + "d" * 16 + "-01"  # this test, submitting inside a trace of its own
    try:
        with tracing.adopt(caller):
            events = await run_goal(bus, goal, timeout=240)
        for node in nodes:
            node.signal(signal.SIGTERM)
        for node in nodes:  # a node flushes its queued spans before it exits
            assert await node.wait(60) == 0, node.log()[-3000:]
    finally:
        for node in nodes:
            node.stop()
    assert isinstance(events[-1], GoalCompleted), events[-1]
    state = await GoalStore(bus).get(goal.goal_id)
    assert state is not None and state.traceparent is not None
    trace_id, goal_span_id, _ = tracing.parse(state.traceparent) or (0, 0, 0)
    assert trace_id == int("c" * 32, 16), "the goal joined its submitter's trace"

    spans = [s for s in rec.spans if s["attrs"].get("mesh.goal.id") == goal.goal_id or s["trace_id"] ==
             f"{trace_id:032x}"]
    assert {s["trace_id"] for s in spans} == {f"{trace_id:032x}"}, "one goal, one trace"
    by_id = {s["span_id"]: s for s in spans}
    assert len(by_id) == len(spans), "no span exported twice"
    assert all(s["scope"] == ("mesh", tracing.GENAI_SEMCONV_VERSION, tracing.GENAI_SEMCONV_URL) for s in spans)

    # the goal span: under the ids the goal state chose at planning, from start to end, a child of the
    # submitter's span (the test's: not exported) — the root of everything the mesh did
    (root,) = [s for s in spans if s["name"] == "invoke_workflow mesh"]
    assert root["span_id"] == f"{goal_span_id:016x}" and root["parent"] == "d" * 16 and root["service"] == "mesh-planner"
    assert root["attrs"]["mesh.goal.status"] == "completed" and root["attrs"]["gen_ai.operation.name"] == \
        "invoke_workflow"
    assert all(s["parent"] in by_id for s in spans if s is not root), "every other span's parent is in the trace"
    assert all(root["start"] <= s["start"] and s["end"] <= root["end"] + 10**9 for s in spans)

    # one invoke_agent span per step, each a child of the goal span, each in its role's process
    agents = [s for s in spans if s["name"].startswith("invoke_agent ")]
    assert Counter(s["attrs"]["mesh.step.id"] for s in agents) == Counter(set(state.steps)), \
        sorted(s["attrs"]["mesh.step.id"] for s in agents)
    for s in agents:
        role = state.steps[s["attrs"]["mesh.step.id"]].step.role
        assert s["name"] == f"invoke_agent {role}" and s["service"] == f"mesh-{role}" and s["parent"] == root["span_id"]
        assert s["attrs"]["gen_ai.agent.name"] == role and s["attrs"]["mesh.outcome"] == "completed"
        assert s["attrs"]["mesh.route.tier"] and s["attrs"]["gen_ai.provider.name"]

    # chat spans: under a step (or the planning), with the conventions' usage, provider, model and routing
    chats = [s for s in spans if s["name"].startswith("chat ")]
    assert {by_id[s["parent"]]["name"].split()[0] for s in chats} <= {"invoke_agent", "plan", "invoke_workflow"}
    # straight under the goal: only the planner's summaries of the goal memory
    assert {(c["attrs"]["mesh.step.id"], c["attrs"]["mesh.requester"]) for c in chats
            if c["parent"] == root["span_id"]} <= {("memory", "summariser")}
    assert {c["parent"] for c in chats} >= {a["span_id"] for a in agents}, "every step made a model call"
    for c in chats:
        a = c["attrs"]
        assert c["name"] == f"chat {a['gen_ai.request.model']}" and a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
        assert a["gen_ai.provider.name"] and a["gen_ai.response.model"] and a["mesh.simulated"] is True
        # routed: every call but the edge tier's summaries (of inputs that do not fit, of the goal memory)
        assert a["mesh.tier"] and ("mesh.route.propensity" in a) == (a["mesh.requester"] != "summariser"), a
    (plan,) = [s for s in spans if s["name"] == "plan planner"]
    assert plan["parent"] == root["span_id"] and any(c["parent"] == plan["span_id"] for c in chats)

    # tool calls: execute_tool spans under the step that made them
    tools = [s for s in spans if s["name"].startswith("execute_tool ")]
    assert tools and all(by_id[t["parent"]]["name"].startswith("invoke_agent ") for t in tools)
    assert {t["attrs"]["gen_ai.tool.name"] for t in tools} >= {"fs.write"}, Counter(t["name"] for t in tools)
    assert all(t["name"] == f"execute_tool {t['attrs']['gen_ai.tool.name']}" for t in tools)


def test_a_chat_span_says_provider_endpoint_usage_and_the_routing_behind_it() -> None:
    tier = TierConfig(name="long_context", kind="openai", base_url="https://api.deepseek.com/v1", model="deepseek-v4-pro",
                      context_window=128_000, output_reserve=8_000)
    rec = CallRecord(tier="long_context", model="deepseek-v4-pro", endpoint=tier.endpoint, latency_ms=900.0,
                     usage=Usage(prompt_tokens=1200, completion_tokens=400, reasoning_tokens=250, cached_tokens=800,
                                 cost_usd=0.01, calls=1),
                     outcome="ok", attempt=1, thinking=True, simulated=False, response_model="deepseek-v4-pro-0901",
                     finish_reason="stop")
    attrs = spans.chat(rec, tier, RouteDecision(tier="edge", propensity=0.25, explored=True), ("g1", "implement"))
    assert attrs["gen_ai.provider.name"] == "deepseek" and attrs["gen_ai.operation.name"] == "chat"
    assert (attrs["server.address"], attrs["server.port"]) == ("api.deepseek.com", 443)
    assert (attrs["gen_ai.request.model"], attrs["gen_ai.response.model"]) == ("deepseek-v4-pro", "deepseek-v4-pro-0901")
    assert attrs["gen_ai.usage.input_tokens"] == 1200 and attrs["gen_ai.usage.output_tokens"] == 400
    assert attrs["gen_ai.usage.reasoning.output_tokens"] == 250 and attrs["gen_ai.usage.cache_read.input_tokens"] == 800
    # routed to edge, answered by long_context: a fallback, and the decision that was made is on the span
    assert attrs["mesh.route.fallback"] is True and attrs["mesh.route.tier"] == "edge" and attrs["mesh.tier"] == "long_context"
    assert attrs["mesh.route.explored"] is True and attrs["mesh.route.propensity"] == 0.25
    assert attrs["mesh.simulated"] is False and "error.type" not in attrs


async def test_a_goal_submitted_inside_a_callers_trace_joins_it(fast: MeshSettings, bus: Bus,
                                                                eventually: Callable[..., Awaitable[None]]) -> None:
    """Through the gateway with a W3C ``traceparent`` header: the goal's trace is the caller's and the goal
    span a child of the caller's span; without one (or with a malformed one) the goal span is a root."""
    caller = "00-" + "c" * 32 + "-" + "d" * 16 + "-01"
    async with gatewaykit.gateway(fast, roles=False) as (gw, _), httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        ids = [(await http.post("/v1/goals", json={"brief": "Build me a login system"},
                                headers={"traceparent": tp} if tp else {})).json()["goal_id"]
               for tp in (caller, None, caller[:-2] + "zz")]
        specs = role_specs()
        async with in_process_mesh(fast, {"planner": 1}, specs):  # the planner takes the goals
            store = GoalStore(bus)

            async def all_planned() -> bool:
                return all([await store.get(gid) is not None for gid in ids])
            await eventually(all_planned, timeout=60)
    joined, plain, malformed = [await store.get(gid) for gid in ids]
    assert joined is not None and plain is not None and malformed is not None
    assert _trace_id(joined.traceparent) == int("c" * 32, 16) and joined.trace_parent == "d" * 16
    assert _trace_id(plain.traceparent) != int("c" * 32, 16) and plain.trace_parent is None
    assert _trace_id(malformed.traceparent) != int("c" * 32, 16) and malformed.trace_parent is None
