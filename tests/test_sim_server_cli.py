"""`mesh sim-server` as its own process: starts, answers both APIs' SDKs, stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import sys
from pathlib import Path

import anthropic
import openai
import pytest

from mesh.backends.tiers import load_tiers

pytestmark = pytest.mark.timeout(60)


async def test_sim_server_subprocess() -> None:
    env = {**os.environ, "MESH_SIM_FAULTS": "", "MESH_SIM_LATENCY_SCALE": "0"}
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "mesh"), "sim-server", "--port", "0", "--seed", "3",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert m, line
        url = m.group(1)
        # a second one on the same port: a clear error, no traceback
        busy = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "mesh"), "sim-server", "--port", url.rsplit(":", 1)[1],
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        out, err = await asyncio.wait_for(busy.communicate(), 20)
        assert busy.returncode == 1 and out == b"", err
        assert f"cannot listen on {url[len('http://'):]}" in err.decode() and b"Traceback" not in err, err
        oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = await oai.chat.completions.create(
            model="sim-edge", messages=[{"role": "system", "content": "ROLE: researcher"},
                                        {"role": "user", "content": "## Goal\nA todo app"}])
        assert r.choices[0].message.content.startswith("[simulated]") and r.usage.prompt_tokens > 0
        ant = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)
        m2 = await ant.messages.create(model="sim-swarm", max_tokens=512, system="ROLE: reviewer",
                                       messages=[{"role": "user", "content": "## Goal\nA todo app"}])
        assert '"verdict"' in m2.content[0].text  # type: ignore[union-attr]
        await oai.close()
        await ant.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 10)
    assert code == 0


async def _sim_server(*flags: str) -> asyncio.subprocess.Process:
    """`mesh sim-server --port 0 FLAGS…` as its own process, no faults or latency, output piped."""
    return await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "mesh"), "sim-server", "--port", "0", *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "MESH_SIM_FAULTS": "", "MESH_SIM_LATENCY_SCALE": "0"})


async def test_print_env_points_a_node_at_the_sim_server() -> None:
    """`mesh sim-server --print-env`: the printed lines are the tier environment of a hand-started node;
    sourced (here: parsed), every tier calls this server through the real SDK path."""
    proc = await _sim_server("--print-env")
    try:
        assert proc.stdout is not None
        lines = []
        while not lines or lines[-1] != "# end of environment":
            lines.append((await asyncio.wait_for(proc.stdout.readline(), 20)).decode().rstrip("\n"))
        assert all(line.startswith(("# ", "export ")) for line in lines), lines  # the whole output can be sourced
        url = re.search(r"listening on (http://127\.0\.0\.1:\d+)", lines[0]).group(1)  # type: ignore[union-attr]
        env = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in lines
                   if line.startswith("export "))
        tiers = load_tiers(environ=env)
        assert {(t.kind, t.base_url) for t in tiers.values()} == {("openai", url + "/v1")}
        assert all(t.simulated for t in tiers.values()) and env["MESH_ALLOW_SIM"] == "1"  # said, and allowed
        oai = openai.AsyncOpenAI(base_url=tiers["edge"].base_url, api_key=env[tiers["edge"].api_key_env],
                                 max_retries=0)
        r = await oai.chat.completions.create(model=tiers["edge"].model,
                                              messages=[{"role": "user", "content": "## Goal\nA todo app"}])
        assert r.choices[0].message.content
        await oai.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_pose_as_real_answers_without_the_sim_marks() -> None:
    proc = await _sim_server("--pose-as-real")
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        url = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line).group(1)  # type: ignore[union-attr]
        oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = await oai.chat.completions.create(model="sim-edge", messages=[{"role": "user", "content": "## Goal\nA"}])
        assert r.choices[0].message.content and r.system_fingerprint is None
        ant = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)
        m = await ant.messages.create(model="sim-swarm", max_tokens=256, messages=[{"role": "user", "content": "A"}])
        assert m.id.startswith("msg_") and not m.id.startswith("msg_sim_")
        await oai.close()
        await ant.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
