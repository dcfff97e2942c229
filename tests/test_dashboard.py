"""The dashboard without a browser: the DAG layout of a 200-step plan, the views' arithmetic, what needs a
token and what does not, refusals, and that a non-editable install ships the templates and assets."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from mesh.bus import Bus
from mesh.client import MeshClient
from mesh.config import MeshSettings
from mesh.contracts import Goal, Plan, Step, StepStarted
from mesh.contracts.models import RouteDecision
from mesh.gateway.app import running
from mesh.gateway.dashboard import dag, ops, views
from mesh.roles.goalstate import GoalState
from mesh.router.features import FEATURE_NAMES, FEATURE_VERSION
from tests.gatewaykit import gateway, tokens_file
from tests.meshkit import fast, in_process_mesh, role_specs

ROOT = Path(__file__).resolve().parent.parent


def wide_state(n: int = 200) -> GoalState:
    """A plan of ``n`` steps: one spec, a fan-out of n - 3 researchers, one coder after all, one synthesis."""
    steps = [Step(step_id="spec", role="researcher", instruction="spec")]
    steps += [Step(step_id=f"r{i}", role="researcher", instruction="dig", depends_on=["spec"]) for i in range(n - 3)]
    steps += [Step(step_id="code", role="coder", instruction="code", depends_on=[f"r{i}" for i in range(n - 3)]),
              Step(step_id="synth", role="synthesizer", instruction="sum up", depends_on=["code"])]
    state = GoalState(goal=Goal(brief="wide"))
    state.apply_plan(Plan(goal_id=state.goal.goal_id, steps=steps))
    return state


def test_a_200_step_dag_stays_readable() -> None:
    state = wide_state(200)
    placed, width, height = dag.layout(state.steps)
    assert set(placed) == set(state.steps)
    # the 197-wide layer wraps into 9 columns of at most MAX_ROWS; the 12 columns into 2 bands of 6: the drawing
    # is two columns tall, not 197 rows
    column = dag.MAX_ROWS * (dag.NODE_H + dag.ROW_GAP) - dag.ROW_GAP
    assert height == 2 * dag.PAD + 2 * column + dag.BAND_GAP
    assert width == 2 * dag.PAD + dag.BAND_COLUMNS * (dag.NODE_W + dag.COL_GAP) - dag.COL_GAP
    boxes = {(p.x, p.y) for p in placed.values()}
    assert len(boxes) == len(placed)  # no two steps drawn on top of each other
    assert all(0 <= p.x <= width - dag.NODE_W and 0 <= p.y <= height - dag.NODE_H for p in placed.values())
    # columns follow dependency depth: a step is right of everything it depends on, or in a band below it
    assert all(placed[d].x < placed[sid].x or placed[d].y < placed[sid].y
               for sid, st in state.steps.items() for d in st.step.depends_on)
    svg = dag.render(state.steps, selected="code")
    assert svg.count('class="step st-pending') == 200 and svg.count('<path class="edge"') == 197 * 2 + 1
    assert 'class="step st-pending selected" data-step="code"' in svg


def test_a_200_step_chain_wraps_into_bands() -> None:
    steps = [Step(step_id="s0", role="coder", instruction="go")]
    steps += [Step(step_id=f"s{i}", role="coder", instruction="go", depends_on=[f"s{i - 1}"]) for i in range(1, 200)]
    state = GoalState(goal=Goal(brief="long"))
    state.apply_plan(Plan(goal_id=state.goal.goal_id, steps=steps))
    placed, width, height = dag.layout(state.steps)
    assert width == 2 * dag.PAD + dag.BAND_COLUMNS * (dag.NODE_W + dag.COL_GAP) - dag.COL_GAP
    bands = -(-200 // dag.BAND_COLUMNS)
    assert height == 2 * dag.PAD + bands * (dag.NODE_H + dag.BAND_GAP) - dag.BAND_GAP
    assert len({(p.x, p.y) for p in placed.values()}) == 200
    # reading order: left to right within a band, then the next band down
    order = sorted(placed.values(), key=lambda p: (p.y, p.x))
    assert [p.step_id for p in order] == [f"s{i}" for i in range(200)]


def test_views_cost_marks_simulation_and_the_diff_names_changes() -> None:
    assert views.money(0.01234, True) == "sim$0.0123" and views.money(0.5, False) == "$0.5000"
    old = {"a.py": b"x = 1\n", "gone.txt": b"bye\n", "img.bin": b"\0\1"}
    new = {"a.py": b"x = 2\n", "new.txt": b"hi\n", "img.bin": b"\0\2"}
    text = views.diff(old, new)
    assert "-x = 1\n+x = 2\n" in text and "+++ b/new.txt" in text and "--- a/gone.txt" in text
    assert "Binary file img.bin differs" in text
    assert views.diff(old, new, "a.py").count("+++") == 1 and views.diff(old, old) == ""


def test_top_features_name_the_largest_values_and_skip_text_buckets() -> None:
    features = [0.0] * len(FEATURE_NAMES)
    features[FEATURE_NAMES.index("depth")] = 3.0
    features[FEATURE_NAMES.index("difficulty")] = -0.5
    features[FEATURE_NAMES.index("text_0")] = 9.0
    decision = RouteDecision(tier="edge", feature_version=FEATURE_VERSION, features=features)
    assert views.top_features(decision) == [("depth", 3.0), ("difficulty", -0.5)]
    assert views.top_features(decision.model_copy(update={"feature_version": "route-f0"})) == []


async def test_shells_are_public_data_needs_the_token(settings: MeshSettings, tmp_path: Path) -> None:
    path, token = tokens_file(tmp_path)
    async with gateway(fast(settings, gateway_tokens_file=path), roles=False) as (gw, _client), \
            httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        for public in ("/", "/ui/goals/abc", "/ui/mesh", "/ui/router", "/ui/approvals", "/ui/static/dashboard.mjs"):
            assert (await http.get(public)).status_code == 200, public
        assert "login" in (await http.get("/")).text
        for private in ("/v1/ui/goals", "/v1/ui/goals/abc", "/v1/ui/mesh", "/v1/events"):
            assert (await http.get(private)).status_code == 401, private
        assert (await http.get("/ui/static/../pages.py")).status_code == 404
        auth = {"Authorization": f"Bearer {token}"}
        listed = await http.get("/v1/ui/goals", headers=auth)
        assert listed.status_code == 200 and "No goals yet" in listed.text
        bad = await http.get("/v1/ui/goals", params={"status": "done"}, headers=auth)
        assert bad.status_code == 400 and "status must be one of" in bad.json()["error"]["message"]
        waiting = await http.get("/v1/ui/goals/nosuchgoal", headers=auth)
        assert waiting.status_code == 200 and "Waiting for the planner" in waiting.text
        assert (await http.get("/v1/ui/goals/nosuchgoal/steps/s1", headers=auth)).status_code == 404


@pytest.mark.timeout(300)
def test_a_built_wheel_ships_the_templates_and_assets(tmp_path: Path) -> None:
    """What a non-editable install gets: every file under templates/ and static/ is in the wheel."""
    src = tmp_path / "src"  # built from a copy: a build leaves build/ and *.egg-info beside its sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mesh", src / "mesh", ignore=shutil.ignore_patterns("__pycache__"))
    # Offline: the build backend is the setuptools the test extra installs (build isolation would fetch one).
    # No index, no pip configuration (a machine's local mirror or find-links would hide a fetch): any attempt
    # to fetch something fails here, on every machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                           "-q", "-w", str(tmp_path), str(src)],
                          env=env, capture_output=True, text=True, timeout=280, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("mesh_agents-*.whl"))
    shipped = set(zipfile.ZipFile(wheel).namelist())
    base = ROOT / "mesh" / "gateway" / "dashboard"
    wanted = {f"mesh/gateway/dashboard/{p.relative_to(base).as_posix()}" for folder in ("templates", "static")
              for p in (base / folder).iterdir()}
    assert wanted and wanted <= shipped, sorted(wanted - shipped)


def test_the_router_baseline_is_the_most_successful_tier_at_its_cost_per_token() -> None:
    from datetime import UTC, datetime

    tiers = [("edge", 10, 5, 0.01, 10_000, True), ("long_context", 4, 4, 0.40, 20_000, True),
             ("swarm", 4, 4, 0.20, 10_000, True)]
    t0, t1 = datetime(2026, 12, 5, 10, 0, tzinfo=UTC), datetime(2026, 12, 5, 10, 1, tzinfo=UTC)
    times = [(t0, "edge", 10, 0.01, 10_000), (t0, "swarm", 4, 0.20, 10_000), (t1, "long_context", 4, 0.40, 20_000)]
    view = ops.router_view(tiers, times)
    # long_context and swarm both succeed every time: more attempts would break the tie; equal here → the first max
    assert view["best"].tier == "long_context" and view["best"].per_token == pytest.approx(0.40 / 20_000)
    assert [b.mix for b in view["buckets"]] == [{"edge": 10, "swarm": 4}, {"long_context": 4}]
    assert view["buckets"][0].baseline == pytest.approx(20_000 * 0.40 / 20_000)
    assert view["total"]["cost"] == "sim$0.6100" and view["total"]["baseline"] == "sim$0.8000"
    assert view["total"]["saving"] == "24% below the baseline" and "<polyline" in view["chart"]
    assert ops.router_view([], [])["tiers"] == []


def test_breakers_per_tier_report_the_worst_state_any_node_sees() -> None:
    from mesh.client import NodeInfo
    from mesh.node.beats import beat

    docs = [beat("c1", "coder", "h", 1, "v", 0, breakers={"edge": "closed", "swarm": "open"}),
            beat("c2", "coder", "h", 2, "v", 1, breakers={"edge": "half_open", "swarm": "open"}),
            beat("l1", "ledger", "h", 3, "v", 0)]  # a node that calls no model reports none
    view = ops.mesh_view([NodeInfo.model_validate(d) for d in docs], {}, {"coder": 2})
    assert [(b.tier, b.state, b.closed, b.half_open, b.open) for b in view["breakers"]] == [
        ("edge", "half_open", 1, 1, 0), ("swarm", "open", 0, 0, 2)]
    assert {c.role: (len(c.nodes), c.dead) for c in view["roles"]} == {"coder": (2, 2), "ledger": (1, 0)}


async def test_mesh_and_router_pages_read_heartbeats_and_the_ledger(settings: MeshSettings, eventually: Any) -> None:
    s = fast(settings)
    async with MeshClient.connect(s, name="dashboard-test") as client, \
            in_process_mesh(s, specs=role_specs(with_ledger=True)) as nodes, running(client, s) as gw, \
            httpx.AsyncClient(base_url=gw.url, timeout=60) as http:
        r = await http.post("/v1/goals", json={"brief": "Build me a login system"})
        goal_id = r.json()["goal_id"]
        async for _, event in client.watch(goal_id, until_final=True):
            final = event
        assert final.type == "goal.completed"
        roles = {n.spec.role for n in nodes}

        async def every_role_beats() -> bool:
            return {n.role for n in await client.nodes()} == roles
        await eventually(every_role_beats, timeout=20)
        page = (await http.get("/v1/ui/mesh")).text
        for role in roles:
            assert f"<td>{role}</td>" in page
        # every node that calls models publishes its circuits in its heartbeat: all closed on a healthy sim
        for tier in ("edge", "long_context", "swarm"):
            assert re.search(rf'<tr data-tier="{tier}"><td>{tier}</td><td class="breaker-closed">closed</td>', page)

        state = await client.goal(goal_id)
        assert state is not None
        spent = views.money(sum(st.usage.cost_usd for st in state.steps.values()), True)

        async def ledger_caught_up() -> bool:
            text = (await http.get("/v1/ui/router")).text
            found = re.search(r'id="actual-cost">([^<]+)<', text)
            return found is not None and found.group(1) == spent
        await eventually(ledger_caught_up, timeout=30)
        text = (await http.get("/v1/ui/router")).text
        assert re.search(r'id="baseline-cost">sim\$\d+\.\d{4}<', text) and "highest success rate" in text


async def test_the_inbox_and_the_goal_page_show_a_waiting_gate_with_its_form(settings: MeshSettings) -> None:
    async with gateway(fast(settings)) as (gw, client), httpx.AsyncClient(base_url=gw.url, timeout=60) as http:
        assert "Nothing waits for a person" in (await http.get("/v1/ui/approvals")).text
        r = await http.post("/v1/goals", json={"brief": "Build me a login system", "options": {"approve": "plan"}})
        goal_id = r.json()["goal_id"]
        async for _, event in client.watch(goal_id):
            if event.type == "approval.requested":
                break
        inbox = (await http.get("/v1/ui/approvals")).text
        assert f'data-gate="plan" data-goal="{goal_id}"' in inbox and "1 gate waiting" in inbox
        assert f'data-post="/v1/goals/{goal_id}/approvals/plan"' in inbox and 'value="approve"' in inbox
        page = (await http.get(f"/v1/ui/goals/{goal_id}")).text
        assert "Waiting for you" in page and 'id="goal-status">awaiting_approval' in page
        listed = (await http.get("/v1/ui/goals", params={"status": "awaiting_approval"})).text
        assert goal_id in listed
        await client.approve(goal_id, "plan", by="test")
        async for _, event in client.watch(goal_id, until_final=True):
            pass
        assert event.type == "goal.completed"
        assert "Nothing waits for a person" in (await http.get("/v1/ui/approvals")).text


async def test_history_is_a_goals_events_stored_now_and_ends(bus: Bus) -> None:
    """What a step's detail reads: exactly the goal's events so far, in order — and at once for a goal with
    none (an ordered consumer alone would wait for the first)."""
    assert await bus.history("nothing-yet") == []
    await bus.emit(StepStarted(goal_id="other", step_id="s1", role="test"))
    sent = [StepStarted(goal_id="g1", step_id=f"s{i}", role="test") for i in range(300)]
    for event in sent:
        await bus.emit(event)
    got = await bus.history("g1")
    assert [e.event_id for _, e in got] == [e.event_id for e in sent]
    assert [seq for seq, _ in got] == sorted(seq for seq, _ in got)
    await bus.emit(StepStarted(goal_id="g1", step_id="late", role="test"))
    assert len(await bus.history("g1")) == 301
