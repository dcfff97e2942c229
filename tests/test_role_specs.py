"""Role specs (`nodes/*.toml`): the shipped ones load, and a spec written wrong is refused at start with
an error that names the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.errors import NodeSpecError
from mesh.roles.spec import default_nodes_dir, load_spec, load_specs

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
