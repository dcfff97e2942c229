"""The sim world: role answers that the mesh can use, determinism, the quality model, faults."""

from __future__ import annotations

import itertools
import json

import jsonschema
import pytest

from mesh.backends.base import ChatMessage, ChatRequest, ToolSpec
from mesh.backends.sim import FaultPlan, SimBackend, SimWorld
from mesh.backends.sim.schema import conform
from mesh.contracts import Plan
from mesh.errors import ConfigError, ContextTooLong, RateLimited
from mesh.packing import pack

ROLES = frozenset({"planner", "researcher", "coder", "reviewer", "tester", "synthesizer"})
FS_WRITE = ToolSpec(name="fs.write", description="Write a file", parameters={
    "type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
    "required": ["path", "content"]})


def _req(role: str, *, previous_review: str | None = None, brief: str = "Build me a login system",
         **kw: object) -> ChatRequest:
    packed = pack(system=f"ROLE: {role}\nYou are the {role}.", constraints=["Use Python 3.11", "No plaintext passwords"],
                  brief=brief, instruction=f"Do the {role} step", acceptance=["done"],
                  inputs=[("implement-1", "def login(): ...", 1)], memory="", window=100_000, output_reserve=4096,
                  feedback=[("review-1/review", previous_review, 9)] if previous_review is not None else [])
    return ChatRequest(messages=packed.messages, **kw)  # type: ignore[arg-type]


def _reply(world: SimWorld, req: ChatRequest, tier: str = "long_context"):  # type: ignore[no-untyped-def]
    return world.reply(req, world.tiers[tier])


def _roles_switches(steps: list[dict[str, object]]) -> int:
    return sum(1 for a, b in itertools.pairwise(steps) if a["role"] != b["role"])


def test_planner_plan_is_a_valid_dag_with_parallel_research() -> None:
    reply = _reply(SimWorld(quality=1.0), _req("planner"))
    data = json.loads(reply.text)
    assert data["simulated"] is True
    plan = Plan(goal_id="g1", steps=data["steps"], rationale=data["rationale"])
    layers = plan.check(ROLES)
    assert len(plan.steps) >= 8
    assert len(layers[0]) >= 2 and all(s.startswith("research-") for s in layers[0])  # parallel fan-out
    by_id = {s.step_id: s for s in plan.steps}
    review = next(s for s in plan.steps if s.role == "reviewer")
    assert any(by_id[d].role == "coder" for d in review.depends_on)
    assert any(s.role == "tester" for s in plan.steps) and plan.steps[-1].role == "synthesizer"
    assert layers[-1] == [plan.steps[-1].step_id]


@pytest.mark.parametrize("how", ["metadata", "goal text"])
def test_planner_makes_bigger_plans_on_request(how: str) -> None:
    req = _req("planner", metadata={"sim_plan_steps": 24}) if how == "metadata" else \
        _req("planner", brief="Build me a login system in 24 steps")
    steps = json.loads(_reply(SimWorld(), req).text)["steps"]
    Plan(goal_id="g1", steps=steps).check(ROLES)
    assert len(steps) == 24 and _roles_switches(steps) >= 4


def test_coder_writes_files_with_tools_then_summarises() -> None:
    world = SimWorld()
    req = _req("coder", tools=[FS_WRITE])
    first = _reply(world, req)
    assert first.finish_reason == "tool_calls" and 2 <= len(first.tool_calls) <= 3
    paths = [c.arguments["path"] for c in first.tool_calls]
    assert all(c.name == "fs.write" for c in first.tool_calls)
    assert any(p.startswith("src/") for p in paths) and any(p.startswith("tests/test_") for p in paths)
    assert "Constraint: Use Python 3.11" in first.tool_calls[0].arguments["content"]
    results = [ChatMessage(role="tool", tool_call_id=c.id, content=f"wrote {c.arguments['path']}")
               for c in first.tool_calls]
    assistant = ChatMessage(role="assistant", tool_calls=first.tool_calls)
    second = _reply(world, req.model_copy(update={"messages": [*req.messages, assistant, *results]}))
    assert second.finish_reason == "stop" and not second.tool_calls
    assert second.text.startswith("[simulated]") and all(p in second.text for p in paths)
    no_tools = _reply(world, _req("coder"))
    assert "```" in no_tools.text and not no_tools.tool_calls


def test_reviewer_requests_changes_first_and_approves_a_good_revision() -> None:
    world = SimWorld(quality=1.0)
    first = json.loads(_reply(world, _req("reviewer")).text)
    assert first["verdict"] == "changes_requested" and len(first["notes"]) >= 2
    assert all(isinstance(n, str) and n for n in first["notes"])
    revised = json.loads(_reply(world, _req("reviewer", previous_review=json.dumps(first))).text)
    assert revised["verdict"] == "approve"
    weak = json.loads(_reply(SimWorld(quality=0.0), _req("reviewer", previous_review="x")).text)
    assert weak["verdict"] == "changes_requested"  # a quality failure shows as another round
    forced = json.loads(_reply(world, _req("reviewer", metadata={"sim_review": "approve"})).text)
    assert forced["verdict"] == "approve"


