"""Role specs (`nodes/*.toml`): the shipped ones load, and a spec written wrong is refused at start with
an error that names the file and the field."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.errors import NodeSpecError
from mesh.roles.spec import (
    default_nodes_dir,
    feedback_kinds,
    load_spec,
    load_specs,
    revising_roles,
    synthesizing_role,
)

ROOT = Path(__file__).resolve().parent.parent

WORKER = '''role = "{role}"
kind = "worker"
tools = ["fs.read"]

[prompts]
system = "You check things."
'''


def test_the_shipped_specs_load_and_cover_every_role() -> None:
    specs = load_specs(default_nodes_dir())
    assert set(specs) == {"planner", "researcher", "coder", "reviewer", "tester", "synthesizer", "ledger"}
    assert specs["tester"].verdict_from_tests and specs["reviewer"].verdicts


def test_a_new_worker_role_is_a_toml_file(tmp_path: Path) -> None:
    (tmp_path / "auditor.toml").write_text(WORKER.format(role="auditor"))
    spec = load_spec(tmp_path / "auditor.toml")
    assert (spec.role, spec.kind, spec.tools) == ("auditor", "worker", ["fs.read"])


@pytest.mark.parametrize(("change", "expected"), [
    (('tools = ["fs.read"]', 'tools = ["fs.rm"]'), "tools: Value error, unknown tool"),
    (('kind = "worker"', 'kind = "boss"'), "kind: Input should be 'orchestrator', 'worker' or 'recorder'"),
    (('tools = ["fs.read"]', 'tools = ["fs.read"]\nconcurrency = 0'), "concurrency: Input should be greater"),
    (('tools = ["fs.read"]', 'tools = ["fs.read"]\nconcurency = 2'), "concurency: Extra inputs are not permitted"),
    (('tools = ["fs.read"]', 'tools = ["fs.read"]\nshell_allow = ["pytest"]'), "shell.run is not in tools"),
    (('tools = ["fs.read"]', 'tools = ["fs.read"]\nverdict_from_tests = true'), "verdict_from_tests needs shell.run"),
    (('[prompts]', '[limits]\nmax_tool_rounds = -1\n\n[prompts]'), "limits.max_tool_rounds: Input should be greater"),
    (('role = "auditor"', 'role = "inspector"'), "must match the file name 'auditor'"),
    (('[prompts]', '[prompts'), "not valid TOML"),
])
def test_a_wrong_spec_is_refused_naming_the_file_and_the_field(tmp_path: Path, change: tuple[str, str],
                                                              expected: str) -> None:
    path = tmp_path / "auditor.toml"
    path.write_text(WORKER.format(role="auditor").replace(*change))
    with pytest.raises(NodeSpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value) and expected in str(info.value), info.value


def test_an_empty_nodes_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NodeSpecError, match="no role specs"):
        load_specs(tmp_path)


def test_the_jobs_of_a_role_are_spec_fields() -> None:
    specs = load_specs(default_nodes_dir())
    assert synthesizing_role(specs) == "synthesizer" and revising_roles(specs) == {"coder"}
    assert feedback_kinds(specs) == {"review", "test_report"} and specs["planner"].output_kind == "plan"


def test_two_synthesizers_or_a_planner_job_on_the_wrong_kind_are_refused(tmp_path: Path) -> None:
    for role in ("writer", "editor"):
        (tmp_path / f"{role}.toml").write_text(WORKER.format(role=role).replace('kind = "worker"',
                                                                                'kind = "worker"\nsynthesizes = true'))
    with pytest.raises(NodeSpecError, match="only one role may synthesize; editor, writer do"):
        load_specs(tmp_path)
    (tmp_path / "editor.toml").write_text(WORKER.format(role="editor").replace('kind = "worker"',
                                                                               'kind = "orchestrator"\nrevises = true'))
    with pytest.raises(NodeSpecError, match="revises and synthesizes are jobs of worker roles"):
        load_spec(tmp_path / "editor.toml")
    with pytest.raises(NodeSpecError, match="no role spec has synthesizes = true"):
        synthesizing_role({"auditor": load_spec(_auditor(tmp_path))})


def _auditor(tmp_path: Path) -> Path:
    (tmp_path / "auditor.toml").write_text(WORKER.format(role="auditor"))
    return tmp_path / "auditor.toml"


@pytest.mark.timeout(300)
def test_a_goal_completes_with_renamed_roles(tmp_path: Path) -> None:
    """Nothing knows a role by its name: rename the planner, the coder and the synthesizer (file and role) in
    a copy of nodes/ and `mesh run` still plans, implements, revises after review, tests and synthesises."""
    nodes = tmp_path / "nodes"
    shutil.copytree(default_nodes_dir(), nodes)
    for old, new in (("planner", "conductor"), ("coder", "developer"), ("synthesizer", "editor")):
        text = (nodes / f"{old}.toml").read_text().replace(f'role = "{old}"', f'role = "{new}"')
        (nodes / f"{new}.toml").write_text(text)
        (nodes / f"{old}.toml").unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(MESH_DATA_DIR=str(tmp_path / ".mesh"), MESH_OUT_DIR=str(tmp_path / "out"), MESH_NODES_DIR=str(nodes),
               MESH_SIM_LATENCY_SCALE="0", MESH_DRAIN_SECONDS="5", MESH_EDGE_MODEL="off",  # the sim, not SmolLM2
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "mesh", "run", "Build me a login system"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=280, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = next((tmp_path / "out").iterdir())
    state = json.loads((results / "goal.json").read_text())
    roles = {st["step"]["role"] for st in state["steps"].values()}
    assert {"developer", "editor"} <= roles and not {"coder", "synthesizer"} & roles
    revisions = [st for st in state["steps"].values() if st["step"]["revision_of"]]
    assert any(st["step"]["role"] == "developer" for st in revisions), "a review sent the developer's work back"
    assert state["result"]["name"].endswith("/synthesis"), "the goal's result is the editor's synthesis"
    assert any((results / "workspace").rglob("*.py")), "the developer's files are in the final workspace"
