"""`mesh provision` is the one place streams and buckets are made; a node against an unprovisioned mesh
says so and stops, in `mesh node` and in its `--check`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nats

from mesh.config import MeshSettings
from mesh.embedded import EmbeddedNats
from tests.meshkit import node_env

NOT_PROVISIONED = "mesh not provisioned: stream MESH_GOALS missing — run `mesh provision`"


def _mesh(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


async def test_a_node_against_an_unprovisioned_mesh_stops_with_the_reason_until_mesh_provision_runs(
        bare_nats: EmbeddedNats, tmp_path: Path) -> None:
    env = node_env(MeshSettings(nats_url=bare_nats.url, data_dir=tmp_path / "mesh"))
    node = _mesh(["node", "coder"], env)
    assert node.returncode == 1 and f"mesh: error: {NOT_PROVISIONED}" in node.stderr, node.stderr
    check = _mesh(["node", "coder", "--check"], env)
    assert check.returncode == 1 and f"coder: bus: {NOT_PROVISIONED}" in check.stderr, check.stderr

    nodes = tmp_path / "nodes"  # the worker roles come from the role specs given, here only the coder's
    nodes.mkdir()
    for role in ("planner", "coder"):
        (nodes / f"{role}.toml").write_text((Path(__file__).parent.parent / "nodes" / f"{role}.toml").read_text())
    first = _mesh(["provision", "--nodes", str(nodes)], env)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert "created stream MESH_TASKS (subjects: mesh.task.coder)" in lines
    assert {"created KV bucket mesh_goals", "created object store mesh_artifacts",
            "created consumer role-coder on MESH_TASKS"} <= set(lines)
    assert lines[-1] == "provisioned 127.0.0.1: 14 changed; worker roles: coder"  # 5 streams, 5 buckets, 4 consumers
    again = _mesh(["provision", "--nodes", str(nodes)], env)
    assert again.stdout.splitlines() == ["provisioned 127.0.0.1: nothing changed; worker roles: coder"]
    assert _mesh(["node", "coder", "--check"], env).returncode == 0
    tester = _mesh(["node", "tester", "--check"], env)  # a worker whose spec the admin did not provision
    assert "tester: bus: mesh not provisioned for role 'tester': stream MESH_TASKS does not take mesh.task.tester" \
        in tester.stderr, tester.stderr
    nc = await nats.connect(bare_nats.url)
    try:
        assert (await nc.jetstream().stream_info("MESH_TASKS")).config.subjects == ["mesh.task.coder"]
    finally:
        await nc.close()
