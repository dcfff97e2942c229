"""Approval gates through the gateway (docs/APPROVALS.md), against a real local mesh on the sim: the Mesh
API's inbox and decision endpoint, A2A's INPUT_REQUIRED and its resume on a decision message, and the MCP
tools. The decider is the gateway token's name."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from mesh.client import MeshClient
from mesh.config import MeshSettings
from mesh.contracts import ApprovalDecided, ApprovalRequested, GoalFailed
from tests.gatewaykit import gateway, tokens_file
from tests.meshkit import fast


async def gate_waiting(client: MeshClient, goal_id: str, gate: str, timeout: float = 60) -> ApprovalRequested:
    async with asyncio.timeout(timeout):
        async for _, event in client.watch(goal_id, 0):
            if isinstance(event, ApprovalRequested) and event.approval.gate == gate:
                return event
    raise AssertionError("the watch ended")


async def test_mesh_api_lists_and_decides_gates_as_the_tokens_name(settings: MeshSettings, tmp_path: Path) -> None:
    path, token = tokens_file(tmp_path)
    async with gateway(fast(settings, gateway_tokens_file=path)) as (gw, client), \
            httpx.AsyncClient(base_url=gw.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        body = {"brief": "Build me a login system", "options": {"approve": "plan,final", "sim_review": "approve"}}
        goal_id = (await http.post("/v1/goals", json=body)).json()["goal_id"]
        await gate_waiting(client, goal_id, "plan")
        inbox = (await http.get("/v1/approvals")).json()["approvals"]
        assert [(p["goal_id"], p["approval"]["gate"], p["approval"]["kind"]) for p in inbox] == [(goal_id, "plan",
                                                                                                   "plan")]
        assert inbox[0]["approval"]["plan"]["steps"]
        assert (await http.get(f"/v1/goals/{goal_id}")).json()["status"] == "awaiting_approval"
        summaries = (await http.get("/v1/goals")).json()["goals"]
        assert [s["status"] for s in summaries] == ["awaiting_approval"]

        bad = await http.post(f"/v1/goals/{goal_id}/approvals/plan", json={"decision": "maybe"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "decision"
        early = await http.post(f"/v1/goals/{goal_id}/approvals/final", json={"decision": "approve"})
        assert early.status_code == 409 and early.json()["error"]["code"] == "gate_not_pending"
        assert "no gate 'final'" in early.json()["error"]["message"]
        unknown = await http.post("/v1/goals/nope/approvals/plan", json={"decision": "approve"})
        assert unknown.status_code == 404

        r = await http.post(f"/v1/goals/{goal_id}/approvals/plan", json={"decision": "approve", "note": "fine"})
        assert r.status_code == 200, r.text
        assert r.json() == {"goal_id": goal_id, "gate": "plan", "decision": "approve", "by": "ci", "status": "applied"}
        again = await http.post(f"/v1/goals/{goal_id}/approvals/plan", json={"decision": "approve"})
        assert again.status_code == 409 and "already approved by ci" in again.json()["error"]["message"]

        await gate_waiting(client, goal_id, "final", timeout=120)
        r = await http.post(f"/v1/goals/{goal_id}/approvals/final",
                            json={"decision": "reject", "note": "NOTE-3b: not what I asked for"})
        assert r.status_code == 200 and r.json()["status"] == "applied"
        state = await client.goal(goal_id)
        assert state is not None and state.status == "failed" and "NOTE-3b" in (state.reason or "")
        assert (await http.get("/v1/approvals")).json() == {"approvals": []}


async def test_a2a_task_is_input_required_at_a_gate_and_resumes_on_a_decision_message(
        settings: MeshSettings) -> None:
    from a2a.client import ClientConfig, ClientFactory
    from a2a.helpers.proto_helpers import get_data_parts, get_message_text, new_data_part
    from a2a.types.a2a_pb2 import GetTaskRequest, Message, Part, Role, SendMessageRequest, TaskState
    from google.protobuf.struct_pb2 import Struct

    def message(*parts: Part, task_id: str = "") -> SendMessageRequest:
        return SendMessageRequest(message=Message(role=Role.ROLE_USER, parts=list(parts), task_id=task_id))

    async def send(a2a: Any, request: SendMessageRequest) -> Any:
        tasks = [r.task async for r in a2a.send_message(request) if r.HasField("task")]
        assert len(tasks) == 1
        return tasks[0]

    async with gateway(fast(settings)) as (gw, client), httpx.AsyncClient(timeout=60) as http:
        a2a = await ClientFactory(ClientConfig(httpx_client=http, streaming=False)).create_from_url(gw.url)
        options = Struct()
        options.update({"approve": "plan,final", "sim_review": "approve"})
        first = message(Part(text="Build me a login system"))
        first.message.metadata.CopyFrom(options)
        task = await send(a2a, first)  # returns at the plan gate
        assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
        assert "waiting for approval at gate plan" in get_message_text(task.status.message)
        [gate] = get_data_parts(task.status.message.parts)
        assert gate["gate"] == "plan" and gate["kind"] == "plan"
        again = await a2a.get_task(GetTaskRequest(id=task.id))
        assert again.status.state == TaskState.TASK_STATE_INPUT_REQUIRED

        task = await send(a2a, message(Part(text="approve"), task_id=task.id))  # plain text; returns at final
        assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
        assert get_data_parts(task.status.message.parts)[0]["gate"] == "final"
        decision = new_data_part({"decision": "approve", "gate": "final", "note": "ship it"})
        task = await send(a2a, message(decision, task_id=task.id))
        assert task.status.state == TaskState.TASK_STATE_COMPLETED

        decided = [e async for _, e in _until_final(client, task.id) if isinstance(e, ApprovalDecided)]
        assert [(d.gate, d.note) for d in decided] == [("plan", ""), ("final", "ship it")]
        assert all(d.by.endswith("(local gateway)") or d.by == "local gateway" for d in decided)
        try:
            await send(a2a, message(Part(text="reject: too late"), task_id=task.id))
        except Exception as exc:  # the SDK raises its own error type for a JSON-RPC error
            assert "has ended" in str(exc)
        else:
            raise AssertionError("a decision on an ended task must be refused")
        await a2a.close()


async def _until_final(client: MeshClient, goal_id: str) -> Any:
    async for item in client.watch(goal_id, 0, until_final=True):
        yield item


async def test_mcp_tools_list_and_decide_approvals(settings: MeshSettings) -> None:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async with gateway(fast(settings)) as (gw, client), httpx2.AsyncClient(timeout=60) as http, \
            Client(streamable_http_client(f"{gw.url}/mcp", http_client=http)) as mcp:  # type: ignore[arg-type]
        tools = {t.name for t in (await mcp.list_tools()).tools}
        assert {"list_approvals", "decide_approval"} <= tools
        submitted = await mcp.call_tool("submit_goal", {"brief": "Build me a login system",
                                                        "options": {"approve": "plan"}})
        goal_id = submitted.structured_content["goal_id"]  # type: ignore[index]
        await gate_waiting(client, goal_id, "plan")
        listed = (await mcp.call_tool("list_approvals", {})).structured_content
        assert [(p["goal_id"], p["approval"]["gate"]) for p in listed["approvals"]] == [(goal_id, "plan")]  # type: ignore[index]
        refused = await mcp.call_tool("decide_approval", {"goal_id": goal_id, "decision": "approve", "gate": "final"})
        assert refused.is_error and "no gate 'final'" in refused.content[0].text  # type: ignore[union-attr]
        decided = (await mcp.call_tool("decide_approval", {"goal_id": goal_id, "decision": "reject",
                                                           "note": "NOTE-mcp: smaller plan"})).structured_content
        assert decided["status"] == "applied" and decided["gate"] == "plan"  # type: ignore[index]
        second = await gate_waiting(client, goal_id, "plan")
        assert second.approval.plan is not None and second.approval.plan.version in (1, 2)
        await client.cancel(goal_id, by="test")
        ended = [e async for _, e in _until_final(client, goal_id)]
        assert not any(isinstance(e, GoalFailed) for e in ended)