def test_tester_report_reflects_quality() -> None:
    assert "Result: PASS" in _reply(SimWorld(quality=1.0), _req("tester")).text
    assert "Result: FAIL" in _reply(SimWorld(quality=0.0), _req("tester")).text


@pytest.mark.parametrize("role", ["researcher", "synthesizer", "translator"])
def test_prose_roles_are_labelled_and_on_topic(role: str) -> None:
    text = _reply(SimWorld(), _req(role)).text
    assert text.startswith("[simulated]") and "login system" in text


def test_answers_are_deterministic_per_seed_and_content() -> None:
    req = _req("planner", thinking=True)
    a, b = _reply(SimWorld(seed=7), req), _reply(SimWorld(seed=7), req)
    assert (a.text, a.reasoning, a.usage.prompt_tokens) == (b.text, b.reasoning, b.usage.prompt_tokens)
    assert a.reasoning and a.reasoning.startswith("[simulated]")
    assert _reply(SimWorld(seed=8), req).text != a.text  # difficulties are drawn from the seed


def test_json_schema_is_honoured() -> None:
    schema = {"type": "object", "required": ["verdict", "notes", "score"], "additionalProperties": False,
              "properties": {"verdict": {"enum": ["approve", "changes_requested"]},
                             "notes": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                             "score": {"type": "integer", "minimum": 1, "maximum": 5}}}
    for role in ("reviewer", "researcher", "planner"):
        value = json.loads(_reply(SimWorld(), _req(role, json_schema=schema)).text)
        jsonschema.validate(value, schema)
    plan_schema = Plan.model_json_schema()
    value = json.loads(_reply(SimWorld(), _req("planner", json_schema=plan_schema)).text)
    jsonschema.validate(value, plan_schema)


def test_conform_handles_refs_unions_and_bounds() -> None:
    schema = {"$defs": {"Item": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}},
                                 "required": ["n"]}},
              "type": "object", "required": ["items", "name", "maybe"],
              "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 2},
                             "name": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5},
                             "maybe": {"anyOf": [{"type": "null"}, {"type": "number"}]}}}
    value = conform(schema, {"items": [{"n": 1}], "name": "Not Valid!", "maybe": 2.5})
    jsonschema.validate(value, schema)
    assert value["maybe"] == 2.5


def test_quality_model_depends_on_window_fill_difficulty_and_thinking() -> None:
    world = SimWorld()
    edge, lc = world.tiers["edge"], world.tiers["long_context"]
    easy = ChatRequest(messages=[ChatMessage(role="user", content="x")], metadata={"difficulty": 0.1})
    hard = easy.model_copy(update={"metadata": {"difficulty": 0.9}})
    assert world.success_probability(easy, lc, 100) > world.success_probability(hard, lc, 100)
    assert world.success_probability(hard, lc, 100) > world.success_probability(hard, edge, 100)
    assert world.success_probability(easy, edge, 100) > world.success_probability(easy, edge, 8000)  # crowded
    thinking = hard.model_copy(update={"thinking": True})
    assert world.success_probability(thinking, lc, 100) > world.success_probability(hard, lc, 100)


def test_context_too_long_for_the_tier() -> None:
    world = SimWorld()
    big = ChatRequest(messages=[ChatMessage(role="user", content="word " * 20_000)])
    with pytest.raises(ContextTooLong, match="maximum context length"):
        world.reply(big, world.tiers["edge"])
    assert world.reply(big, world.tiers["long_context"]).usage.prompt_tokens > 8192


def test_usage_prices_and_prefix_cache() -> None:
    world = SimWorld()
    req = _req("researcher")
    first, second = _reply(world, req), _reply(world, req)
    assert first.usage.cached_tokens == 0 < second.usage.cached_tokens  # the system prompt is cached
    assert 0 < second.usage.cost_usd < first.usage.cost_usd


def test_fault_specs() -> None:
    plan = FaultPlan.from_spec("429:0.5,cut:0.25,retry_after:1.5", seed=3)
    assert plan.retry_after == 1.5 and plan.describe() == {"*": "429:0.5,cut:0.25"}
    drawn = [plan.draw("edge") for _ in range(2000)]
    assert 0.45 < drawn.count("429") / 2000 < 0.55 and 0.2 < drawn.count("cut") / 2000 < 0.3
    plan.set("503:1", "swarm", limit=2)
    assert [plan.draw("swarm") for _ in range(3)] == ["503", "503", None]  # the storm ends by itself
    for bad in ("429", "teapot:0.1", "429:2", "429:0.6,500:0.6"):
        with pytest.raises(ConfigError):
            FaultPlan.from_spec(bad)


async def test_sim_backend_in_process_faults_and_latency() -> None:
    world = SimWorld(latency_scale=0, faults=FaultPlan.from_spec("429:1,retry_after:0.7"))
    backend = SimBackend(world.tiers["edge"], world)
    with pytest.raises(RateLimited) as info:
        await backend.chat(_req("researcher"), timeout=5)
    assert info.value.retry_after == 0.7 and info.value.tier == "edge"
    world.faults.set("")
    resp = await backend.chat(_req("researcher"), timeout=5)
    assert resp.simulated and resp.tier == "edge" and resp.usage.calls == 1 and resp.text.startswith("[simulated]")
