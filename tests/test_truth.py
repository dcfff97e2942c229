"""Nothing fake passes as real: simulated calls are marked from backend.call to the goal and the ledger,
a node refuses sim tiers unless MESH_ALLOW_SIM=1, a real tier never falls back into a sim tier, and a
goal whose tests still fail ends failed (unless it accepts failing tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import pytest

from mesh.backends.base import ChatMessage, ChatRequest
from mesh.backends.gateway import CallRecord, ModelGateway
from mesh.backends.resilience import RetryPolicy
from mesh.backends.sim import SimServer, SimWorld
from mesh.backends.sim.faults import ALL_TIERS
from mesh.backends.tiers import TierConfig, load_tiers
from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.contracts import BackendCall, Goal, GoalCompleted, GoalFailed, RouteDecided, StepCompleted
from mesh.errors import AllTiersFailed, SimulationNotAllowed
from mesh.roles.ledger_service import LedgerClient
from tests.ledgerkit import caught_up
from tests.meshkit import in_process_mesh, role_specs, run_goal

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(240)


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(SimWorld(seed=3, latency_scale=0)) as srv:
        yield srv


@pytest.fixture
async def posing() -> AsyncIterator[SimServer]:
    """A second sim-server that poses as a real provider: its answers carry no sim marks."""
    async with SimServer(SimWorld(seed=4, latency_scale=0), pose_as_real=True) as srv:
        yield srv


def on(srv: SimServer, cfg: TierConfig, kind: str = "openai", *, sim: bool = False) -> TierConfig:
    return cfg.model_copy(update={"kind": kind, "base_url": srv.url + ("/v1" if kind == "openai" else ""),
                                  "timeout": 5.0, "sim": sim})


def request() -> ChatRequest:
    return ChatRequest(messages=[ChatMessage(role="system", content="ROLE: researcher"),
                                 ChatMessage(role="user", content="## Goal\nBuild me a login system")], stream=False)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_sim_server_answer_is_simulated_and_refused_without_allow_sim(sim: SimServer, kind: str) -> None:
    """Configured as a real endpoint, the answer still says it came from a sim-server (OpenAI fingerprint,
    Anthropic id): the call is simulated and, without MESH_ALLOW_SIM, fails as a configuration error."""
    tiers = {name: on(sim, cfg, kind) for name, cfg in load_tiers(environ={}).items()}
    records: list[CallRecord] = []
    allowed = ModelGateway(tiers, on_call=records.append, allow_sim=True)
    refused = ModelGateway(tiers, allow_sim=False)
    try:
        resp = await allowed.chat(request(), "long_context")
        assert resp.simulated and records[-1].simulated and allowed.simulated("long_context")
        with pytest.raises(SimulationNotAllowed, match="'long_context'.*MESH_ALLOW_SIM=1") as caught:
            await refused.chat(request(), "long_context")
        assert caught.value.retryable is False
    finally:
        await allowed.aclose()
        await refused.aclose()


async def test_a_tier_configured_as_sim_is_refused_without_allow_sim() -> None:
    gateway = ModelGateway(load_tiers(environ={}), allow_sim=False, world=SimWorld(seed=1, latency_scale=0))
    with pytest.raises(SimulationNotAllowed, match="'edge' is simulated \\(configured as a simulator\\)"):
        await gateway.chat(request(), "edge", fallback=False)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_posing_as_real_removes_the_sim_marks(posing: SimServer, kind: str) -> None:
    cfg = on(posing, load_tiers(environ={})["long_context"], kind)
    gateway = ModelGateway({"long_context": cfg}, fallback_order=("long_context",), allow_sim=False)
    try:
        resp = await gateway.chat(request().model_copy(update={"stream": kind == "anthropic"}), "long_context")
        assert not resp.simulated and resp.text
    finally:
        await gateway.aclose()


@pytest.mark.parametrize("flagged", [True, False], ids=["sim-configured", "sim-answering"])
async def test_a_real_tier_that_fails_never_falls_back_into_a_sim_tier(sim: SimServer, posing: SimServer,
                                                                        flagged: bool) -> None:
    """long_context is "real" (a sim-server posing as a provider) and failing; swarm and edge are a sim-server,
    either configured as sim (no request reaches them) or only recognisable by its answers (refused)."""
    defaults = load_tiers(environ={})
    tiers = {"long_context": on(posing, defaults["long_context"]),
             "swarm": on(sim, defaults["swarm"], sim=flagged), "edge": on(sim, defaults["edge"], sim=flagged)}
    posing.world.faults.set("503:1", ALL_TIERS)
    gateway = ModelGateway(tiers, allow_sim=True, retry=RetryPolicy(max_attempts=2, base_delay=0.01))
    try:
        with pytest.raises(AllTiersFailed, match="swarm is simulated: a real tier does not fall back") as caught:
            await gateway.chat(request(), "long_context")
        assert set(caught.value.errors) == {"long_context", "swarm", "edge"}
        async with httpx2.AsyncClient() as client:
            stats = (await client.get(f"{sim.url}/_sim/stats")).json()
        assert stats.get("requests.swarm", 0) == stats.get("requests.edge", 0) == (0 if flagged else 1)
        # The sim tiers still serve calls routed to them directly (allowed here), and fall back among themselves.
        assert (await gateway.chat(request(), "swarm")).simulated
    finally:
        await gateway.aclose()


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    return env | {"PYTHONPATH": str(ROOT), "MESH_NATS_URL": "nats://127.0.0.1:1"} | extra


def test_mesh_node_refuses_sim_tiers_without_allow_sim() -> None:
    done = subprocess.run([sys.executable, "-m", "mesh", "node", "coder"], env=_cli_env(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "tier 'long_context' is simulated" in done.stderr and "MESH_ALLOW_SIM=1" in done.stderr, done.stderr


def test_mesh_node_check_reports_one_line_per_problem(tmp_path: Path) -> None:
    env = _cli_env(MESH_TIER_SWARM_BASE_URL="https://api.moonshot.ai/v1", MESH_TIER_SWARM_MODEL="kimi-k2.6",
                   MESH_TIER_SWARM_API_KEY_ENV="MESH_TEST_ABSENT_KEY")
    done = subprocess.run([sys.executable, "-m", "mesh", "node", "tester", "--check"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert any("tier 'edge' is simulated" in line for line in lines), lines
    assert any("tier 'swarm': its key variable MESH_TEST_ABSENT_KEY is not set" in line for line in lines), lines
    assert any(line.startswith("tester: bus: cannot connect to NATS") for line in lines), lines
    assert not any("shell_allow" in line for line in lines), lines  # python and pytest resolve here
    unknown = subprocess.run([sys.executable, "-m", "mesh", "node", "nosuchrole", "--check"], env=env,
                             capture_output=True, text=True, timeout=60, check=False)
    assert unknown.returncode == 1 and "role spec: unknown role 'nosuchrole'" in unknown.stderr


@pytest.fixture
def fast(fast: MeshSettings) -> MeshSettings:
    """conftest's ``fast``, with the sim allowed outright."""
    return fast.model_copy(update={"allow_sim": True})


