"""`mesh provision` is the one place streams and buckets are made; a node against an unprovisioned mesh
says so and stops, in `mesh node` and in its `--check`."""

from __future__ import annotations

import asyncio
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
    node = await asyncio.to_thread(_mesh, ["node", "coder"], env)
    assert node.returncode == 1 and f"mesh: error: {NOT_PROVISIONED}" in node.stderr, node.stderr
    check = await asyncio.to_thread(_mesh, ["node", "coder", "--check"], env)
    assert check.returncode == 1 and f"coder: bus: {NOT_PROVISIONED}" in check.stderr, check.stderr

    nodes = tmp_path / "nodes"  # the worker roles come from the role specs given, here only the coder's
    nodes.mkdir()
    for role in ("planner", "coder"):
        (nodes / f"{role}.toml").write_text((Path(__file__).parent.parent / "nodes" / f"{role}.toml").read_text())
    first = await asyncio.to_thread(_mesh, ["provision", "--nodes", str(nodes)], env)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert "created stream MESH_TASKS (subjects: mesh.task.coder)" in lines
    assert {"created KV bucket mesh_goals", "created object store mesh_artifacts",
            "created consumer role-coder on MESH_TASKS"} <= set(lines)
    assert lines[-1] == "provisioned 127.0.0.1: 14 changed; worker roles: coder"  # 5 streams, 5 buckets, 4 consumers
    again = await asyncio.to_thread(_mesh, ["provision", "--nodes", str(nodes)], env)
    assert again.stdout.splitlines() == ["provisioned 127.0.0.1: nothing changed; worker roles: coder"]
    assert (await asyncio.to_thread(_mesh, ["node", "coder", "--check"], env)).returncode == 0
    # a worker whose spec the admin did not provision
    tester = await asyncio.to_thread(_mesh, ["node", "tester", "--check"], env)
    assert "tester: bus: mesh not provisioned for role 'tester': stream MESH_TASKS does not take mesh.task.tester" \
        in tester.stderr, tester.stderr
    nc = await nats.connect(bare_nats.url)
    try:
        assert (await nc.jetstream().stream_info("MESH_TASKS")).config.subjects == ["mesh.task.coder"]
    finally:
        await nc.close()


async def test_provision_addresses_the_jetstream_domain_it_is_given(tmp_path: Path) -> None:
    """An edge site's Job runs `mesh provision --domain <site>`: the site's own JetStream is provisioned, and a
    wrong domain (pointed at the wrong server) fails instead of provisioning whatever answers."""
    conf = tmp_path / "site.conf"
    conf.write_text("jetstream {\n  domain: site-a\n}\n")
    async with EmbeddedNats(tmp_path / "nats", extra_args=["-c", str(conf)]) as site:
        env = node_env(MeshSettings(nats_url=site.url, data_dir=tmp_path / "mesh"))
        wrong = await asyncio.to_thread(_mesh, ["provision", "--domain", "site-b"], env)
        assert wrong.returncode == 1 and "mesh: error: provisioning the 'mesh' topology failed" in wrong.stderr, \
            wrong.stderr
        done = await asyncio.to_thread(_mesh, ["provision", "--domain", "site-a"], env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1].startswith("provisioned JetStream domain 'site-a' at 127.0.0.1:")
        nc = await nats.connect(site.url)
        try:
            assert (await nc.jetstream(domain="site-a").stream_info("MESH_TASKS")).config.subjects
        finally:
            await nc.close()
