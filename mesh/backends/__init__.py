"""Layer 3, model I/O: one chat interface over OpenAI-compatible, Anthropic-compatible and sim
endpoints, organised in tiers (edge, long_context, swarm) behind a resilient ``ModelGateway``.
Pure of the bus: everything it needs is passed in."""

from mesh.backends.base import Backend, ChatMessage, ChatRequest, ChatResponse, ToolCallRequest, ToolSpec
from mesh.backends.gateway import BudgetGuard, CallRecord, ModelGateway
from mesh.backends.resilience import BreakerPolicy, RetryPolicy
from mesh.backends.tiers import Prices, SwarmConfig, TierConfig, is_simulated, load_tiers

__all__ = [
    "Backend", "BreakerPolicy", "BudgetGuard", "CallRecord", "ChatMessage", "ChatRequest", "ChatResponse",
    "ModelGateway", "Prices", "RetryPolicy", "SwarmConfig", "TierConfig", "ToolCallRequest", "ToolSpec",
    "is_simulated", "load_tiers",
]
