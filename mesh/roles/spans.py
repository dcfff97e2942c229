"""What the roles' spans say: the GenAI attributes (``gen_ai.*``, conventions pinned in
``mesh.tracing.GENAI_SEMCONV_VERSION``) and Mesh's own (``mesh.*``: goal, step, tier, routing decision,
cost, simulated). Called only while exporting (``tracing.on()``), so the step path builds none of it
otherwise. docs/TRACING.md lists every span and attribute."""

from __future__ import annotations

from datetime import datetime
from urllib.parse import urlsplit

from mesh import tracing
from mesh.backends.gateway import CallRecord
from mesh.backends.tiers import TierConfig
from mesh.contracts import RouteDecision, Task, Usage
from mesh.roles.goalstate import GoalState

GOAL_SPAN = "invoke_workflow mesh"
SUMMARISER = "summariser"  # the requester of the edge tier's summaries (mesh/backends/summarise.py)
WORKFLOW = "mesh"


def usage(u: Usage) -> dict[str, int | float]:
    """Token usage after the conventions (reasoning and cache reads where the provider reports them)."""
    attrs: dict[str, int | float] = {"gen_ai.usage.input_tokens": u.prompt_tokens,
                                     "gen_ai.usage.output_tokens": u.completion_tokens,
                                     "mesh.cost_usd": u.cost_usd}
    if u.reasoning_tokens:
        attrs["gen_ai.usage.reasoning.output_tokens"] = u.reasoning_tokens
    if u.cached_tokens:
        attrs["gen_ai.usage.cache_read.input_tokens"] = u.cached_tokens
    return attrs


def route(decision: RouteDecision, tier: TierConfig | None = None) -> dict[str, str | bool | float]:
    """The router's decision: the tier, thinking, the chance the policy picked it, exploration, overrides;
    with the ``tier``'s config, the model and provider it sends to (an agent span's)."""
    attrs: dict[str, str | bool | float] = {
        "mesh.route.tier": decision.tier, "mesh.route.thinking": decision.thinking,
        "mesh.route.propensity": decision.propensity, "mesh.route.explored": decision.explored,
        "mesh.route.model_version": decision.model_version}
    if decision.overridden_by:
        attrs["mesh.route.overridden_by"] = decision.overridden_by
    if tier is not None:
        attrs["gen_ai.request.model"] = tier.model
        attrs["gen_ai.provider.name"] = provider(tier)
    return attrs


def provider(tier: TierConfig) -> str:
    return tracing.provider_name(tier.kind, tier.model, tier.base_url)


def agent(task: Task, role: str, delivery_attempt: int) -> dict[str, str | int]:
    """``invoke_agent <role>``: one attempt of one step on a worker."""
    return {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": role,
            "gen_ai.conversation.id": task.goal_id, "mesh.goal.id": task.goal_id, "mesh.step.id": task.step.step_id,
            "mesh.step.attempt": task.attempt, "mesh.delivery.attempt": delivery_attempt}


def planning(state: GoalState, role: str, version: int) -> dict[str, str | int]:
    """``plan <role>``: the planner asking for a (re)plan."""
    return {"gen_ai.operation.name": "plan", "gen_ai.agent.name": role, "gen_ai.conversation.id": state.goal.goal_id,
            "mesh.goal.id": state.goal.goal_id, "mesh.plan.version": version}


def chat(rec: CallRecord, tier: TierConfig | None, decision: RouteDecision | None,
         step: tuple[str, str] | None) -> dict[str, str | bool | int | float]:
    """``chat <model>``: one model call attempt, its tier and the routing decision behind it."""
    attrs: dict[str, str | bool | int | float] = {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": rec.model,
        "gen_ai.provider.name": provider(tier) if tier else "openai",
        "mesh.tier": rec.tier, "mesh.simulated": rec.simulated, "mesh.call.attempt": rec.attempt,
        "mesh.thinking": rec.thinking, "mesh.outcome": rec.outcome, **usage(rec.usage)}
    if rec.requester:
        attrs["mesh.requester"] = rec.requester
    if rec.response_model:
        attrs["gen_ai.response.model"] = rec.response_model
    if rec.finish_reason:
        attrs["gen_ai.response.finish_reasons"] = rec.finish_reason
    if tier is not None and tier.base_url and (url := urlsplit(tier.base_url)).hostname:
        attrs["server.address"] = url.hostname
        attrs["server.port"] = url.port or (443 if url.scheme == "https" else 80)
    if rec.error is not None:
        attrs["error.type"] = rec.outcome
    if decision is not None and rec.requester != SUMMARISER:  # a summary is no routed call of the step
        attrs.update(route(decision))
        attrs["mesh.route.fallback"] = rec.tier != decision.tier
    if step is not None:
        attrs["mesh.goal.id"], attrs["mesh.step.id"] = step
    return attrs


def tool(name: str, call_id: str) -> dict[str, str]:
    """``execute_tool <tool>``: one tool call (its outcome is added when it returns)."""
    return {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name, "gen_ai.tool.call.id": call_id,
            "gen_ai.tool.type": "function"}


def record_goal(state: GoalState) -> None:
    """The goal span, once the goal has ended: under the ids chosen at planning (its children already
    name it), from the goal's start to its end, whichever planner process ends it."""
    if not tracing.on() or state.traceparent is None:
        return
    attrs: dict[str, str | bool | int | float] = {
        "gen_ai.operation.name": "invoke_workflow", "gen_ai.agent.name": WORKFLOW,
        "gen_ai.conversation.id": state.goal.goal_id, "mesh.goal.id": state.goal.goal_id,
        "mesh.goal.status": state.status, "mesh.goal.steps_run": state.steps_run, "mesh.goal.replans": state.replans,
        "mesh.simulated": state.simulated, **usage(state.usage)}
    if state.goal.submitter:
        attrs["mesh.goal.submitter"] = state.goal.submitter
    tracing.record(GOAL_SPAN, ids=state.traceparent, parent=state.trace_parent, start_ns=_ns(state.started_at),
                   end_ns=_ns(state.finished_at) if state.finished_at else None, attributes=attrs,
                   error=state.reason if state.status == "failed" else None)


def _ns(at: datetime) -> int:
    return int(at.timestamp() * 1e9)
