"""Acceptance over real HTTP: the official openai and anthropic SDK clients, through the mesh's
adapters and gateway, against a sim-server on a loopback port (started in-process per test)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import pytest
from aiohttp import web

from mesh.backends.anthropic_compat import AnthropicBackend
from mesh.backends.base import Backend, ChatMessage, ChatRequest, ChatResponse, ToolSpec
from mesh.backends.gateway import BudgetGuard, CallRecord, ModelGateway
from mesh.backends.openai_compat import OpenAIBackend
from mesh.backends.resilience import BreakerPolicy, RetryPolicy
from mesh.backends.sim import SimServer, SimWorld
from mesh.backends.tiers import TierConfig, load_tiers
from mesh.contracts import Budget
from mesh.errors import (
    AllTiersFailed,
    AuthenticationFailed,
    BadRequest,
    BudgetExceeded,
    ContextTooLong,
    MalformedResponse,
    StreamCut,
    Unreachable,
)

pytestmark = pytest.mark.timeout(60)

FS_WRITE = ToolSpec(name="fs.write", description="Write a file", parameters={
    "type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
    "required": ["path", "content"]})
KINDS = ("openai", "anthropic")


@pytest.fixture
async def server() -> AsyncIterator[SimServer]:
    async with SimServer(SimWorld(seed=5, latency_scale=0)) as srv:
        yield srv


def http_tiers(srv: SimServer, kinds: dict[str, str]) -> dict[str, TierConfig]:
    """Each tier pointed at the sim-server through the given SDK kind, under the sim model names, and
    configured as the simulator it is (``sim``)."""
    tiers = load_tiers(environ={})
    return {
        name: cfg.model_copy(update={
            "kind": kinds[name], "base_url": srv.url + ("/v1" if kinds[name] == "openai" else ""), "timeout": 5.0,
            "sim": True})
        for name, cfg in tiers.items()
    }


def backend(srv: SimServer, kind: str, tier: str = "long_context") -> Backend:
    cfg = http_tiers(srv, every(kind))[tier]
    return OpenAIBackend(cfg) if kind == "openai" else AnthropicBackend(cfg)


async def set_faults(srv: SimServer, faults: str, tier: str = "*", limit: int | None = None) -> None:
    async with httpx2.AsyncClient() as client:
        r = await client.post(f"{srv.url}/_sim/faults", json={"faults": faults, "tier": tier, "limit": limit})
        r.raise_for_status()


async def stats(srv: SimServer) -> dict[str, int]:
    async with httpx2.AsyncClient() as client:
        return (await client.get(f"{srv.url}/_sim/stats")).json()


def coder_request(**kw: Any) -> ChatRequest:
    return ChatRequest(messages=[
        ChatMessage(role="system", content="ROLE: coder\nYou write code."),
        ChatMessage(role="user", content="## Pinned constraints\n- Use Python 3.11\n\n## Goal\nBuild me a login system"
                                         "\n\n## Step\nImplement the login form"),
    ], tools=[FS_WRITE], **kw)


def gateway(srv: SimServer, kinds: dict[str, str], records: list[tuple[float, CallRecord]] | None = None,
            **kw: Any) -> ModelGateway:
    def on_call(rec: CallRecord) -> None:
        if records is not None:
            records.append((time.monotonic(), rec))

    kw.setdefault("retry", RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05))
    kw.setdefault("breaker", BreakerPolicy(failure_threshold=3, reset_after=60))
    return ModelGateway(http_tiers(srv, kinds), on_call=on_call, seed=1, **kw)


def every(kind: str) -> dict[str, str]:
    return dict.fromkeys(("edge", "long_context", "swarm"), kind)


async def chat_long_context(srv: SimServer, kind: str, records: list[tuple[float, CallRecord]]) -> ChatResponse:
    gw = gateway(srv, every(kind), records)
    try:
        return await gw.chat(coder_request(), "long_context")
    finally:
        await gw.aclose()


ALL_OPENAI = every("openai")
MIXED = {"long_context": "openai", "swarm": "anthropic", "edge": "openai"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [True, False])
async def test_text_reasoning_tool_calls_and_usage_arrive_intact(server: SimServer, kind: str, stream: bool) -> None:
    req = coder_request(thinking=True, stream=stream)
    expected = SimWorld(seed=5, latency_scale=0).reply(req, server.world.tiers["long_context"])
    b = backend(server, kind)
    try:
        resp = await b.chat(req, timeout=5)
        assert resp.finish_reason == "tool_calls" and resp.simulated  # known by the sim fingerprint
        assert [(c.name, c.arguments) for c in resp.tool_calls] == [(c.name, c.arguments) for c in expected.tool_calls]
        assert resp.reasoning == expected.reasoning and resp.reasoning
        assert resp.usage.prompt_tokens == expected.usage.prompt_tokens
        assert resp.usage.completion_tokens == expected.usage.completion_tokens
        assert resp.usage.reasoning_tokens == expected.usage.reasoning_tokens > 0
        assert resp.usage.cost_usd == pytest.approx(expected.usage.cost_usd) and resp.usage.calls == 1
        # The tool-result turn: reasoning and calls go back; the final text arrives whole.
        follow = req.model_copy(update={"messages": [*req.messages, resp.as_message(), *[
            ChatMessage(role="tool", tool_call_id=c.id, content=f"wrote {c.arguments['path']}") for c in resp.tool_calls]]})
        final = await b.chat(follow, timeout=5)
        want = SimWorld(seed=5, latency_scale=0).reply(follow, server.world.tiers["long_context"])
        assert final.finish_reason == "stop" and final.text == want.text and final.text.startswith("[simulated]")
        assert final.usage.cached_tokens > 0  # the repeated system prompt came from the prefix cache
    finally:
        await b.aclose()


async def test_deepseek_dialect_sends_reasoning_back(server: SimServer) -> None:
    cfg = load_tiers(environ={"MESH_TIER_LONG_CONTEXT_BASE_URL": server.url + "/v1",
                              "MESH_TIER_LONG_CONTEXT_MODEL": "deepseek-v4-pro"})["long_context"]
    b = OpenAIBackend(cfg)
    try:
        req = coder_request(thinking=True, effort="high")
        first = await b.chat(req, timeout=5)
        assert first.reasoning and first.tool_calls
        turn = [*req.messages, first.as_message(),
                *[ChatMessage(role="tool", tool_call_id=c.id, content="ok") for c in first.tool_calls]]
        await b.chat(req.model_copy(update={"messages": turn}), timeout=5)
        seen = await stats(server)
        assert seen["received.reasoning_content"] == 1  # the assistant turn carried reasoning_content
        assert seen["received.thinking_switch"] == 2
    finally:
        await b.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_rate_limit_is_retried_after_retry_after(server: SimServer, kind: str) -> None:
    await set_faults(server, "429:1,retry_after:0.4", tier="long_context", limit=1)
    records: list[tuple[float, CallRecord]] = []
    resp = await chat_long_context(server, kind, records)
    assert resp.tier == "long_context"
    assert [(r.outcome, r.attempt) for _, r in records] == [("RateLimited", 1), ("ok", 2)]
    assert records[1][0] - records[0][0] >= 0.4  # waited as the server asked
    assert (await stats(server))["requests.long_context"] == 2


@pytest.mark.parametrize("kinds", [ALL_OPENAI, MIXED], ids=["openai", "openai->anthropic"])
async def test_5xx_storm_opens_the_circuit_and_falls_back(server: SimServer, kinds: dict[str, str]) -> None:
    await set_faults(server, "500:0.5,503:0.5", tier="long_context")
    records: list[tuple[float, CallRecord]] = []
    gw = gateway(server, kinds, records, retry=RetryPolicy(max_attempts=5, base_delay=0.01),
                 breaker=BreakerPolicy(failure_threshold=3, reset_after=60))
    try:
        resp = await gw.chat(coder_request(), "long_context")
        assert resp.tier == "swarm" and resp.tool_calls
        assert not gw.available("long_context") and gw.available("swarm")
        outcomes = [(r.tier, r.outcome) for _, r in records]
        assert outcomes[:3] == [("long_context", o) for _, o in outcomes[:3]]
        assert {o for _, o in outcomes[:3]} <= {"ServerError", "Overloaded"}
        assert outcomes[3:] == [("swarm", "ok")]
        assert (await stats(server))["requests.long_context"] == 3  # stopped when the circuit opened
        # While open, the tier is skipped without a request.
        again = await gw.chat(coder_request(), "long_context")
        assert again.tier == "swarm" and (await stats(server))["requests.long_context"] == 3
        assert [(r.tier, r.outcome) for _, r in records[4:]] == [("long_context", "CircuitOpen"), ("swarm", "ok")]
    finally:
        await gw.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_permanent_errors_are_not_retried(server: SimServer, kind: str) -> None:
    kinds = every(kind)
    await set_faults(server, "401:1")
    records: list[tuple[float, CallRecord]] = []
    gw = gateway(server, kinds, records)
    try:
        with pytest.raises(AllTiersFailed) as info:
            await gw.chat(coder_request(), "long_context", fallback=False)
        assert isinstance(info.value.errors["long_context"], AuthenticationFailed) and not info.value.retryable
        assert [r.outcome for _, r in records] == ["AuthenticationFailed"]
        await set_faults(server, "400:1")
        with pytest.raises(BadRequest):  # the request's fault: no retry and no fallback either
            await gw.chat(coder_request(), "long_context")
        counts = await stats(server)
        assert counts["requests.long_context"] == 2 and "requests.swarm" not in counts
        assert gw.available("long_context")  # permanent errors say nothing about the endpoint's health
    finally:
        await gw.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_cut_stream_is_retried(server: SimServer, kind: str) -> None:
    b = backend(server, kind)
    await set_faults(server, "cut:1", tier="long_context", limit=1)
    with pytest.raises(StreamCut):
        await b.chat(coder_request(), timeout=5)
    await b.aclose()
    await set_faults(server, "cut:1", tier="long_context", limit=1)
    records: list[tuple[float, CallRecord]] = []
    resp = await chat_long_context(server, kind, records)
    assert resp.tool_calls and [r.outcome for _, r in records] == ["StreamCut", "ok"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [True, False])
async def test_garbage_is_a_clear_malformed_response(server: SimServer, kind: str, stream: bool) -> None:
    await set_faults(server, "garbage:1")
    b = backend(server, kind)
    try:
        with pytest.raises(MalformedResponse) as info:
            await b.chat(coder_request(stream=stream), timeout=5)
        assert info.value.tier == "long_context" and info.value.endpoint
    finally:
        await b.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_timeouts_and_unreachable_endpoints(server: SimServer, kind: str) -> None:
    await set_faults(server, "timeout:1")
    gw = gateway(server, every(kind),
                 retry=RetryPolicy(max_attempts=2, base_delay=0.01))
    try:
        start = time.monotonic()
        with pytest.raises(AllTiersFailed) as info:
            await gw.chat(coder_request(), "edge", fallback=False, timeout=0.3)
        assert type(info.value.errors["edge"]).__name__ == "BackendTimeout" and info.value.retryable
        assert time.monotonic() - start < 5
    finally:
        await gw.aclose()
    cfg = http_tiers(server, every(kind))["edge"]
    dead = cfg.model_copy(update={"base_url": "http://127.0.0.1:9" + ("/v1" if kind == "openai" else "")})
    b = OpenAIBackend(dead) if kind == "openai" else AnthropicBackend(dead)
    try:
        with pytest.raises(Unreachable):
            await b.chat(coder_request(), timeout=2)
    finally:
        await b.aclose()


async def test_budget_refusal_makes_no_request(server: SimServer) -> None:
    gw = gateway(server, MIXED)
    try:
        with pytest.raises(BudgetExceeded, match="tokens"):
            await gw.chat(coder_request(), "long_context", budget=BudgetGuard(Budget(max_tokens=500)))
        poor = BudgetGuard(Budget(max_cost_usd=0.01, max_tokens=None))
        with pytest.raises(BudgetExceeded, match=r"\$"):
            await gw.chat(coder_request(max_tokens=100_000), "long_context", budget=poor, fallback=False)
        assert "requests.long_context" not in await stats(server)
        # With fallback, the cheapest tier that the budget can afford takes the call.
        cheap = await gw.chat(coder_request(max_tokens=100_000), "long_context", budget=poor)
        assert cheap.tier == "edge" and 0 < poor.spent.cost_usd <= 0.01
        assert "requests.long_context" not in await stats(server)
        guard = BudgetGuard(Budget(max_tokens=100_000, max_cost_usd=1.0))
        resp = await gw.chat(coder_request(), "long_context", budget=guard)
        assert guard.spent.total_tokens == resp.usage.total_tokens > 0
        assert guard.remaining_tokens == 100_000 - resp.usage.total_tokens
    finally:
        await gw.aclose()


async def test_context_too_long_falls_back_to_a_bigger_window(server: SimServer) -> None:
    records: list[tuple[float, CallRecord]] = []
    gw = gateway(server, MIXED, records, fallback_order=("edge", "swarm", "long_context"))
    big = ChatRequest(messages=[ChatMessage(role="system", content="ROLE: researcher"),
                                ChatMessage(role="user", content="## Goal\nsummarise\n\n## Inputs\n### doc\n" + "w " * 12_000)])
    try:
        resp = await gw.chat(big, "edge")
        assert resp.tier == "swarm" and records[-1][1].tier == "swarm"
        assert all(r.tier != "edge" for _, r in records)  # known too small: not even attempted
        with pytest.raises(AllTiersFailed) as info:
            await gw.chat(big, "edge", fallback=False)
        assert isinstance(info.value.errors["edge"], ContextTooLong)
    finally:
        await gw.aclose()


async def test_sim_server_control_endpoints(server: SimServer) -> None:
    async with httpx2.AsyncClient() as client:
        assert (await client.get(f"{server.url}/healthz")).json()["simulated"] is True
        bad = await client.post(f"{server.url}/_sim/faults", json={"faults": "teapot:1"})
        assert bad.status_code == 400 and "teapot" in bad.json()["error"]
        r = await client.post(f"{server.url}/v1/chat/completions", json={"model": "sim-edge"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def _calls(records: list[tuple[float, CallRecord]], pred: Callable[[CallRecord], bool]) -> int:
    return sum(1 for _, r in records if pred(r))


async def test_swarm_over_http_is_bounded(server: SimServer) -> None:
    records: list[tuple[float, CallRecord]] = []
    gw = gateway(server, MIXED, records)
    written: list[str] = []

    async def run_tool(call: Any) -> str:
        written.append(call.arguments["path"])
        return "ok"

    try:
        resp = await gw.swarm(coder_request(), [f"part {i}" for i in range(12)], run_tool=run_tool)
    finally:
        await gw.aclose()
    bounds = gw.tiers["swarm"].swarm
    assert resp.text.startswith("[simulated]") and not resp.tool_calls
    assert 0 < len(written) <= bounds.max_tool_calls
    # 8 sub-agents x (tool turn + final turn) + 1 composing call, all on the swarm tier via the anthropic SDK
    assert _calls(records, lambda r: r.tier == "swarm" and r.outcome == "ok") == 2 * bounds.max_sub_agents + 1
    assert resp.usage.calls == 2 * bounds.max_sub_agents + 1
    assert json.dumps(sorted(set(written))) and len(set(written)) == len(written)


@pytest.mark.parametrize("kind", KINDS)
async def test_api_key_is_read_at_call_time(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key comes from the env var the tier names, on every call (a rotated key is used at once)."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.get("x-api-key") or request.headers.get("Authorization", ""))
        return web.json_response({"error": {"type": "authentication_error", "message": "no"}}, status=401)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", record)
    app.router.add_post("/v1/messages", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site.port}"
    cfg = load_tiers(environ={"MESH_TIER_EDGE_BASE_URL": url + ("/v1" if kind == "openai" else ""),
                              "MESH_TIER_EDGE_MODEL": "m", "MESH_TIER_EDGE_KIND": kind,
                              "MESH_TIER_EDGE_API_KEY_ENV": "MESH_TEST_KEY"})["edge"]
    b = OpenAIBackend(cfg) if kind == "openai" else AnthropicBackend(cfg)
    try:
        for key in ("key-one", "key-two"):
            monkeypatch.setenv("MESH_TEST_KEY", key)
            with pytest.raises(AuthenticationFailed):
                await b.chat(coder_request(), timeout=5)
    finally:
        await b.aclose()
        await runner.cleanup()
    assert [s.removeprefix("Bearer ") for s in seen] == ["key-one", "key-two"]


@pytest.mark.parametrize("kind", KINDS)
async def test_hints_reach_the_endpoint_only_when_the_tier_sends_them(server: SimServer, kind: str) -> None:
    """Goal options travel as X-Mesh-Hints to the sim-server (send_hints), never to a provider by default."""
    req = coder_request(metadata={"role": "coder", "sim_review": "approve", "difficulty": 0.3})
    for send in (False, True):
        cfg = http_tiers(server, every(kind))["long_context"].model_copy(update={"send_hints": send})
        b = OpenAIBackend(cfg) if kind == "openai" else AnthropicBackend(cfg)
        try:
            await b.chat(req, timeout=5)
        finally:
            await b.aclose()
    async with httpx2.AsyncClient() as client:
        received = (await client.get(f"{server.url}/_sim/requests")).json()
    assert [r["hints"] for r in received[-2:]] == [{}, {"role": "coder", "sim_review": "approve", "difficulty": 0.3}]
