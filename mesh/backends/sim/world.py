"""The sim world: a deterministic model of the three tiers — what they answer, how well, how fast
and at what price — shared by the in-process ``SimBackend`` and ``mesh sim-server``.

Determinism: an answer depends only on the seed, the tier and the request's content, so a rerun
of a goal gives the same plan, files and verdicts. Faults come from a separate seeded stream
(``FaultPlan``) so retries can succeed.

Quality model — the probability that a call "succeeds" (a failure is not an error but a weaker
answer: a reviewer asking for changes again, a failing test report, thinner research notes, a
plan without parallel research):

    p = quality(tier) − difficulty · difficulty_penalty(tier)
        − crowding · (fill − 0.5)⁺ · 2          fill = prompt tokens / window
        + swarm_bonus · min(fan_out − 1, 4)      swarm tier only
        + thinking_bonus                         when thinking is on

clipped to [0.02, 0.98]. ``difficulty`` (0..1) and ``fan_out`` come from the request metadata;
``sim_quality`` in the metadata (or the world's ``quality``) overrides ``p`` outright.

Latency model: time to first token — a fixed part plus the prompt's uncached tokens at the tier's
prefill rate (+ reasoning tokens at the decode rate when thinking) — and then output tokens at the
tier's tokens/s, all multiplied by ``latency_scale`` (0 = instant). The hosted tiers prefill so fast
that their fixed part covers it; the local edge model does not (see its profile).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

from mesh.backends.base import ChatRequest, ToolCallRequest, ToolNames
from mesh.backends.sim import roles
from mesh.backends.sim.faults import FaultPlan
from mesh.backends.sim.prompt import parse
from mesh.backends.sim.schema import conform
from mesh.backends.tiers import TierConfig, load_tiers
from mesh.backends.tokens import estimate_tokens, messages_tokens
from mesh.contracts import Usage
from mesh.errors import ContextTooLong

PREFIX_CACHE_ENTRIES = 10_000


@dataclass(frozen=True)
class SimProfile:
    ttft: float  # seconds to first token
    tokens_per_s: float
    quality: float
    difficulty_penalty: float
    crowding: float  # how much a nearly full window hurts
    thinking_bonus: float = 0.08
    swarm_bonus: float = 0.0
    prefill_tokens_per_s: float = math.inf  # prompt tokens processed per second before the first token

    def first_token_seconds(self, uncached_prompt_tokens: int) -> float:
        """Unscaled time to the first token of a prompt with this many uncached tokens."""
        return self.ttft + uncached_prompt_tokens / self.prefill_tokens_per_s


# Edge: a small local model (SmolLM2-135M class); long_context: DeepSeek V4 class; swarm: Kimi K2.6 class.
PROFILES: dict[str, SimProfile] = {
    # Calibrated from the real SmolLM2-135M-Instruct Q4_1 on llama-cpp-python's server, 2 cores (bench/edge.py,
    # bench/RESULTS.md "edge"): time to first token of a short prompt ~0.12 s, decode ~70 tokens/s, prefill
    # ~150 tokens/s (so a 4k-token step prompt waits ~30 s); accuracy 65% on 20 easy tasks (difficulty 0.2)
    # and 30% on 10 harder ones (0.6), which fit quality 0.83 and difficulty_penalty 0.88.
    "edge": SimProfile(ttft=0.12, tokens_per_s=70.0, quality=0.83, difficulty_penalty=0.88, crowding=0.4,
                       prefill_tokens_per_s=150.0),
    "long_context": SimProfile(ttft=0.8, tokens_per_s=45.0, quality=0.92, difficulty_penalty=0.22, crowding=0.15),
    "swarm": SimProfile(ttft=0.6, tokens_per_s=55.0, quality=0.88, difficulty_penalty=0.2, crowding=0.25,
                        swarm_bonus=0.025),
}


def tier_for_model(model: str) -> str:
    """Which tier profile a model name gets on the sim-server (one server serves all tiers)."""
    m = model.lower()
    if any(k in m for k in ("edge", "smol", "tiny", "mini", "135m", "0.5b", "1b")):
        return "edge"
    if any(k in m for k in ("swarm", "kimi", "k2")):
        return "swarm"
    return "long_context"


@dataclass
class SimReply:
    text: str
    reasoning: str | None
    tool_calls: list[ToolCallRequest]
    usage: Usage
    finish_reason: str
    ttft: float  # seconds, already scaled
    seconds_per_token: float  # already scaled
    simulated_json: bool = False


@dataclass
class SimWorld:
    seed: int = 0
    latency_scale: float = 1.0
    fixed_latency: float | None = None  # seconds per call, replacing the latency model (benchmarks)
    faults: FaultPlan = field(default_factory=FaultPlan)
    quality: float | None = None  # overrides the quality model for every call
    tiers: dict[str, TierConfig] = field(default_factory=lambda: load_tiers(environ={}))
    _seen_prefixes: set[str] = field(default_factory=set)

    @classmethod
    def from_settings(cls, settings: Any) -> SimWorld:
        fixed = settings.sim_latency_ms
        return cls(seed=settings.sim_seed, latency_scale=settings.sim_latency_scale,
                   fixed_latency=None if fixed is None else fixed / 1000,
                   faults=FaultPlan.from_spec(settings.sim_faults, seed=settings.sim_seed))

    def tier_config(self, model: str) -> TierConfig:
        """The sim tier serving ``model``: its profile's window and prices, under the asked name."""
        return self.tiers[tier_for_model(model)].model_copy(update={"model": model})

    def success_probability(self, req: ChatRequest, tier: TierConfig, prompt_tokens: int) -> float:
        forced = req.metadata.get("sim_quality", self.quality)
        if forced is not None:
            return float(forced)
        prof = PROFILES[tier.name]
        difficulty = float(req.metadata.get("difficulty", 0.5))
        fan_out = int(req.metadata.get("fan_out", 1))
        fill = prompt_tokens / tier.context_window
        p = (prof.quality - difficulty * prof.difficulty_penalty - prof.crowding * max(fill - 0.5, 0) * 2
             + prof.swarm_bonus * min(max(fan_out - 1, 0), 4) + (prof.thinking_bonus if req.thinking else 0))
        return min(max(p, 0.02), 0.98)

    def reply(self, req: ChatRequest, tier: TierConfig, *, fault: str | None = None) -> SimReply:
        """The answer to ``req`` on ``tier``. Raises ``ContextTooLong`` like a real endpoint would.
        ``fault == "badjson"`` breaks a JSON answer's content."""
        tool_tokens = estimate_tokens(json.dumps([t.model_dump() for t in req.tools])) if req.tools else 0
        prompt_tokens = messages_tokens(req.messages) + tool_tokens
        if prompt_tokens > tier.context_window:
            raise ContextTooLong(
                f"This model's maximum context length is {tier.context_window} tokens. However, your messages "
                f"resulted in {prompt_tokens} tokens.", tier=tier.name, endpoint=tier.endpoint, status=400)
        rng = random.Random(self._digest(req, tier.name))
        prompt = parse(req.messages, req.tools)
        success = rng.random() < self.success_probability(req, tier, prompt_tokens)
        ans = roles.answer(roles.Context(prompt=prompt, rng=rng, success=success, metadata=req.metadata))
        text = ans.text
        if req.json_schema is not None and not ans.tool_calls:
            hint = ans.json if ans.json is not None else {"text": text, "summary": text, "simulated": True}
            text = json.dumps(conform(req.json_schema, hint))
        is_json = req.json_schema is not None or ans.json is not None
        if fault == "badjson" and is_json:
            text = text[: max(len(text) // 2, 1)]
        reasoning = self._reasoning(prompt.role, prompt.instruction, success) if req.thinking else None
        completion = estimate_tokens(text) + sum(estimate_tokens(json.dumps(c.arguments)) for c in ans.tool_calls)
        finish = "tool_calls" if ans.tool_calls else "stop"
        if completion > req.max_tokens and not ans.tool_calls:
            text = text[: req.max_tokens * 4]
            completion, finish = min(estimate_tokens(text), req.max_tokens), "length"
        reasoning_tokens = estimate_tokens(reasoning or "")
        # Prefix caching, as DeepSeek/Kimi do it: a system prompt seen before is served from cache.
        system = "".join(m.content for m in req.messages if m.role == "system")
        key = f"{tier.name}:{hashlib.sha256(system.encode()).hexdigest()}"
        cached = estimate_tokens(system) if system and key in self._seen_prefixes else 0
        if len(self._seen_prefixes) >= PREFIX_CACHE_ENTRIES:  # a long-running server: evict all, like a cold cache
            self._seen_prefixes.clear()
        self._seen_prefixes.add(key)
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion + reasoning_tokens, cached_tokens=cached,
                      reasoning_tokens=reasoning_tokens, calls=1)
        usage.cost_usd = tier.prices.cost(prompt_tokens=prompt_tokens, cached_tokens=cached,
                                          completion_tokens=usage.completion_tokens)
        prof = PROFILES[tier.name]
        if self.fixed_latency is not None:
            ttft, per_token = self.fixed_latency, 0.0
        else:
            ttft = prof.first_token_seconds(prompt_tokens - cached) * self.latency_scale
            per_token = self.latency_scale / prof.tokens_per_s
        return SimReply(text=text, reasoning=reasoning, tool_calls=ans.tool_calls, usage=usage, finish_reason=finish,
                        ttft=ttft, seconds_per_token=per_token, simulated_json=is_json)

    def _digest(self, req: ChatRequest, tier: str) -> str:
        """What an answer may depend on: the content, not its transport. Tool names are compared in
        wire form and call ids, reasoning and the stream flag are left out, so the same request gives
        the same answer in-process, over the OpenAI API and over the Anthropic API."""
        wire = ToolNames(req.tools)
        content = [
            [m.role, m.content, m.tool_call_id is not None, [[wire.wire(c.name), c.arguments] for c in m.tool_calls]]
            for m in req.messages
        ]
        tools = [[wire.wire(t.name), t.parameters] for t in req.tools]
        key = [self.seed, tier, content, tools, req.thinking, req.max_tokens, req.json_schema, req.metadata]
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    @staticmethod
    def _reasoning(role: str, instruction: str, success: bool) -> str:
        return (f"{roles.MARK} Thinking as {role}: the step asks to {instruction[:120]!r}. "
                f"I check the pinned constraints first, then the inputs, then draft the answer. "
                + ("The approach holds up." if success else "Some parts remain uncertain."))
