"""OpenAI-compatible endpoints through the official ``openai`` SDK: DeepSeek, Moonshot Kimi, vLLM,
SGLang, Ollama, llama.cpp's server and ``mesh sim-server``.

They agree on the chat-completions shape and differ in a few switches, captured per ``Dialect``:
how thinking is switched, whether reasoning text must be sent back on assistant turns that made
tool calls (DeepSeek and Kimi reject the next turn otherwise), whether temperature may be set
(Kimi K2.5/K2.6 fix it), the max-tokens parameter's name, and the JSON mode (llama.cpp's servers take
the schema inside a ``json_object`` response format and enforce it with a grammar, so a small model's
answer always parses). Reasoning text is
read from ``reasoning_content`` (DeepSeek, Kimi, SGLang, older vLLM) or ``reasoning`` (newer vLLM,
Ollama), in full responses and in stream deltas alike.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import openai

from mesh.backends.base import (
    SIM_FINGERPRINT,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    ToolCallRequest,
    ToolNames,
    hint_header,
    parse_tool_arguments,
)
from mesh.backends.sdk import sdk_call
from mesh.backends.tiers import TierConfig
from mesh.backends.tokens import estimate_tokens
from mesh.contracts import Usage
from mesh.errors import MalformedResponse, StreamCut

DialectName = Literal["deepseek", "kimi", "vllm", "llamacpp", "generic"]


@dataclass(frozen=True)
class Dialect:
    name: DialectName
    thinking_switch: Literal["thinking", "chat_template_kwargs", "none", "unsupported"]
    send_reasoning_back: bool
    temperature: bool
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"]
    json_mode: Literal["json_schema", "json_object", "json_object_schema"]
    # False: the server reports no usage in streams, so answers are requested whole (exact token counts).
    stream_usage: bool = True


DIALECTS: dict[DialectName, Dialect] = {
    # DeepSeek: extra_body thinking switch + reasoning_effort; JSON mode only as json_object.
    "deepseek": Dialect("deepseek", "thinking", True, True, "max_tokens", "json_object"),
    # Kimi K2.6: thinking on by default, off via extra_body; max_tokens is not honoured.
    "kimi": Dialect("kimi", "thinking", True, True, "max_completion_tokens", "json_object"),
    # vLLM / SGLang: thinking through the chat template (Qwen3-style enable_thinking).
    "vllm": Dialect("vllm", "chat_template_kwargs", False, True, "max_tokens", "json_schema"),
    # llama.cpp's server and llama-cpp-python's: {"type": "json_object", "schema": ...} becomes a grammar;
    # the small local models served there do not think, so no thinking switch is sent.
    # llama-cpp-python's server sends no usage in a stream; on a local server streaming gains nothing.
    "llamacpp": Dialect("llamacpp", "unsupported", False, True, "max_tokens", "json_object_schema", False),
    # Ollama, mesh sim-server and anything else: reasoning_effort when thinking.
    "generic": Dialect("generic", "none", False, True, "max_tokens", "json_schema"),
}

_FIXED_TEMPERATURE = ("k2.5", "k2.6", "k2-5", "k2-6")


def dialect_for(tier: TierConfig) -> Dialect:
    """The tier's dialect: ``dialect`` in its config, else guessed from the model and base URL."""
    if tier.dialect:
        return DIALECTS[tier.dialect]
    where = f"{tier.model} {tier.base_url or ''}".lower()
    if "deepseek" in where:
        return DIALECTS["deepseek"]
    if "kimi" in where or "moonshot" in where:
        return DIALECTS["kimi"]
    if any(k in where for k in ("llama.cpp", "llamacpp", "llama-cpp", ".gguf")):
        return DIALECTS["llamacpp"]
    return DIALECTS["generic"]


