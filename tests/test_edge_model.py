"""The real edge model: SmolLM2-135M-Instruct served by llama-cpp-python's OpenAI-compatible server as
the embedded default runs it, called through the mesh's own OpenAI-compatible backend over HTTP.

Skipped unless the ``edge`` extra is installed (``make edge``). Calls are few and short (the model
writes ~60 tokens/s on this machine): every request caps ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from mesh.backends.base import ChatMessage, ChatRequest
from mesh.backends.gateway import CallRecord, ModelGateway
from mesh.backends.openai_compat import OpenAIBackend
from mesh.backends.summarise import EdgeSummariser
from mesh.backends.tiers import TierConfig, load_tiers
from mesh.embedded.edge import MODEL_ALIAS, EdgeModelServer, missing_modules, packaged_model
from mesh.packing import estimate_tokens

pytestmark = [
    pytest.mark.skipif(bool(missing_modules()), reason=f"the edge extra is not installed (missing: "
                       f"{', '.join(missing_modules())}); install it with `make edge`"),
    pytest.mark.timeout(300),
]
CLASSIFY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {"label": {"enum": ["bug", "feature", "question"]},
                                                    "confidence": {"type": "number"}},
                   "required": ["label", "confidence"]}


@pytest.fixture(scope="module")
def edge_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeModelServer]:
    """One server for the module: the process is independent of any event loop, so plain asyncio.run."""
    server = EdgeModelServer(packaged_model(), tmp_path_factory.mktemp("edge") / "edge-model.log")
    asyncio.run(server.start())
    try:
        yield server
    finally:
        asyncio.run(server.stop())


@pytest.fixture
def edge_tier(edge_server: EdgeModelServer) -> TierConfig:
    return load_tiers(environ=edge_server.tier_env())["edge"]


@pytest.mark.parametrize("dialect", ["llamacpp", "generic"])
async def test_text_and_usage_from_the_real_model(edge_server: EdgeModelServer, dialect: str) -> None:
    """The llamacpp dialect asks for whole answers (the server's exact usage); a generic OpenAI-compatible
    configuration of the same server streams (the server sends no usage in streams: it is estimated)."""
    tier = load_tiers(environ=edge_server.tier_env() | {"MESH_TIER_EDGE_DIALECT": dialect})["edge"]
    backend = OpenAIBackend(tier)
    try:
        response = await backend.chat(ChatRequest(messages=[
            ChatMessage(role="user", content="What is the capital of France? Answer in one word.")],
            max_tokens=12, temperature=0.0, stream=True), timeout=60)
    finally:
        await backend.aclose()
    assert "paris" in response.text.lower(), response.text
    assert response.model == MODEL_ALIAS and response.tier == "edge" and not response.simulated
    assert response.usage.prompt_tokens > 5 and 0 < response.usage.completion_tokens <= 12
    assert response.usage.cost_usd == 0.0  # local: zero prices


@pytest.mark.parametrize("which", [CLASSIFY_SCHEMA, "verdict"], ids=["classify", "verdict"])
async def test_schema_constrained_json_always_parses(edge_tier: TierConfig, which: dict[str, Any] | str) -> None:
    from mesh.backends.structured import extract_json
    from mesh.roles.worker import VERDICT_SCHEMA, _verdict_of

    schema = VERDICT_SCHEMA if which == "verdict" else which
    assert isinstance(schema, dict)
    backend = OpenAIBackend(edge_tier)
    prompt = ("Review this change: `def login(u, p): return db.check(u, p)`. Answer with a verdict and notes."
              if schema is VERDICT_SCHEMA else "Classify this ticket: 'The login page crashes when I press Enter.'")
    try:
        response = await backend.chat(ChatRequest(messages=[ChatMessage(role="user", content=prompt)],
                                                  json_schema=schema, max_tokens=160, temperature=0.0), timeout=90)
    finally:
        await backend.aclose()
    assert response.finish_reason == "stop", f"cut at max_tokens: {response.text!r}"
    jsonschema.validate(json.loads(response.text), schema)
    if schema is VERDICT_SCHEMA:
        assert _verdict_of(extract_json(response.text)) in ("approve", "changes_requested")


async def test_edge_summary_by_the_real_model(edge_tier: TierConfig) -> None:
    calls: list[CallRecord] = []
    tiers = load_tiers(environ={}) | {"edge": edge_tier}
    gateway = ModelGateway(tiers, on_call=calls.append)
    text = "\n".join(
        ["The login service must hash passwords with bcrypt and lock an account after five failed attempts."]
        + [f"Meeting note {i}: we talked about the colour of the login button and lunch options." for i in range(25)])
    try:
        summary = await EdgeSummariser(gateway)(text, 96)
    finally:
        await gateway.aclose()
    assert summary.startswith(f"[summary of ~{estimate_tokens(text)} tokens by {MODEL_ALIAS}]")
    assert estimate_tokens(summary) <= 96 and len(summary.splitlines()[1].split()) >= 3
    assert [(c.tier, c.model, c.outcome) for c in calls] == [("edge", MODEL_ALIAS, "ok")]
    assert calls[0].usage.prompt_tokens > estimate_tokens(text) // 2 and calls[0].usage.completion_tokens > 0


async def test_start_and_stop_leave_no_process_behind(tmp_path: Path) -> None:
    server = EdgeModelServer(packaged_model(), tmp_path / "edge-model.log")
    await server.start()
    pid, port = server.pid, server.port
    assert pid is not None and port is not None and server.running and server.load_seconds is not None
    await server.stop()
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_mesh_run_completes_a_goal_with_a_step_on_the_real_edge_model(tmp_path: Path) -> None:
    """`mesh run` as a user runs it, with the extra installed: the edge tier is the real model. Nodes route
    by the role specs' preferences here (the rule policy; the router model file is absent), so the tester,
    which prefers the edge, runs there; the long-context and swarm tiers stay simulated."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(MESH_DATA_DIR=str(tmp_path / ".mesh"), MESH_OUT_DIR=str(tmp_path / "out"), MESH_SIM_LATENCY_SCALE="0",
               MESH_DRAIN_SECONDS="5", MESH_ROUTER_MODEL=str(tmp_path / "no-router.onnx"),
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, "-m", "mesh", "run", "Build me a login system", "--json"], check=False,
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "served locally by llama-cpp-python (real model)" in proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert events[-1]["type"] == "goal.completed"
    on_edge = [e for e in events if e["type"] == "backend.call" and e["tier"] == "edge" and e["outcome"] == "ok"]
    assert on_edge and all(e["model"] == MODEL_ALIAS for e in on_edge)
    assert all(e["usage"]["prompt_tokens"] > 0 and e["usage"]["completion_tokens"] > 0 for e in on_edge)
    tested = [e for e in events if e["type"] == "step.completed" and e["role"] == "tester"]
    assert tested and tested[-1]["tier"] == "edge"
    assert not (tmp_path / ".mesh" / "local.json").exists(), "the local mesh (edge server included) was stopped"
