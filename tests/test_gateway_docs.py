"""docs/GATEWAY.md's examples run as written (curl in bash, the OpenAI, A2A and MCP snippets in Python)
against a real gateway with a token, over a real mesh on the sim."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.config import MeshSettings
from tests.gatewaykit import gateway, tokens_file
from tests.meshkit import ROOT, fast

DOC = ROOT / "docs" / "GATEWAY.md"
BLOCKS = re.findall(r"```(sh|python)\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_the_page_has_its_examples() -> None:
    assert [kind for kind, _ in BLOCKS] == ["sh", "python", "python", "python"]


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"{k}-{i}" for i, (k, _) in enumerate(BLOCKS)])
async def test_doc_example_runs(index: int, settings: MeshSettings, tmp_path: Path) -> None:
    kind, code = BLOCKS[index]
    path, token = tokens_file(tmp_path)
    async with gateway(fast(settings, gateway_tokens_file=path)) as (gw, _):
        env = {**os.environ, "MESH_GATEWAY_URL": gw.url, "MESH_TOKEN": token, "PYTHONPATH": str(ROOT)}
        argv = ["bash", "-euo", "pipefail", "-c", code] if kind == "sh" else [sys.executable, "-c", code]
        done = await asyncio.to_thread(subprocess.run, argv, env=env, cwd=tmp_path, capture_output=True,
                                       text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    expected = {"sh": "event: goal.completed", "python": ""}[kind]
    assert expected in done.stdout
    if kind == "sh":
        assert "completed" in done.stdout.splitlines() and "synthesis.md" not in done.stderr
