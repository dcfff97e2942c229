"""The gateway against a real local mesh on the sim (nats-server, every role in process, real HTTP): the
Mesh API and its resumable SSE stream, the official openai SDK, the mcp client and the a2a-sdk client."""

from __future__ import annotations

import asyncio
import io
import json
import random
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from mesh.config import MeshSettings
from tests.gatewaykit import gateway, tokens_file
from tests.meshkit import fast


async def sse(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """Parsed SSE messages ({"id", "event", "data"}) of a streaming response; comments are skipped."""
    message: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if not line:
            if "data" in message:
                yield message
            message = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            message[field] = message.get(field, "") + ("\n" if field == "data" and field in message else "") + value


async def wait_done(http: httpx.AsyncClient, goal_id: str) -> list[tuple[int, dict[str, Any]]]:
    """Every event of the goal, from one uninterrupted stream."""
    async with http.stream("GET", f"/v1/goals/{goal_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [(int(m["id"]), json.loads(m["data"])) async for m in sse(r) if "id" in m]


async def test_mesh_api_submit_idempotent_state_events_workspace_artifacts(settings: MeshSettings,
                                                                            tmp_path: Path) -> None:
    path, token = tokens_file(tmp_path)
    s = fast(settings, gateway_tokens_file=path)
    async with gateway(s) as (gw, client), \
            httpx.AsyncClient(base_url=gw.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        body = {"brief": "Build me a login system", "constraints": ["use bcrypt"], "budget": {"max_steps": 60}}
        r = await http.post("/v1/goals", json=body, headers={"Idempotency-Key": "k-1"})
        assert r.status_code == 202, r.text
        goal_id = r.json()["goal_id"]
        assert r.headers["X-Mesh-Goal-Id"] == goal_id and r.headers["Location"] == f"/v1/goals/{goal_id}"
        events = await wait_done(http, goal_id)
        seqs = [seq for seq, _ in events]
        assert seqs == sorted(set(seqs)) and events[-1][1]["type"] == "goal.completed"
        assert events[0][1]["type"] == "goal.submitted"
        # the same key again, after the goal ran: the same goal, nothing new submitted
        again = await http.post("/v1/goals", json=body, headers={"Idempotency-Key": "k-1"})
        assert again.status_code == 200 and again.json() == {**r.json(), "replayed": True}
        assert len(await client.goals()) == 1
        state = (await http.get(f"/v1/goals/{goal_id}")).json()
        assert state["status"] == "completed" and state["goal"]["submitter"] == "ci"
        assert state["goal"]["constraints"] == ["use bcrypt"] and state["goal"]["budget"]["max_steps"] == 60
        listed = (await http.get("/v1/goals")).json()["goals"]
        assert [g["goal_id"] for g in listed] == [goal_id] and listed[0]["submitter"] == "ci"
        # the final workspace as tar.gz, and an artifact by name
        ws = await http.get(f"/v1/goals/{goal_id}/workspace")
        assert ws.status_code == 200 and ws.headers["content-type"] == "application/gzip"
        results = await client.results(goal_id)
        with tarfile.open(fileobj=io.BytesIO(ws.content), mode="r:gz") as tar:
            assert sorted(tar.getnames()) == sorted(results.workspace)
        name = min(results.artifacts)
        art = await http.get(f"/v1/goals/{goal_id}/artifacts/{name}")
        assert art.status_code == 200 and art.content == results.artifacts[name]
        assert (await http.get(f"/v1/goals/{goal_id}/artifacts/nope.md")).status_code == 404
        # cancelling a finished goal sends nothing
        c = await http.post(f"/v1/goals/{goal_id}/cancel", json={})
        assert c.status_code == 200 and c.json()["cancel"] == "goal already ended"
        # a resume position the stream no longer keeps is named, not silently skipped — and the OpenAPI doc
        assert (await http.get(f"/v1/goals/{goal_id}/events", headers={"Last-Event-ID": "-1"})).status_code == 400
        doc = (await http.get("/openapi.json")).json()
        assert doc["openapi"].startswith("3.1") and "/v1/goals/{goal_id}/events" in doc["paths"]


async def test_sse_client_dropping_five_times_gets_every_event_once_in_order(settings: MeshSettings) -> None:
    rng = random.Random(7)
    s = fast(settings, sim_latency_scale=0.02)
    async with gateway(s) as (gw, client), httpx.AsyncClient(base_url=gw.url, timeout=60) as http:
        r = await http.post("/v1/goals", json={"brief": "Build me a login system",
                                               "options": {"sim_plan_steps": 20}})
        goal_id = r.json()["goal_id"]
        got: list[int] = []
        drops = 0
        last: str | None = None
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            cut = rng.randint(1, 12) if drops < 5 else None
            async with http.stream("GET", f"/v1/goals/{goal_id}/events", headers=headers) as stream:
                n, final = 0, False
                async for m in sse(stream):
                    got.append(int(m["id"]))
                    last = m["id"]
                    n += 1
                    final = json.loads(m["data"])["type"] in ("goal.completed", "goal.failed", "goal.cancelled")
                    if cut is not None and n == cut and not final:
                        break  # drop the connection mid-stream
            if final:
                break
            drops += 1
        assert drops == 5
        every = [seq async for seq, _ in client.watch(goal_id, from_seq=0, until_final=True)]
        assert got == every  # exactly once each, in order
        planned = [e for _, e in (await _events(client, goal_id)) if e.type == "goal.planned"]
        assert len(planned[0].plan.steps) >= 20


async def _events(client: Any, goal_id: str) -> list[Any]:
    return [(seq, e) async for seq, e in client.watch(goal_id, from_seq=0, until_final=True)]


async def test_openai_sdk_models_streaming_and_non_streaming(settings: MeshSettings) -> None:
    from openai import AsyncOpenAI

    async with gateway(fast(settings)) as (gw, client):
        sdk = AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused-on-loopback", max_retries=0)
        assert "mesh" in [m.id async for m in sdk.models.list()]
        stream = await sdk.chat.completions.create(
            model="mesh", stream=True, stream_options={"include_usage": True}, max_tokens=1024,
            messages=[{"role": "system", "content": "use bcrypt"}, {"role": "user", "content": "Build a login"}])
        progress, text, usage = [], [], None
        async for chunk in stream:
            if chunk.object == "mesh.progress":
                progress.append(chunk.progress)  # type: ignore[attr-defined]
                assert chunk.choices == []
            elif chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
            elif chunk.usage is not None:
                usage = chunk.usage
        goal_id = stream.response.headers["x-mesh-goal-id"]
        assert any(p["type"] == "step.completed" for p in progress) and progress[-1]["type"] == "goal.completed"
        results = await client.results(goal_id)
        assert "".join(text) == results.synthesis and results.state.goal.constraints == ["use bcrypt"]
        assert usage is not None and usage.total_tokens == results.state.usage.total_tokens > 0
        done = await sdk.chat.completions.with_raw_response.create(
            model="mesh", messages=[{"role": "user", "content": "Build me a login system"}])
        completion = done.parse()
        goal_id = done.headers["x-mesh-goal-id"]
        assert completion.choices[0].message.content == (await client.results(goal_id)).synthesis
        assert completion.choices[0].finish_reason == "stop"


async def test_openai_non_streaming_times_out_with_504_and_the_goal_runs_on(settings: MeshSettings) -> None:
    from openai import APIStatusError, AsyncOpenAI

    async with gateway(fast(settings, sim_latency_scale=0.05, gateway_request_timeout=0.3)) as (gw, client):
        sdk = AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
        try:
            await sdk.chat.completions.create(model="mesh", messages=[{"role": "user", "content": "Build it"}])
        except APIStatusError as exc:
            assert exc.status_code == 504
            goal_id = exc.body["goal_id"]  # type: ignore[index]
            assert exc.response.headers["x-mesh-goal-id"] == goal_id
        else:
            raise AssertionError("expected a 504")
        events = await _events(client, goal_id)
        assert events[-1][1].type == "goal.completed"


async def test_mcp_client_lists_tools_submits_and_polls_to_completion(settings: MeshSettings) -> None:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async with gateway(fast(settings)) as (gw, client), httpx2.AsyncClient(timeout=60) as http, \
            Client(streamable_http_client(f"{gw.url}/mcp", http_client=http)) as mcp:  # type: ignore[arg-type]
        tools = {t.name for t in (await mcp.list_tools()).tools}
        assert tools == {"submit_goal", "goal_status", "goal_events", "cancel_goal", "goal_result", "list_approvals",
                         "decide_approval"}
        submitted = await mcp.call_tool("submit_goal", {"brief": "Build me a login system",
                                                        "constraints": ["use bcrypt"]})
        goal_id = submitted.structured_content["goal_id"]  # type: ignore[index]
        after, seen = 0, []
        while True:
            page = (await mcp.call_tool("goal_events", {"goal_id": goal_id, "after": after,
                                                        "wait_seconds": 5})).structured_content
            seen += [e["seq"] for e in page["events"]]  # type: ignore[index]
            after = page["next_after"]  # type: ignore[index]
            status = (await mcp.call_tool("goal_status", {"goal_id": goal_id})).structured_content
            if status["status"] in ("completed", "failed", "cancelled") and not page["events"]:  # type: ignore[index]
                break
        assert status["status"] == "completed"  # type: ignore[index]
        assert seen == [seq for seq, _ in await _events(client, goal_id)]
        result = (await mcp.call_tool("goal_result", {"goal_id": goal_id})).structured_content
        assert result["synthesis"] == (await client.results(goal_id)).synthesis  # type: ignore[index]


async def test_a2a_card_streaming_then_disconnect_and_resubscribe_exactly_once(settings: MeshSettings) -> None:
    from a2a.client import ClientCallContext, ClientConfig, ClientFactory
    from a2a.types.a2a_pb2 import (
        GetTaskRequest,
        ListTasksRequest,
        Message,
        Part,
        Role,
        SendMessageRequest,
        SubscribeToTaskRequest,
        TaskState,
    )

    from mesh.gateway.a2a_api import RESUME_EXTENSION

    def seq(response: Any) -> int | None:
        update = response.status_update if response.HasField("status_update") else \
            response.artifact_update if response.HasField("artifact_update") else None
        return int(update.metadata["mesh.seq"]) if update is not None else None

    async with gateway(fast(settings, sim_latency_scale=0.02)) as (gw, client), httpx.AsyncClient(timeout=60) as http:
        for path in ("/.well-known/agent-card.json", "/.well-known/agent.json"):
            card = (await http.get(gw.url + path)).json()
            assert card["capabilities"]["streaming"] is True
            assert RESUME_EXTENSION in [e["uri"] for e in card["capabilities"]["extensions"]]
            assert {"coder", "planner", "reviewer"} <= {s["id"] for s in card["skills"]}
        a2a = await ClientFactory(ClientConfig(httpx_client=http)).create_from_url(gw.url)
        request = SendMessageRequest(message=Message(role=Role.ROLE_USER, message_id="m-1",
                                                     parts=[Part(text="Build me a login system")]))
        first: list[int] = []
        task_id = ""
        stream = a2a.send_message(request)
        async for response in stream:
            if response.HasField("task"):
                task_id = response.task.id
            elif (s := seq(response)) is not None:
                first.append(s)
                if response.HasField("status_update") and len(first) >= 4:
                    break  # disconnect mid-goal
        await stream.aclose()
        assert task_id and first
        # re-subscribe from the last sequence seen: every later update, exactly once
        resumed: list[int] = []
        states: list[int] = []
        artifacts: list[str] = []
        context = ClientCallContext(service_parameters={"Mesh-Resume-After": str(first[-1])})
        async for response in a2a.subscribe(SubscribeToTaskRequest(id=task_id), context=context):
            assert not response.HasField("task")  # a resume sends no snapshot
            resumed.append(seq(response))  # type: ignore[arg-type]
            if response.HasField("status_update"):
                states.append(response.status_update.status.state)
            else:
                artifacts.append(response.artifact_update.artifact.name)
        assert states[-1] == TaskState.TASK_STATE_COMPLETED and "synthesis" in artifacts
        # what a client that never disconnected would have seen, per the extension's sequence numbers
        shown = {"goal.planned", "step.started", "step.progress", "step.completed", "step.failed",
                 "artifact.created", "goal.completed", "goal.failed", "goal.cancelled"}
        every = [s for s, e in await _events(client, task_id) if e.type in shown]
        combined = first + resumed
        assert sorted(set(combined)) == every  # nothing missed
        assert [s for s in resumed if s <= first[-1]] == []  # nothing twice
        # a plain re-subscribe to the finished task: its snapshot, then the stream ends
        plain = [r async for r in a2a.subscribe(SubscribeToTaskRequest(id=task_id))]
        assert len(plain) == 1 and plain[0].task.status.state == TaskState.TASK_STATE_COMPLETED
        task = await a2a.get_task(GetTaskRequest(id=task_id))
        assert task.artifacts[0].parts[0].text == (await client.results(task_id)).synthesis
        listed = await a2a.list_tasks(ListTasksRequest())
        assert [t.id for t in listed.tasks] == [task_id]
        await a2a.close()


async def test_mesh_up_serves_a_gateway_on_loopback_and_prints_its_url(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from tests.meshkit import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(PYTHONPATH=str(ROOT), MESH_DATA_DIR=str(tmp_path / "mesh"), MESH_SIM_LATENCY_SCALE="0",
               MESH_EDGE_MODEL="off", MESH_GATEWAY_PORT="0", MESH_DRAIN_SECONDS="5")
    proc = subprocess.Popen([sys.executable, "-m", "mesh", "up"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,  # noqa: ASYNC220
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = ""
        while not line.startswith("gateway on "):
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
            assert line, "mesh up ended before it printed the gateway's URL"
        url = line.split()[2]
        assert url.startswith("http://127.0.0.1:")
        dashboard = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert dashboard.startswith(f"dashboard on {url}/ "), dashboard
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            assert [m["id"] for m in (await http.get("/v1/models")).json()["data"]] == ["mesh"]
            assert (await http.get("/readyz")).status_code == 200
            page = await http.get("/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    finally:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(asyncio.to_thread(proc.wait), 60) == 130  # stopped by Ctrl-C, cleanly


async def test_a_goal_can_start_from_an_uploaded_workspace(settings: MeshSettings) -> None:
    def tar_gz(files: dict[str, bytes]) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return out.getvalue()

    async with gateway(fast(settings)) as (gw, client), httpx.AsyncClient(base_url=gw.url, timeout=60) as http:
        goal = json.dumps({"brief": "Add a login page to this project"})
        project = {"README.md": b"# my project\n", "legacy/keep_me.py": b"print('kept')\n"}
        r = await http.post("/v1/goals", data={"goal": goal}, files={"workspace": ("p.tar.gz", tar_gz(project))})
        assert r.status_code == 202, r.text
        goal_id = r.json()["goal_id"]
        events = await wait_done(http, goal_id)
        assert events[-1][1]["type"] == "goal.completed"
        ws = await http.get(f"/v1/goals/{goal_id}/workspace")
        with tarfile.open(fileobj=io.BytesIO(ws.content), mode="r:gz") as tar:
            member = tar.extractfile("legacy/keep_me.py")
            assert member is not None and member.read() == b"print('kept')\n"
        # an archive that climbs out of its folder is refused before anything is stored
        bad = await http.post("/v1/goals", data={"goal": goal},
                              files={"workspace": ("p.tar.gz", tar_gz({"../evil.py": b"x"}))})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "workspace"
        missing = await http.post("/v1/goals", files={"goal": (None, goal)})  # multipart, no file
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "workspace"
        form = await http.post("/v1/goals", data={"goal": goal})  # urlencoded: neither JSON nor multipart
        assert form.status_code == 415 and form.json()["error"]["param"] == "Content-Type"
        assert len(await client.goals()) == 1


async def test_cancel_through_the_gateway_is_a_command_the_planner_applies(settings: MeshSettings,
                                                                           tmp_path: Path) -> None:
    path, token = tokens_file(tmp_path)
    s = fast(settings, sim_latency_scale=0.05, gateway_tokens_file=path)
    async with gateway(s) as (gw, client), \
            httpx.AsyncClient(base_url=gw.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        r = await http.post("/v1/goals", json={"brief": "Build me a login system", "options": {"sim_plan_steps": 20}})
        goal_id = r.json()["goal_id"]
        async with http.stream("GET", f"/v1/goals/{goal_id}/events") as stream:
            async for m in sse(stream):
                if m.get("event") == "step.started":
                    break  # it is running
        c = await http.post(f"/v1/goals/{goal_id}/cancel", json={"reason": "changed my mind"})
        assert c.status_code == 202 and c.json()["cancel"] == "requested"
        events = await wait_done(http, goal_id)
        final = events[-1][1]
        assert final["type"] == "goal.cancelled" and final["reason"] == "changed my mind" and final["by"] == "ci"
        assert (await http.get(f"/v1/goals/{goal_id}")).json()["status"] == "cancelled"
        assert (await client.goal(goal_id)).status == "cancelled"  # type: ignore[union-attr]
