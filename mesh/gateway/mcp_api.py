"""MCP at ``/mcp`` (streamable HTTP, the ``mcp`` SDK's ``MCPServer``): tools to submit, follow, cancel and read
goals. Stateless HTTP with JSON responses: any replica answers any call, as with the other faces.

    submit_goal(brief, constraints, options, max_cost_usd, max_steps)  → goal id
    goal_status(goal_id)                                               → state, steps, usage
    goal_events(goal_id, after, limit, wait_seconds)                   → events after a stream sequence
    cancel_goal(goal_id, reason)
    goal_result(goal_id)                                               → synthesis, artifacts, workspace paths
    list_approvals(goal_id)                                            → gates waiting for a person
    decide_approval(goal_id, decision, gate, note)                     → approve / reject a pending gate

The decider of ``decide_approval`` is the gateway token's name: an MCP host should let its user make the
call (docs/APPROVALS.md) — a gate a model may approve on its own protects nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any, Literal, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from mcp.server.transport_security import TransportSecuritySettings
from starlette.routing import Route

from mesh.contracts.http import BudgetRequest, GoalRequest
from mesh.errors import RequestRefused
from mesh.gateway.auth import Principal
from mesh.gateway.goals import Desk, event_json, summary

MAX_EVENTS = 500
T = TypeVar("T")


def _refusals_as_tool_errors(tool: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """A refused request (unknown goal, over a cap, bad option) reaches the model as the tool's error text;
    anything else stays a crash the SDK logs."""

    @functools.wraps(tool)
    async def call(*args: Any, **kwargs: Any) -> T:
        try:
            return await tool(*args, **kwargs)
        except RequestRefused as exc:
            raise ToolError(str(exc)) from exc

    return call


def _caller(ctx: Context) -> Principal:
    who: Principal = ctx.request_context.request.scope["state"]["principal"]  # type: ignore[union-attr]
    return who


class McpFace:
    def __init__(self, desk: Desk) -> None:
        self.desk = desk
        root = logging.getLogger()
        kept = root.handlers[:], root.level
        self.server: MCPServer[Any] = MCPServer(
            "mesh", instructions="Mesh runs long goals on an agent mesh: submit_goal, then poll goal_status or "
                                 "goal_events (from the last sequence you saw) until done, then goal_result. A "
                                 "goal in status awaiting_approval waits for a person: list_approvals shows what "
                                 "waits; decide_approval only with your user's decision.")
        root.handlers[:], root.level = kept  # the SDK's logging.basicConfig must not take over the host's logs
        for tool in (self.submit_goal, self.goal_status, self.goal_events, self.cancel_goal, self.goal_result,
                     self.list_approvals, self.decide_approval):
            self.server.tool()(_refusals_as_tool_errors(tool))
        # The gateway's own guard authenticates; DNS-rebinding checks would refuse every non-loopback Host.
        self.server.streamable_http_app(stateless_http=True, json_response=True,
                                        transport_security=TransportSecuritySettings(
                                            enable_dns_rebinding_protection=False))

    def routes(self) -> list[Route]:
        return [Route("/mcp", StreamableHTTPASGIApp(self.server.session_manager), methods=["GET", "POST", "DELETE"])]

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with self.server.session_manager.run():
            yield

    async def submit_goal(self, brief: str, ctx: Context, constraints: list[str] | None = None,
                          options: dict[str, Any] | None = None, max_cost_usd: float | None = None,
                          max_steps: int | None = None) -> dict[str, Any]:
        """Submit a goal to the mesh (it runs on its own, for minutes to hours). Constraints are pinned into
        every step. Returns the goal id to poll with goal_status / goal_events."""
        request = GoalRequest(brief=brief, constraints=constraints or [], options=options or {},
                              budget=BudgetRequest(max_cost_usd=max_cost_usd, max_steps=max_steps))
        goal_id, _ = await self.desk.submit(_caller(ctx), request)
        return {"goal_id": goal_id}

    async def goal_status(self, goal_id: str) -> dict[str, Any]:
        """A goal's status (planning, running, completed, failed, cancelled), its steps and usage."""
        state = await self.desk.state(goal_id)
        return {**summary(state).model_dump(mode="json"), "reason": state.reason,
                "steps_detail": [{"step_id": sid, "role": st.step.role, "status": st.status}
                                 for sid, st in state.steps.items()]}

    async def goal_events(self, goal_id: str, after: int = 0, limit: int = 100,
                          wait_seconds: float = 1.0) -> dict[str, Any]:
        """Events of a goal after stream sequence `after` (0: from the start), oldest first: at most `limit`,
        returning once `wait_seconds` pass without a new one. Pass the last `seq` you got as `after` next time."""
        limit = max(1, min(limit, MAX_EVENTS))
        events: list[dict[str, Any]] = []
        async with aclosing(self.desk.events(goal_id, after)) as feed:
            while len(events) < limit:
                try:
                    async with asyncio.timeout(max(0.0, wait_seconds)):
                        seq, event = await anext(feed)
                except (TimeoutError, StopAsyncIteration):
                    break
                events.append({"seq": seq, **event_json(event)})
        return {"events": events, "next_after": events[-1]["seq"] if events else after}

    async def cancel_goal(self, goal_id: str, ctx: Context, reason: str = "cancelled through MCP") -> dict[str, Any]:
        """Ask the mesh to cancel a goal; its steps stop before their next model or tool call."""
        sent = await self.desk.cancel(_caller(ctx), goal_id, reason)
        return {"goal_id": goal_id, "cancel": "requested" if sent else "goal already ended"}

    async def list_approvals(self, goal_id: str | None = None) -> dict[str, Any]:
        """Approval gates waiting for a person (of every running goal, or of one): gate, kind (plan, before,
        after, final), what waits (summary, plan, outputs), deadline and what happens at it."""
        return {"approvals": [p.model_dump(mode="json") for p in await self.desk.approvals(goal_id)]}

    async def decide_approval(self, goal_id: str, decision: Literal["approve", "reject"], ctx: Context,
                              gate: str | None = None, note: str = "") -> dict[str, Any]:
        """Approve or reject a goal's pending gate (default: its only pending one). A rejection's note is the
        feedback: the next plan's prompt, or the review a revision addresses. Ask your user before calling."""
        by, decided = await self.desk.decide(_caller(ctx), goal_id, gate, decision, note)
        return {"goal_id": goal_id, "gate": decided.gate if decided else gate, "decision": decision, "by": by,
                "status": "applied" if decided is not None else "sent"}

    async def goal_result(self, goal_id: str) -> dict[str, Any]:
        """A finished goal's synthesis, its artifact names and workspace paths (status only while it runs)."""
        state = await self.desk.state(goal_id)
        if state.status != "completed":
            return {"goal_id": goal_id, "status": state.status, "reason": state.reason}
        results = await self.desk.results(goal_id)
        return {"goal_id": goal_id, "status": state.status, "synthesis": results.synthesis,
                "artifacts": sorted(results.artifacts), "workspace": sorted(results.workspace)}



