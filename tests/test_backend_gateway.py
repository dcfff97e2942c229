"""The gateway over in-process sim tiers: swarm bounds, fallback reports, sim labelling."""

from __future__ import annotations

import asyncio

import pytest

from mesh.backends.base import ChatMessage, ChatRequest, ToolCallRequest, ToolSpec
from mesh.backends.gateway import BudgetGuard, CallRecord, ModelGateway
from mesh.backends.resilience import RetryPolicy
from mesh.backends.sim import FaultPlan, SimWorld
from mesh.backends.tiers import SwarmConfig, TierConfig, load_tiers
from mesh.contracts import Budget
from mesh.errors import AllTiersFailed, ConfigError

FS_WRITE = ToolSpec(name="fs.write", parameters={"type": "object", "properties": {
    "path": {"type": "string"}, "content": {"type": "string"}}})


def _tiers(**swarm: int) -> dict[str, TierConfig]:
    tiers = load_tiers(environ={})
    if swarm:
        tiers["swarm"] = tiers["swarm"].model_copy(update={"swarm": SwarmConfig(**swarm)})
    return tiers


def _coder() -> ChatRequest:
    return ChatRequest(messages=[ChatMessage(role="system", content="ROLE: coder"),
                                 ChatMessage(role="user", content="## Goal\nBuild a CLI\n\n## Step\nImplement it")],
                       tools=[FS_WRITE])


async def test_swarm_fan_out_is_bounded() -> None:
    records: list[CallRecord] = []
    world = SimWorld(latency_scale=0)
    gw = ModelGateway(_tiers(max_sub_agents=3, max_tool_calls=5), world=world, on_call=records.append)
    in_flight = peak = 0
    ran: list[str] = []

    async def run_tool(call: ToolCallRequest) -> str:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)  # let the other sub-agents run into their own tool calls
        in_flight -= 1
        ran.append(call.arguments["path"])
        return "written"

    guard = BudgetGuard(Budget())
    resp = await gw.swarm(_coder(), [f"module {i}" for i in range(7)], run_tool=run_tool, budget=guard)
    await gw.aclose()
    assert len(ran) == 5 and peak <= 3  # tool calls capped in total; at most 3 sub-agents at once
    sub_calls = [r for r in records if r.tier == "swarm"]
    assert len(sub_calls) == 3 * 2 + 1  # 3 sub-agents x (tool turn + final) + compose
    assert resp.usage.calls == 7 and guard.spent.calls == 7
    assert resp.usage.total_tokens == sum(r.usage.total_tokens for r in records)
    assert resp.text.startswith("[simulated]") and "### Sub-agent 3" in resp.text and resp.simulated


async def test_swarm_reports_a_failed_sub_agent_and_raises_when_all_fail() -> None:
    world = SimWorld(latency_scale=0)
    gw = ModelGateway(_tiers(max_sub_agents=2), world=world, retry=RetryPolicy(max_attempts=1))
    world.faults.set("500:1", "swarm", limit=1)  # exactly one sub-agent's call fails
    resp = await gw.swarm(_coder(), ["a", "b"])  # no run_tool: plain sub-calls
    assert resp.usage.calls >= 2
    world.faults.set("500:1")
    with pytest.raises(AllTiersFailed):
        await gw.swarm(_coder(), ["a", "b"])
    await gw.aclose()


async def test_fallback_records_every_attempt_and_all_tiers_failed_lists_each() -> None:
    records: list[CallRecord] = []
    world = SimWorld(latency_scale=0, faults=FaultPlan.from_spec("503:1"))
    gw = ModelGateway(_tiers(), world=world, on_call=records.append,
                      retry=RetryPolicy(max_attempts=2, base_delay=0.001))
    with pytest.raises(AllTiersFailed) as info:
        await gw.chat(_coder(), "long_context")
    assert list(info.value.errors) == ["long_context", "swarm", "edge"] and info.value.retryable
    assert [(r.tier, r.attempt, r.outcome) for r in records] == [
        (t, a, "Overloaded") for t in ("long_context", "swarm", "edge") for a in (1, 2)]
    assert all(r.simulated and r.model.startswith("sim-") for r in records)
    world.faults.set("")
    ok = await gw.chat(_coder(), "edge", fallback=False)
    assert ok.tier == "edge" and records[-1].outcome == "ok" and records[-1].usage.calls == 1
    await gw.aclose()


def test_unknown_tiers_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="fallback"):
        ModelGateway(_tiers(), fallback_order=("long_context", "gpu"))
