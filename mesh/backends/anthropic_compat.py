"""Anthropic-compatible endpoints (Anthropic, DeepSeek's Anthropic endpoint, ``mesh sim-server``)
through the official ``anthropic`` SDK.

Differences from the OpenAI shape handled here: the system prompt is a parameter, tool results
are ``tool_result`` blocks in a user turn, consecutive turns of one role are merged, thinking is a
content block whose signature must be sent back with it on a tool-use turn, and cached prompt
tokens are reported apart from ``input_tokens``.
"""

from __future__ import annotations

import time
from typing import Any

import anthropic

from mesh.backends.base import (
    SIM_MESSAGE_PREFIX,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    ToolCallRequest,
    ToolNames,
    hint_header,
    parse_tool_arguments,
)
from mesh.backends.sdk import CallState, sdk_call
from mesh.backends.tiers import TierConfig
from mesh.contracts import Usage
from mesh.errors import MalformedResponse, StreamCut

_STOP = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
         "tool_use": "tool_calls", "refusal": "content_filter"}
MIN_THINKING_BUDGET = 1024  # the API's floor; budget_tokens must also stay below max_tokens


def _blocks(m: ChatMessage, names: ToolNames) -> list[dict[str, Any]]:
    if m.role == "tool":
        return [{"type": "tool_result", "tool_use_id": m.tool_call_id or "", "content": m.content}]
    blocks: list[dict[str, Any]] = []
    if m.role == "assistant" and m.reasoning and m.reasoning_signature:
        blocks.append({"type": "thinking", "thinking": m.reasoning, "signature": m.reasoning_signature})
    if m.content:
        blocks.append({"type": "text", "text": m.content})
    blocks += [{"type": "tool_use", "id": c.id, "name": names.wire(c.name), "input": c.arguments} for c in m.tool_calls]
    return blocks


def _wire_messages(messages: list[ChatMessage], names: ToolNames) -> tuple[str, list[dict[str, Any]]]:
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "system":
            continue
        role = "assistant" if m.role == "assistant" else "user"  # tool results travel in a user turn
        blocks = _blocks(m, names)
        if out and out[-1]["role"] == role:
            out[-1]["content"] += blocks
        else:
            out.append({"role": role, "content": blocks})
    return system, out


class _Accumulator:
    """Content blocks, stop reason and usage, from a stream's events or a full message."""

    def __init__(self, names: ToolNames) -> None:
        self.names = names
        self.blocks: dict[int, dict[str, Any]] = {}
        self.stop: str | None = None
        self.usage: dict[str, int] = {}
        self.done = False
        self.message_id = ""

    def event(self, ev: Any) -> None:
        kind = getattr(ev, "type", None)
        if kind == "message_start":
            self.message_id = ev.message.id or ""
            self._usage(ev.message.usage)
        elif kind == "content_block_start":
            block = ev.content_block
            self.blocks[ev.index] = {"type": block.type, "text": getattr(block, "text", "") or "",
                                     "thinking": getattr(block, "thinking", "") or "",
                                     "signature": getattr(block, "signature", "") or "",
                                     "id": getattr(block, "id", ""), "name": getattr(block, "name", ""), "json": ""}
        elif kind == "content_block_delta":
            acc, d = self.blocks.setdefault(ev.index, {"type": "text", "text": ""}), ev.delta
            field = {"text_delta": ("text", "text"), "thinking_delta": ("thinking", "thinking"),
                     "signature_delta": ("signature", "signature"), "input_json_delta": ("json", "partial_json")}
            if d.type in field:
                key, attr = field[d.type]
                acc[key] = acc.get(key, "") + (getattr(d, attr, "") or "")
        elif kind == "message_delta":
            self.stop = ev.delta.stop_reason or self.stop
            self._usage(ev.usage)
        elif kind == "message_stop":
            self.done = True

    def message(self, msg: Any) -> None:
        if not isinstance(msg, anthropic.types.Message):
            raise MalformedResponse(f"not a message: {str(msg)[:200]!r}")
        for i, block in enumerate(msg.content):
            self.blocks[i] = {"type": block.type, "text": getattr(block, "text", "") or "",
                              "thinking": getattr(block, "thinking", "") or "",
                              "signature": getattr(block, "signature", "") or "", "id": getattr(block, "id", ""),
                              "name": getattr(block, "name", ""), "input": getattr(block, "input", None)}
        self.stop, self.done, self.message_id = msg.stop_reason, True, msg.id or ""
        self._usage(msg.usage)

    def _usage(self, u: Any) -> None:
        for key in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
            if (value := getattr(u, key, None)) is not None:
                self.usage[key] = value
        thinking = getattr(getattr(u, "output_tokens_details", None), "thinking_tokens", None)
        if thinking is not None:
            self.usage["thinking_tokens"] = thinking

    def tool_calls(self) -> list[ToolCallRequest]:
        calls = []
        for b in (self.blocks[i] for i in sorted(self.blocks)):
            if b["type"] == "tool_use":
                given = b.get("input")
                args = given if isinstance(given, dict) else parse_tool_arguments(b.get("json", ""), b["name"])
                calls.append(ToolCallRequest(id=b["id"], name=self.names.mesh(b["name"]), arguments=args))
        return calls

    def joined(self, kind: str, key: str) -> str:
        return "".join(b.get(key, "") for i, b in sorted(self.blocks.items()) if b["type"] == kind)


