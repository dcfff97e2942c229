"""The gateway's guard: tokens, budget caps, size and rate limits, clear 4xx JSON errors — and a refused
request never reaches the bus. Real nats-server, real HTTP; no role nodes are needed for refusals."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from mesh.config import MeshSettings
from mesh.errors import ConfigError
from mesh.gateway.app import make_gateway
from tests.gatewaykit import gateway, tokens_file
from tests.meshkit import fast


def _error(r: httpx.Response, status: int, type_: str) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()["error"]
    assert body["type"] == type_ and body["message"]
    return body  # type: ignore[no-any-return]


async def test_tokens_caps_sizes_and_bad_json_are_refused_before_the_bus(settings: MeshSettings,
                                                                         tmp_path: Path) -> None:
    path, token = tokens_file(tmp_path, max_cost_usd=1.0, max_steps=50)
    s = fast(settings, gateway_tokens_file=path, gateway_max_body_bytes=1024 * 1024)
    async with gateway(s, roles=False) as (gw, client), httpx.AsyncClient(base_url=gw.url) as http:
        auth = {"Authorization": f"Bearer {token}"}
        # no token, a wrong one: 401 with a challenge
        r = await http.get("/v1/goals")
        assert _error(r, 401, "authentication_error")["code"] == "missing_token"
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = await http.post("/v1/goals", json={"brief": "b"}, headers={"Authorization": "Bearer nope"})
        assert _error(r, 401, "authentication_error")["code"] == "invalid_token"
        # public documents need none
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/.well-known/agent-card.json")).json()["name"] == "Mesh"
        # over the token's cap: 403 naming the cap
        r = await http.post("/v1/goals", json={"brief": "b", "budget": {"max_cost_usd": 5}}, headers=auth)
        body = _error(r, 403, "permission_error")
        assert body["param"] == "budget.max_cost_usd" and "cap of 1.0" in str(body["message"])
        # 10 MB: 413, by Content-Length and by counting a chunked body
        big = b"x" * (10 * 1024 * 1024)
        _error(await http.post("/v1/goals", content=big, headers=auth), 413, "request_too_large")

        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(10):
                yield b"x" * (1024 * 1024)

        _error(await http.post("/v1/goals", content=chunks(), headers=auth), 413, "request_too_large")
        # malformed JSON and a misspelt field: 400 with the reason
        r = await http.post("/v1/goals", content=b'{"brief": "b",', headers=auth)
        assert "malformed JSON" in str(_error(r, 400, "invalid_request_error")["message"])
        r = await http.post("/v1/goals", json={"brief": "b", "budget": {"max_cost": 1}}, headers=auth)
        assert _error(r, 400, "invalid_request_error")["param"] == "budget.max_cost"
        r = await http.post("/v1/goals", json={"brief": "b", "options": {"no_such": 1}}, headers=auth)
        assert "unknown goal option" in str(_error(r, 400, "invalid_request_error")["message"])
        r = await http.post("/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user",
                                                                                           "content": "hi"}]},
                            headers=auth)
        assert _error(r, 404, "invalid_request_error")["code"] == "model_not_found"
        _error(await http.get("/v1/goals/nope", headers=auth), 404, "not_found_error")
        r = await http.get("/v1/goals/x/events", headers={**auth, "Last-Event-ID": "abc"})
        assert _error(r, 400, "invalid_request_error")["param"] == "Last-Event-ID"
        # a goal within the body limit but too large for its goal state to fit the server's max_payload: 413
        r = await http.post("/v1/goals", json={"brief": "b", "constraints": ["c" * 600_000]}, headers=auth)
        assert _error(r, 413, "request_too_large")["code"] == "goal_too_large"
        # none of it reached the bus
        assert await client.goals() == []
        assert (await client.event_positions())[1] == 0


async def test_rate_limit_is_per_token_with_retry_after(settings: MeshSettings, tmp_path: Path) -> None:
    path, token = tokens_file(tmp_path, requests_per_minute=3)
    async with gateway(fast(settings, gateway_tokens_file=path), roles=False) as (gw, _), \
            httpx.AsyncClient(base_url=gw.url, headers={"Authorization": f"Bearer {token}"}) as http:
        codes = [(await http.get("/v1/goals")).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = await http.get("/v1/goals")
        assert _error(r, 429, "rate_limit_error")["code"] == "rate_limited"
        assert int(r.headers["retry-after"]) >= 1


async def test_a_non_loopback_bind_needs_tokens(settings: MeshSettings, tmp_path: Path) -> None:
    from mesh.client import MeshClient

    async with MeshClient.connect(settings) as client:
        with pytest.raises(ConfigError, match="without tokens"):
            make_gateway(client, settings, "0.0.0.0", 0)
        path, _ = tokens_file(tmp_path)
        gw = make_gateway(client, settings.model_copy(update={"gateway_tokens_file": path}), "127.0.0.1", 0)
        gw.sock.close()  # with tokens it would serve any address; bound on loopback here only


def test_token_command_output_and_the_k8s_template_load(tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    from mesh.gateway.auth import TokenStore
    from tests.meshkit import ROOT

    out = subprocess.run([sys.executable, "-m", "mesh", "gateway", "token", "ops", "--max-cost", "2.5", "--rate", "30"],
                         capture_output=True, text=True, check=True, env={"PYTHONPATH": str(ROOT)}).stdout
    token = out.splitlines()[0].rsplit(" ", 1)[1]
    (tmp_path / "t.toml").write_text(out)
    who = TokenStore.load(tmp_path / "t.toml").principal(f"Bearer {token}")
    assert (who.name, who.caps.max_cost_usd, who.requests_per_minute) == ("ops", 2.5, 30.0)
    assert token not in out.split("\n", 1)[1]  # only its hash is in the entry
    secret = yaml.safe_load((ROOT / "k8s" / "secrets" / "gateway-tokens.template.yaml").read_text())
    (tmp_path / "k.toml").write_text(secret["stringData"]["tokens.toml"])
    assert TokenStore.load(tmp_path / "k.toml")
    (tmp_path / "bad.toml").write_text('[[token]]\nname = "x"\nsha256 = "nothex"\n')
    with pytest.raises(ConfigError, match="bad.toml"):
        TokenStore.load(tmp_path / "bad.toml")
