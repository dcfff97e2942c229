"""The two HTTP APIs the sim-server speaks, as data: request JSON → ``ChatRequest``, a ``SimReply``
→ a full response body or a list of SSE frames, and error bodies — shaped like the real APIs so the
official SDKs parse them unchanged.

A frame is ``(event, data, tokens)``: the SSE event name (``None`` for OpenAI), the JSON text, and
how many output tokens it carries (the server paces frames by it).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from mesh.backends.base import (
    SIM_FINGERPRINT,
    SIM_MESSAGE_PREFIX,
    ChatMessage,
    ChatRequest,
    ToolCallRequest,
    ToolSpec,
)
from mesh.backends.sim.world import SimReply
from mesh.backends.tokens import estimate_tokens

Frame = tuple[str | None, str, int]
PIECE = 32  # characters per streamed delta (~8 tokens)


def _pieces(text: str) -> list[str]:
    return [text[i : i + PIECE] for i in range(0, len(text), PIECE)]


def _id(prefix: str, seed: str) -> str:
    return f"{prefix}{hashlib.sha256(f'{seed}{time.monotonic_ns()}'.encode()).hexdigest()[:24]}"


def _text(content: Any) -> str:
    """OpenAI content (string or parts) or Anthropic content (string or blocks) → plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def disguise(body: str) -> str:
    """A rendered body without the marks that tell a sim-server's answer from a real provider's (the
    OpenAI fingerprint, the Anthropic id prefix): what ``mesh sim-server --pose-as-real`` sends, so tests
    can stand a sim-server in for a real provider."""
    return (body.replace(f',"system_fingerprint":"{SIM_FINGERPRINT}"', "")
            .replace(f'"id":"{SIM_MESSAGE_PREFIX}', '"id":"msg_'))


# --- OpenAI chat completions ------------------------------------------------------------------


def openai_request(body: dict[str, Any], *, default_thinking: bool, metadata: dict[str, Any]) -> ChatRequest:
    messages: list[ChatMessage] = []
    for m in body["messages"]:
        calls = [ToolCallRequest(id=c["id"], name=c["function"]["name"], arguments=json.loads(c["function"]["arguments"] or "{}"))
                 for c in m.get("tool_calls") or []]
        messages.append(ChatMessage(role=m["role"] if m["role"] != "developer" else "system", content=_text(m.get("content")),
                                    reasoning=m.get("reasoning_content") or m.get("reasoning"), tool_calls=calls,
                                    tool_call_id=m.get("tool_call_id")))
    thinking = default_thinking
    if isinstance(body.get("thinking"), dict):
        thinking = body["thinking"].get("type") == "enabled"
    elif isinstance(body.get("chat_template_kwargs"), dict) and "enable_thinking" in body["chat_template_kwargs"]:
        thinking = bool(body["chat_template_kwargs"]["enable_thinking"])
    elif body.get("reasoning_effort"):
        thinking = body["reasoning_effort"] != "none"
    fmt = body.get("response_format") or {}
    return ChatRequest(
        messages=messages,
        tools=[ToolSpec(name=t["function"]["name"], description=t["function"].get("description", ""),
                        parameters=t["function"].get("parameters") or {}) for t in body.get("tools") or []],
        thinking=thinking, effort=body.get("reasoning_effort"),
        max_tokens=body.get("max_completion_tokens") or body.get("max_tokens") or 4096,
        stream=bool(body.get("stream")), temperature=body.get("temperature"), metadata=metadata,
        json_schema=_schema_of(fmt),
    )


def _schema_of(fmt: dict[str, Any]) -> dict[str, Any] | None:
    """The schema of an OpenAI ``json_schema`` response format, or of llama.cpp's ``json_object`` + ``schema``."""
    if fmt.get("type") == "json_schema":
        return (fmt.get("json_schema") or {}).get("schema")
    return fmt.get("schema") if fmt.get("type") == "json_object" else None


def _openai_usage(r: SimReply) -> dict[str, Any]:
    u = r.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            # DeepSeek's names for the same split
            "prompt_cache_hit_tokens": u.cached_tokens, "prompt_cache_miss_tokens": u.prompt_tokens - u.cached_tokens}


def _openai_calls(r: SimReply) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": dump(c.arguments)}}
            for c in r.tool_calls]


