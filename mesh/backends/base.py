"""The one shape of a model call, whatever the provider: request, response, tool calls, and the
``Backend`` protocol every adapter (OpenAI-compatible, Anthropic-compatible, sim) implements.

Adapters translate to and from these types at their edge, so the gateway, the worker and the sim
never see a provider's wire format.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, Protocol, TypedDict

from pydantic import BaseModel, ConfigDict, Field

from mesh.contracts import Usage
from mesh.errors import BadRequest, MalformedResponse

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "error"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolSpec(_Model):
    """A function the model may call; ``parameters`` is its JSON schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolCallRequest(_Model):
    """A tool call the model asked for, in one internal shape for OpenAI and Anthropic."""

    id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ChatMessage(_Model):
    """One turn. ``reasoning`` is the model's thinking text: providers such as DeepSeek and Kimi
    require it to be sent back on assistant turns that made tool calls, so it travels with the turn.
    ``reasoning_signature`` is the Anthropic thinking-block signature needed for the same purpose."""

    role: Role
    content: str = ""
    reasoning: str | None = None
    reasoning_signature: str | None = None
    tool_calls: list[ToolCallRequest] = Field(default_factory=list)
    tool_call_id: str | None = Field(default=None, description="For role=tool: the call this answers.")
    name: str | None = None


class ChatRequest(_Model):
    messages: list[ChatMessage]
    tools: list[ToolSpec] = Field(default_factory=list)
    thinking: bool = False
    effort: str | None = Field(default=None, description="Reasoning effort (low|medium|high|max), if thinking.")
    max_tokens: int = Field(default=2048, ge=1)
    stream: bool = True
    json_schema: dict[str, Any] | None = Field(default=None, description="The reply must be JSON of this schema.")
    temperature: float | None = None
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="Hints that are not part of the prompt (difficulty, fan_out, sim_* options). Small scalars "
        "travel to HTTP endpoints in the X-Mesh-Hints header when the tier has send_hints (the sim-server).",
    )


class ChatResponse(_Model):
    text: str = ""
    reasoning: str | None = None
    reasoning_signature: str | None = None
    tool_calls: list[ToolCallRequest] = Field(default_factory=list)
    usage: Usage = Field(default_factory=lambda: Usage(calls=1))
    latency_ms: float = 0.0
    finish_reason: FinishReason = "stop"
    model: str = ""
    tier: str = ""
    endpoint: str = ""
    simulated: bool = False

    def as_message(self) -> ChatMessage:
        """The assistant turn to append to the conversation before sending tool results back."""
        return ChatMessage(
            role="assistant",
            content=self.text,
            reasoning=self.reasoning,
            reasoning_signature=self.reasoning_signature,
            tool_calls=list(self.tool_calls),
        )


class Backend(Protocol):
    """One endpoint + model. Raises only ``BackendError`` subclasses; never retries by itself."""

    async def chat(self, req: ChatRequest, *, timeout: float) -> ChatResponse: ...

    async def aclose(self) -> None: ...


class Where(TypedDict, total=False):
    """Where a backend error happened: the keyword arguments every ``BackendError`` takes."""

    tier: str | None
    endpoint: str | None
    status: int | None


HINTS_HEADER = "X-Mesh-Hints"
# How an adapter tells a sim-server answer from a real one: OpenAI's system_fingerprint, Anthropic's id prefix.
SIM_FINGERPRINT = "mesh-sim"
SIM_MESSAGE_PREFIX = "msg_sim_"

_WIRE_NAME_OK = re.compile(r"[^A-Za-z0-9_-]")


class ToolNames:
    """Maps tool names to what provider APIs accept (``^[A-Za-z0-9_-]{1,64}$``) and back.

    Mesh tools are named like ``fs.write``; the dot is illegal on the wire, so it travels as
    ``fs_write`` and returns as ``fs.write``. Built per request from the offered tools.
    """

    def __init__(self, tools: list[ToolSpec]) -> None:
        self._to_wire: dict[str, str] = {}
        self._from_wire: dict[str, str] = {}
        for t in tools:
            wire = _WIRE_NAME_OK.sub("_", t.name)[:64]
            if wire in self._from_wire and self._from_wire[wire] != t.name:
                raise BadRequest(f"tool names {self._from_wire[wire]!r} and {t.name!r} collide on the wire as {wire!r}")
            self._to_wire[t.name] = wire
            self._from_wire[wire] = t.name

    def wire(self, name: str) -> str:
        return self._to_wire.get(name) or _WIRE_NAME_OK.sub("_", name)[:64]

    def mesh(self, wire: str) -> str:
        return self._from_wire.get(wire, wire)


def hint_header(metadata: dict[str, Any]) -> dict[str, str]:
    """The ``X-Mesh-Hints`` header: the request's small scalar metadata as JSON (others skipped)."""
    small = {k: v for k, v in metadata.items() if isinstance(v, str | int | float | bool) and len(str(v)) <= 200}
    return {HINTS_HEADER: json.dumps(small, separators=(",", ":"))} if small else {}


def parse_tool_arguments(raw: str, name: str) -> dict[str, Any]:
    """A tool call's JSON arguments; ``MalformedResponse`` if the model's JSON is broken."""
    try:
        value = json.loads(raw or "{}")
    except json.JSONDecodeError as exc:
        raise MalformedResponse(f"tool call {name!r} has arguments that are not JSON: {raw[:200]!r}") from exc
    if not isinstance(value, dict):
        raise MalformedResponse(f"tool call {name!r} has arguments that are not a JSON object: {raw[:200]!r}")
    return value
