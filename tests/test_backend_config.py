"""Tier configuration, price accounting, provider dialects and HTTP error classification."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mesh.backends.base import ChatMessage, ChatRequest, ToolNames, ToolSpec
from mesh.backends.openai_compat import OpenAIBackend, dialect_for
from mesh.backends.status import classify
from mesh.backends.tiers import KNOWN_MODELS, Prices, is_simulated, load_tiers
from mesh.errors import (
    AuthenticationFailed,
    BadRequest,
    ConfigError,
    ContextTooLong,
    InsufficientBalance,
    Overloaded,
    RateLimited,
    ServerError,
)


def test_defaults_are_sim_tiers_with_real_class_profiles() -> None:
    tiers = load_tiers(environ={})
    assert set(tiers) == {"edge", "long_context", "swarm"}
    assert all(t.kind == "sim" for t in tiers.values()) and is_simulated(tiers)
    assert tiers["edge"].context_window < tiers["swarm"].context_window < tiers["long_context"].context_window
    assert tiers["long_context"].prices == KNOWN_MODELS["deepseek-v4-pro"].prices
    assert tiers["swarm"].prices == KNOWN_MODELS["kimi-k2.6"].prices and tiers["swarm"].thinking


def test_env_configures_an_endpoint_with_known_model_defaults() -> None:
    env = {"MESH_TIER_LONG_CONTEXT_BASE_URL": "https://api.example/v1", "MESH_TIER_LONG_CONTEXT_MODEL": "deepseek-v4-flash",
           "MESH_TIER_LONG_CONTEXT_API_KEY_ENV": "DEEPSEEK_API_KEY", "MESH_TIER_EDGE_PRICE_OUTPUT": "0.5"}
    tiers = load_tiers(environ=env)
    lc = tiers["long_context"]
    assert (lc.kind, lc.model, lc.api_key_env) == ("openai", "deepseek-v4-flash", "DEEPSEEK_API_KEY")
    assert lc.prices == KNOWN_MODELS["deepseek-v4-flash"].prices and lc.context_window == 1_048_576
    assert tiers["edge"].prices.output == 0.5 and tiers["edge"].kind == "sim"
    assert not lc.simulated and is_simulated(tiers)  # edge and swarm are still sims
    assert "DEEPSEEK" not in repr(lc.api_key())  # the key is read from the env var, not stored


def test_tiers_file_and_env_precedence(tmp_path: Path) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text(
        '[tiers.swarm]\nkind = "anthropic"\nbase_url = "http://127.0.0.1:1"\nmodel = "my-model"\ncontext_window = 100000\n'
        '[tiers.swarm.prices]\ninput_miss = 1.0\noutput = 2.0\n[tiers.swarm.swarm]\nmax_sub_agents = 3\n'
    )
    tiers = load_tiers(environ={"MESH_TIERS_FILE": str(path), "MESH_TIER_SWARM_CONTEXT_WINDOW": "50000"})
    sw = tiers["swarm"]
    assert (sw.kind, sw.model, sw.context_window, sw.swarm.max_sub_agents) == ("anthropic", "my-model", 50000, 3)
    assert sw.prices == Prices(input_hit=0.0, input_miss=1.0, output=2.0)


@pytest.mark.parametrize("env", [
    {"MESH_TIER_EDGE_BASE_URL": "http://127.0.0.1:1/v1"},  # endpoint without a model
    {"MESH_TIER_EDGE_KIND": "openai", "MESH_TIER_EDGE_MODEL": "x"},  # endpoint without a URL
    {"MESH_TIER_EDGE_CONTEXT_WINDOW": "ten"},
])
def test_bad_config_is_a_clear_config_error(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="edge"):
        load_tiers(environ=env)


def test_price_accounting_splits_cache_hits() -> None:
    p = Prices(input_hit=0.1, input_miss=1.0, output=4.0)
    assert p.cost(prompt_tokens=1_000_000, cached_tokens=250_000, completion_tokens=500_000) == pytest.approx(
        0.025 + 0.75 + 2.0)


def test_tool_names_round_trip_through_the_wire_form() -> None:
    names = ToolNames([ToolSpec(name="fs.write"), ToolSpec(name="shell.run")])
    assert names.wire("fs.write") == "fs_write" and names.mesh("fs_write") == "fs.write"
    with pytest.raises(BadRequest, match="collide"):
        ToolNames([ToolSpec(name="fs.write"), ToolSpec(name="fs_write")])


def _params(model: str, base_url: str, req: ChatRequest) -> dict[str, object]:
    env = {"MESH_TIER_SWARM_BASE_URL": base_url, "MESH_TIER_SWARM_MODEL": model}
    backend = OpenAIBackend(load_tiers(environ=env)["swarm"])
    return backend._params(req, ToolNames(req.tools))


def test_dialects_switch_thinking_temperature_and_reasoning_replay() -> None:
    turn = [ChatMessage(role="user", content="hi"),
            ChatMessage(role="assistant", content="", reasoning="because", tool_calls=[]),
            ChatMessage(role="user", content="go on")]
    req = ChatRequest(messages=turn, thinking=False, temperature=0.3, json_schema={"type": "object"})
    kimi = _params("kimi-k2.6", "https://api.moonshot.example/v1", req)
    assert dialect_for(load_tiers(environ={"MESH_TIER_SWARM_BASE_URL": "https://x/v1",
                                           "MESH_TIER_SWARM_MODEL": "kimi-k2.6"})["swarm"]).name == "kimi"
    assert kimi["extra_body"] == {"thinking": {"type": "disabled"}}
    assert "temperature" not in kimi and kimi["max_completion_tokens"] == 2048
    assert kimi["response_format"] == {"type": "json_object"}
    assert kimi["messages"][2]["reasoning_content"] == "because"  # type: ignore[index]
    ds = _params("deepseek-v4-pro", "https://api.deepseek.example/v1",
                 req.model_copy(update={"thinking": True, "effort": "high"}))
    assert ds["extra_body"] == {"thinking": {"type": "enabled"}} and ds["reasoning_effort"] == "high"
    assert ds["temperature"] == 0.3 and ds["max_tokens"] == 2048
    local = _params("qwen3-8b", "http://127.0.0.1:8000/v1", req)
    assert "extra_body" not in local and "reasoning_content" not in local["messages"][1]  # type: ignore[index]
    assert local["response_format"]["type"] == "json_schema"  # type: ignore[index]


@pytest.mark.parametrize(("status", "etype", "message", "expected"), [
    (429, "rate_limit_error", "slow down", RateLimited),
    (529, "overloaded_error", "Overloaded", Overloaded),
    (503, "server_error", "busy", Overloaded),
    (500, "api_error", "boom", ServerError),
    (402, None, "Insufficient Balance", InsufficientBalance),
    (401, "authentication_error", "bad key", AuthenticationFailed),
    (400, "invalid_request_error", "This model's maximum context length is 8192 tokens", ContextTooLong),
    (400, "invalid_request_error", "prompt is too long: 300000 tokens > 200000 maximum", ContextTooLong),
    (422, None, "bad field", BadRequest),
    (None, "overloaded_error", "in-stream error event", Overloaded),
])
def test_status_classification(status: int | None, etype: str | None, message: str, expected: type) -> None:
    err = classify(status, message=message, error_type=etype, headers={"retry-after-ms": "1500"}, tier="t")
    assert type(err) is expected and err.tier == "t"
    if expected is RateLimited:
        assert err.retry_after == 1.5  # type: ignore[attr-defined]


async def test_all_tiers_on_one_server_in_one_step() -> None:
    """`mesh run --all-tiers URL`: every tier on the first model the server lists, a small model's window
    unless configured, free — checked against a real sim-server over HTTP."""
    from mesh.backends.sim import SimWorld
    from mesh.backends.sim.server import SimServer
    from mesh.cli.local import one_server_env

    async with SimServer(SimWorld(latency_scale=0.0)) as server:
        env = await asyncio.to_thread(one_server_env, server.url + "/v1")
    tiers = load_tiers(environ=env)
    assert {t.base_url for t in tiers.values()} == {server.url + "/v1"}
    assert {t.model for t in tiers.values()} == {"sim-edge"} and all(t.kind == "openai" for t in tiers.values())
    assert all(t.context_window == 8192 and t.output_reserve == 1024 for t in tiers.values())
    assert all(t.prices.cost(prompt_tokens=1000, cached_tokens=0, completion_tokens=1000) == 0 for t in tiers.values())
    with pytest.raises(ConfigError, match="cannot list its models"):
        await asyncio.to_thread(one_server_env, "http://127.0.0.1:1/v1")