def openai_response(r: SimReply, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": r.text or None}
    if r.reasoning:
        message["reasoning_content"] = r.reasoning
    if r.tool_calls:
        message["tool_calls"] = _openai_calls(r)
    return {"id": _id("chatcmpl-sim-", model), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": r.finish_reason, "logprobs": None}],
            "usage": _openai_usage(r), "system_fingerprint": SIM_FINGERPRINT}


def openai_frames(r: SimReply, model: str, *, include_usage: bool) -> list[Frame]:
    cid, created = _id("chatcmpl-sim-", model), int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, tokens: int = 0) -> Frame:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": SIM_FINGERPRINT,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return None, dump(body), tokens

    frames = [chunk({"role": "assistant", "content": ""})]
    frames += [chunk({"reasoning_content": p}, tokens=estimate_tokens(p)) for p in _pieces(r.reasoning or "")]
    frames += [chunk({"content": p}, tokens=estimate_tokens(p)) for p in _pieces(r.text)]
    for i, call in enumerate(_openai_calls(r)):
        head = {"index": i, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}
        frames.append(chunk({"tool_calls": [head]}))
        frames += [chunk({"tool_calls": [{"index": i, "function": {"arguments": p}}]}, tokens=estimate_tokens(p))
                   for p in _pieces(call["function"]["arguments"])]
    frames.append(chunk({}, finish=r.finish_reason))
    if include_usage:
        frames.append((None, dump({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                    "choices": [], "usage": _openai_usage(r)}), 0))
    frames.append((None, "[DONE]", 0))
    return frames


_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request (simulated)"),
    401: ("authentication_error", "invalid_api_key", "Incorrect API key provided (simulated)"),
    402: ("insufficient_balance", "insufficient_balance", "Insufficient Balance (simulated)"),
    403: ("permission_error", "permission_denied", "Permission denied (simulated)"),
    404: ("invalid_request_error", "model_not_found", "The model does not exist (simulated)"),
    429: ("rate_limit_error", "rate_limit_exceeded", "Rate limit reached, retry later (simulated)"),
    500: ("server_error", None, "The server had an error while processing your request (simulated)"),
    502: ("server_error", None, "Bad gateway (simulated)"),
    503: ("server_error", "overloaded", "Server overloaded, please retry shortly (simulated)"),
    504: ("server_error", "timeout", "The server timed out (simulated)"),
    529: ("overloaded_error", "overloaded", "Overloaded (simulated)"),
}


def openai_error(status: int, message: str | None = None, code: str | None = None) -> dict[str, Any]:
    etype, default_code, default_message = _OPENAI_ERRORS.get(status, ("server_error", None, "Error (simulated)"))
    return {"error": {"message": message or default_message, "type": etype, "param": None, "code": code or default_code}}


# --- Anthropic messages ----------------------------------------------------------------------------


def anthropic_request(body: dict[str, Any], *, metadata: dict[str, Any]) -> ChatRequest:
    system = body.get("system")
    messages = [ChatMessage(role="system", content=_text(system))] if system else []
    for m in body["messages"]:
        blocks = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        if m["role"] == "assistant":
            messages.append(ChatMessage(
                role="assistant", content=_text(blocks),
                reasoning="".join(b.get("thinking", "") for b in blocks if b.get("type") == "thinking") or None,
                tool_calls=[ToolCallRequest(id=b["id"], name=b["name"], arguments=b.get("input") or {})
                            for b in blocks if b.get("type") == "tool_use"]))
            continue
        for b in blocks:
            if b.get("type") == "tool_result":
                messages.append(ChatMessage(role="tool", content=_text(b.get("content")), tool_call_id=b.get("tool_use_id")))
        if text := _text(blocks):
            messages.append(ChatMessage(role="user", content=text))
    output = body.get("output_config") or {}
    fmt = output.get("format") or {}
    return ChatRequest(
        messages=messages,
        tools=[ToolSpec(name=t["name"], description=t.get("description", ""), parameters=t.get("input_schema") or {})
               for t in body.get("tools") or []],
        thinking=(body.get("thinking") or {}).get("type") in ("enabled", "adaptive"), effort=output.get("effort"),
        max_tokens=body["max_tokens"], stream=bool(body.get("stream")), temperature=body.get("temperature"),
        json_schema=fmt.get("schema") if fmt.get("type") == "json_schema" else None, metadata=metadata,
    )


