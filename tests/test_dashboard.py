"""The dashboard without a browser: the DAG layout of a 200-step plan, the views' arithmetic, what needs a
token and what does not, refusals, and that a non-editable install ships the templates and assets."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from mesh.config import MeshSettings
from mesh.contracts import Goal, Plan, Step
from mesh.contracts.models import RouteDecision
from mesh.gateway.dashboard import dag, views
from mesh.roles.goalstate import GoalState
from mesh.router.features import FEATURE_NAMES, FEATURE_VERSION
from tests.gatewaykit import fast, gateway, tokens_file

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
    # the 197-wide layer wraps into columns of MAX_ROWS: the drawing is as tall as one column, not 197 rows
    assert height == 2 * dag.PAD + dag.MAX_ROWS * (dag.NODE_H + dag.ROW_GAP) - dag.ROW_GAP
    boxes = {(p.x, p.y) for p in placed.values()}
    assert len(boxes) == len(placed)  # no two steps drawn on top of each other
    assert all(0 <= p.x <= width - dag.NODE_W and 0 <= p.y <= height - dag.NODE_H for p in placed.values())
    # columns follow dependency depth: a step is right of everything it depends on
    assert all(placed[d].x < placed[sid].x for sid, st in state.steps.items() for d in st.step.depends_on)
    svg = dag.render(state.steps, selected="code")
    assert svg.count('class="step st-pending') == 200 and svg.count('<path class="edge"') == 197 * 2 + 1
    assert 'class="step st-pending selected" data-step="code"' in svg


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
        for public in ("/", "/ui/goals/abc", "/ui/mesh", "/ui/router", "/ui/approvals", "/ui/static/dashboard.js"):
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
    # build isolation: the backend pyproject.toml asks for (setuptools ≥ 68 reads its SPDX licence), from PyPI
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
                          capture_output=True, text=True, timeout=280, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("mesh_agents-*.whl"))
    shipped = set(zipfile.ZipFile(wheel).namelist())
    base = ROOT / "mesh" / "gateway" / "dashboard"
    wanted = {f"mesh/gateway/dashboard/{p.relative_to(base).as_posix()}" for folder in ("templates", "static")
              for p in (base / folder).iterdir()}
    assert wanted and wanted <= shipped, sorted(wanted - shipped)