class AnthropicBackend:
    """One Anthropic-compatible endpoint + model."""

    def __init__(self, tier: TierConfig) -> None:
        self.tier = tier
        self._client = anthropic.AsyncAnthropic(
            base_url=tier.base_url, api_key=tier.api_key() or "not-needed", max_retries=0, timeout=tier.timeout
        )

    def _params(self, req: ChatRequest, names: ToolNames) -> dict[str, Any]:
        system, messages = _wire_messages(req.messages, names)
        params: dict[str, Any] = {"model": self.tier.model, "max_tokens": req.max_tokens, "messages": messages}
        if system:
            params["system"] = system
        if req.tools:
            params["tools"] = [{"name": names.wire(t.name), "description": t.description, "input_schema": t.parameters}
                               for t in req.tools]
        if req.thinking and req.max_tokens > MIN_THINKING_BUDGET:
            params["thinking"] = {"type": "enabled", "budget_tokens": max(MIN_THINKING_BUDGET, req.max_tokens // 2)}
        else:
            params["thinking"] = {"type": "disabled"}
        output: dict[str, Any] = {}
        if req.thinking and req.effort:
            output["effort"] = req.effort
        if req.json_schema is not None:
            output["format"] = {"type": "json_schema", "schema": req.json_schema}
        if output:
            params["output_config"] = output
        if req.temperature is not None and not req.thinking:  # thinking requires the default temperature
            params["extra_body"] = {"temperature": req.temperature}
        if self.tier.send_hints and (headers := hint_header(req.metadata)):
            params["extra_headers"] = headers
        return params

    async def chat(self, req: ChatRequest, *, timeout: float) -> ChatResponse:
        names = ToolNames(req.tools)
        acc = _Accumulator(names)
        self._client.api_key = self.tier.api_key() or "not-needed"  # read at call time, never stored elsewhere
        start = time.perf_counter()
        async with sdk_call(self.tier, timeout) as state:
            result = await self._client.messages.create(**self._params(req, names), stream=req.stream, timeout=timeout)
            if req.stream:
                await self._read_stream(result, acc, state)
            else:
                acc.message(result)
            if not acc.done:
                raise StreamCut(f"the stream ended after {state.events} events without message_stop")
            calls = acc.tool_calls()
        u = acc.usage
        cached = u.get("cache_read_input_tokens", 0)
        prompt = u.get("input_tokens", 0) + cached + u.get("cache_creation_input_tokens", 0)
        completion = u.get("output_tokens", 0)
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
                      reasoning_tokens=u.get("thinking_tokens", 0), calls=1,
                      cost_usd=self.tier.prices.cost(prompt_tokens=prompt, cached_tokens=cached,
                                                     completion_tokens=completion))
        return ChatResponse(
            text=acc.joined("text", "text"), reasoning=acc.joined("thinking", "thinking") or None,
            reasoning_signature=acc.joined("thinking", "signature") or None, tool_calls=calls, usage=usage,
            latency_ms=(time.perf_counter() - start) * 1000, finish_reason=_STOP.get(acc.stop or "", "stop"),  # type: ignore[arg-type]
            model=self.tier.model, tier=self.tier.name, endpoint=self.tier.endpoint,
            simulated=self.tier.simulated or acc.message_id.startswith(SIM_MESSAGE_PREFIX),
        )

    @staticmethod
    async def _read_stream(stream: Any, acc: _Accumulator, state: CallState) -> None:
        async with stream:
            async for event in stream:
                state.events += 1
                acc.event(event)
        if state.events == 0:
            raise MalformedResponse("the stream carried no events")

    async def aclose(self) -> None:
        await self._client.close()