def _wire_messages(messages: list[ChatMessage], names: ToolNames, dialect: Dialect) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            out.append({"role": "tool", "tool_call_id": m.tool_call_id or "", "content": m.content})
        elif m.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": m.content or None}
            if m.tool_calls:
                msg["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": names.wire(c.name), "arguments": json.dumps(c.arguments)}}
                    for c in m.tool_calls
                ]
            if m.reasoning and dialect.send_reasoning_back:
                msg["reasoning_content"] = m.reasoning
            out.append(msg)
        else:
            out.append({"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})})
    return out


def _reasoning_of(obj: Any) -> str | None:
    return getattr(obj, "reasoning_content", None) or getattr(obj, "reasoning", None)


class OpenAIBackend:
    """One OpenAI-compatible endpoint + model."""

    def __init__(self, tier: TierConfig) -> None:
        self.tier = tier
        self.dialect = dialect_for(tier)
        # The SDK asks this provider for the key on every request: read from the env var the tier
        # names at call time (a rotated key is picked up), never stored; local servers take any key.
        async def api_key() -> str:
            return tier.api_key() or "not-needed"

        self._client = openai.AsyncOpenAI(base_url=tier.base_url, api_key=api_key, max_retries=0, timeout=tier.timeout)

    def _params(self, req: ChatRequest, names: ToolNames) -> dict[str, Any]:
        d = self.dialect
        messages = _wire_messages(req.messages, names, d)
        params: dict[str, Any] = {"model": self.tier.model, "messages": messages, d.max_tokens_param: req.max_tokens}
        extra: dict[str, Any] = {}
        if d.thinking_switch == "thinking":
            extra["thinking"] = {"type": "enabled" if req.thinking else "disabled"}
        elif d.thinking_switch == "chat_template_kwargs":
            extra["chat_template_kwargs"] = {"enable_thinking": req.thinking}
        if req.thinking and d.thinking_switch != "unsupported" and (req.effort or d.thinking_switch == "none"):
            # Without another switch, reasoning_effort is how Ollama and the sim turn thinking on.
            params["reasoning_effort"] = req.effort or "medium"
        fixed = d.name == "kimi" and any(k in self.tier.model.lower() for k in _FIXED_TEMPERATURE)
        temperature = req.temperature if req.temperature is not None else self.tier.temperature
        if temperature is not None and d.temperature and not fixed:
            params["temperature"] = temperature
        if self.tier.seed is not None:
            params["seed"] = self.tier.seed
        if req.tools:
            params["tools"] = [
                {"type": "function",
                 "function": {"name": names.wire(t.name), "description": t.description, "parameters": t.parameters}}
                for t in req.tools
            ]
        if req.json_schema is not None:
            if d.json_mode == "json_schema":
                params["response_format"] = {
                    "type": "json_schema", "json_schema": {"name": "output", "schema": req.json_schema, "strict": False}
                }
            elif d.json_mode == "json_object_schema":
                params["response_format"] = {"type": "json_object", "schema": req.json_schema}
            else:  # json_object mode: the schema must be in the prompt (and the word "json" with it)
                params["response_format"] = {"type": "json_object"}
                messages.insert(0, {"role": "system", "content": "Reply with a single JSON object matching this "
                                                                 f"JSON schema:\n{json.dumps(req.json_schema)}"})
        if req.stream and d.stream_usage:
            params["stream"] = True
            params["stream_options"] = {"include_usage": True}
        if extra:
            params["extra_body"] = extra
        if self.tier.send_hints and (headers := hint_header(req.metadata)):
            params["extra_headers"] = headers
        return params

    async def chat(self, req: ChatRequest, *, timeout: float) -> ChatResponse:
        names = ToolNames(req.tools)
        params = self._params(req, names)
        start = time.perf_counter()
        async with sdk_call(self.tier, timeout) as state:
            result = await self._client.chat.completions.create(**params, timeout=timeout)
            if params.get("stream"):
                text, reasoning, calls, finish, usage, fingerprint = await self._read_stream(result, names, state)
            else:
                text, reasoning, calls, finish, usage, fingerprint = self._read_full(result, names)
        return ChatResponse(
            text=text, reasoning=reasoning, tool_calls=calls, usage=self._usage(usage, req, text, reasoning),
            latency_ms=(time.perf_counter() - start) * 1000, finish_reason=_finish(finish),
            model=self.tier.model, tier=self.tier.name, endpoint=self.tier.endpoint,
            simulated=self.tier.simulated or fingerprint == SIM_FINGERPRINT,
        )

    async def _read_stream(self, stream: Any, names: ToolNames, state: Any) -> tuple[Any, ...]:
        text: list[str] = []
        reasoning: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        finish: str | None = None
        usage = fingerprint = None
        async with stream:
            async for chunk in stream:
                state.events += 1
                usage = getattr(chunk, "usage", None) or usage
                fingerprint = getattr(chunk, "system_fingerprint", None) or fingerprint
                for choice in getattr(chunk, "choices", None) or []:
                    delta = choice.delta
                    if delta is None:
                        continue
                    if delta.content:
                        text.append(delta.content)
                    if r := _reasoning_of(delta):
                        reasoning.append(r)
                    for tc in delta.tool_calls or []:
                        acc = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                        acc["id"] = tc.id or acc["id"]
                        if tc.function is not None:
                            acc["name"] += tc.function.name or ""
                            acc["arguments"] += tc.function.arguments or ""
                    finish = choice.finish_reason or finish
        if state.events == 0:
            raise MalformedResponse("the stream carried no events")
        if finish is None:
            raise StreamCut(f"the stream ended after {state.events} chunks without a finish reason")
        tool_calls = [
            ToolCallRequest(id=c["id"] or f"call_{i}", name=names.mesh(c["name"]),
                            arguments=parse_tool_arguments(c["arguments"], c["name"]))
            for i, c in sorted(calls.items())
        ]
        return "".join(text), "".join(reasoning) or None, tool_calls, finish, usage, fingerprint

    def _read_full(self, completion: Any, names: ToolNames) -> tuple[Any, ...]:
        choices = getattr(completion, "choices", None)
        if not isinstance(completion, openai.types.chat.ChatCompletion) or not choices:
            raise MalformedResponse(f"not a chat completion: {str(completion)[:200]!r}")
        msg = choices[0].message
        tool_calls = [
            ToolCallRequest(id=c.id, name=names.mesh(c.function.name),
                            arguments=parse_tool_arguments(c.function.arguments, c.function.name))
            for c in msg.tool_calls or [] if getattr(c, "function", None) is not None
        ]
        return (msg.content or "", _reasoning_of(msg), tool_calls, choices[0].finish_reason, completion.usage,
                completion.system_fingerprint)

    def _usage(self, raw: Any, req: ChatRequest, text: str, reasoning: str | None) -> Usage:
        if raw is None:  # some local servers send no usage: estimate rather than count zero
            prompt = sum(estimate_tokens(m.content) for m in req.messages)
            completion, cached, reasoning_tokens = estimate_tokens(text + (reasoning or "")), 0, 0
        else:
            prompt, completion = raw.prompt_tokens or 0, raw.completion_tokens or 0
            details = getattr(raw, "prompt_tokens_details", None)
            cached = getattr(details, "cached_tokens", None) or getattr(raw, "prompt_cache_hit_tokens", None) or 0
            reasoning_tokens = getattr(getattr(raw, "completion_tokens_details", None), "reasoning_tokens", None) or 0
        cost = self.tier.prices.cost(prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
                     reasoning_tokens=reasoning_tokens, cost_usd=cost, calls=1)

    async def aclose(self) -> None:
        await self._client.close()


def _finish(reason: str | None) -> Any:
    return reason if reason in ("stop", "length", "tool_calls", "content_filter") else "stop"