_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _signature(reasoning: str) -> str:
    return "sim-sig-" + hashlib.sha256(reasoning.encode()).hexdigest()[:32]


def _anthropic_blocks(r: SimReply) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if r.reasoning:
        blocks.append({"type": "thinking", "thinking": r.reasoning, "signature": _signature(r.reasoning)})
    if r.text:
        blocks.append({"type": "text", "text": r.text})
    blocks += [{"type": "tool_use", "id": "toolu_" + c.id.removeprefix("call_"), "name": c.name, "input": c.arguments}
               for c in r.tool_calls]
    return blocks


def _anthropic_usage(r: SimReply, *, output: bool = True) -> dict[str, Any]:
    u = r.usage
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "cache_read_input_tokens": u.cached_tokens,
            "cache_creation_input_tokens": 0, "output_tokens": u.completion_tokens if output else 1,
            "output_tokens_details": {"thinking_tokens": u.reasoning_tokens if output else 0}}


def anthropic_response(r: SimReply, model: str) -> dict[str, Any]:
    return {"id": _id(SIM_MESSAGE_PREFIX, model), "type": "message", "role": "assistant", "model": model,
            "content": _anthropic_blocks(r), "stop_reason": _ANTHROPIC_STOP.get(r.finish_reason, "end_turn"),
            "stop_sequence": None, "usage": _anthropic_usage(r)}


def anthropic_frames(r: SimReply, model: str) -> list[Frame]:
    def ev(name: str, data: dict[str, Any], tokens: int = 0) -> Frame:
        return name, dump({"type": name, **data}), tokens

    start: dict[str, Any] = {"id": _id(SIM_MESSAGE_PREFIX, model), "type": "message", "role": "assistant", "model": model, "content": [],
             "stop_reason": None, "stop_sequence": None, "usage": _anthropic_usage(r, output=False)}
    frames = [ev("message_start", {"message": start}), ("ping", dump({"type": "ping"}), 0)]
    for i, block in enumerate(_anthropic_blocks(r)):
        kind = block["type"]
        if kind == "thinking":
            frames.append(ev("content_block_start", {"index": i, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}))
            frames += [ev("content_block_delta", {"index": i, "delta": {"type": "thinking_delta", "thinking": p}}, estimate_tokens(p))
                       for p in _pieces(block["thinking"])]
            frames.append(ev("content_block_delta", {"index": i, "delta": {"type": "signature_delta", "signature": block["signature"]}}))
        elif kind == "text":
            frames.append(ev("content_block_start", {"index": i, "content_block": {"type": "text", "text": ""}}))
            frames += [ev("content_block_delta", {"index": i, "delta": {"type": "text_delta", "text": p}}, estimate_tokens(p))
                       for p in _pieces(block["text"])]
        else:
            head = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            frames.append(ev("content_block_start", {"index": i, "content_block": head}))
            frames += [ev("content_block_delta", {"index": i, "delta": {"type": "input_json_delta", "partial_json": p}},
                          estimate_tokens(p)) for p in _pieces(dump(block["input"]))]
        frames.append(ev("content_block_stop", {"index": i}))
    frames.append(ev("message_delta", {"delta": {"stop_reason": _ANTHROPIC_STOP.get(r.finish_reason, "end_turn"),
                                                 "stop_sequence": None},
                                       "usage": _anthropic_usage(r)}))
    frames.append(ev("message_stop", {}))
    return frames


_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request (simulated)"),
    401: ("authentication_error", "invalid x-api-key (simulated)"),
    402: ("billing_error", "Your credit balance is too low (simulated)"),
    403: ("permission_error", "Permission denied (simulated)"),
    404: ("not_found_error", "Model not found (simulated)"),
    413: ("request_too_large", "Request too large (simulated)"),
    429: ("rate_limit_error", "Rate limited (simulated)"),
    500: ("api_error", "Internal server error (simulated)"),
    502: ("api_error", "Bad gateway (simulated)"),
    503: ("api_error", "Service unavailable (simulated)"),
    504: ("api_error", "Gateway timeout (simulated)"),
    529: ("overloaded_error", "Overloaded (simulated)"),
}


def anthropic_error(status: int, message: str | None = None) -> dict[str, Any]:
    etype, default = _ANTHROPIC_ERRORS.get(status, ("api_error", "Error (simulated)"))
    return {"type": "error", "error": {"type": etype, "message": message or default}, "request_id": _id("req_sim_", "")}
