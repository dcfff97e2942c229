"""Layer 3, model I/O: one chat interface over OpenAI-compatible, Anthropic-compatible and sim
endpoints, organised in tiers (edge, long_context, swarm) behind a resilient ``ModelGateway``
(``mesh.backends.gateway``). Pure of the bus: everything it needs is passed in.

Only the light types are re-exported here, so importing them does not load the SDKs."""

from mesh.backends.base import Backend, ChatMessage, ChatRequest, ChatResponse, ToolCallRequest, ToolSpec
from mesh.backends.tiers import Prices, SwarmConfig, TierConfig, is_simulated, load_tiers

__all__ = [
    "Backend", "ChatMessage", "ChatRequest", "ChatResponse", "Prices", "SwarmConfig", "TierConfig",
    "ToolCallRequest", "ToolSpec", "is_simulated", "load_tiers",
]