async def test_simulated_and_quality_are_on_every_event_and_ledger_row(fast: MeshSettings, bus: Bus,
                                                                       eventually: object) -> None:
    failing = Goal(brief="Build me a login system", options={"sim_tests": "fail_always", "sim_review": "approve"})
    accepted = Goal(brief="Build me a login system", options={"sim_tests": "fail_always", "sim_review": "approve",
                                                              "accept_failing_tests": True})
    async with in_process_mesh(fast, specs=role_specs(with_ledger=True)):
        events = await run_goal(bus, failing, timeout=180)
        accepted_events = await run_goal(bus, accepted, timeout=180)
        client = LedgerClient(bus, timeout=10)
        await caught_up(eventually, client, bus, timeout=60)  # type: ignore[arg-type]
        calls = (await client.sql("SELECT count(*), bool_and(simulated) FROM backend_calls")).rows[0]
        steps = (await client.sql("SELECT count(*), bool_and(simulated), count(*) FILTER (quality_source = 'tests'),"
                                  " bool_or(quality_grade = 1) FILTER (quality_source = 'tests') FROM steps "
                                  "WHERE status = 'completed'")).rows[0]
        goals = {r[0]: r[1:] for r in (await client.sql(
            "SELECT goal_id, status, simulated, tests FROM goal_summary")).rows}
        attempts = (await client.sql("SELECT count(*) FILTER (attempt IS NULL) FROM route_decisions")).rows[0]

    end = events[-1]
    assert isinstance(end, GoalFailed) and end.reason == "tests still failing after 2 revisions", end
    assert end.simulated and end.quality is not None and end.quality.tests == "failed"
    assert end.quality.test_revisions == 2 and end.quality.tests_exit_code not in (None, 0)
    assert end.quality.tests_report is not None and end.quality.reviews and set(end.quality.reviews) == {"approve"}
    calls_ev = [e for e in events if isinstance(e, BackendCall)]
    assert calls_ev and all(e.simulated for e in calls_ev)
    done = [e for e in events if isinstance(e, StepCompleted)]
    assert done and all(e.simulated for e in done)
    tests = [e for e in done if e.quality.source == "tests"]
    assert len(tests) == 3 and all(e.quality.grade == 0.0 and e.quality.judged for e in tests)
    assert {e.attempt for e in events if isinstance(e, RouteDecided)} >= {1}

    ok = accepted_events[-1]
    assert isinstance(ok, GoalCompleted) and ok.simulated and ok.quality.tests == "failed"

    assert calls[0] > 0 and calls[1] is True
    assert steps[0] > 0 and steps[1] is True and steps[2] == 6 and steps[3] is False
    assert goals[failing.goal_id] == ("failed", True, "failed")
    assert goals[accepted.goal_id] == ("completed", True, "failed")
    assert attempts[0] == 0
