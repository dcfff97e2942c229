"""Summaries on the edge tier: the cheap housekeeping that keeps a step's context (``apack``) and a
goal's running memory short, so the big tiers' tokens go to the work itself.

Whatever backs the edge tier answers: the real SmolLM2 on the embedded default with the ``edge``
extra, the sim otherwise (it answers a ``ROLE: summariser`` prompt with the text's opening). A
summary is housekeeping, so it never fails a step: on any backend error (edge down, circuit open,
budget) the extractive summary (``truncate``) is used instead, and it never falls back to a paid tier.
"""

from __future__ import annotations

import logging

from mesh.backends.base import ChatMessage, ChatRequest
from mesh.backends.gateway import BudgetGuard, ModelGateway
from mesh.backends.tokens import estimate_tokens, messages_tokens, truncate
from mesh.contracts import prompt
from mesh.errors import BackendError

log = logging.getLogger(__name__)

# Small models write a useful summary up to about this length and ramble past it.
SUMMARY_MAX_TOKENS = 384
# What a summary is made from at most: the small edge model reads prompts at ~150 tokens/s on two
# cores (bench/RESULTS.md "edge"), so 2k tokens already take ~15 s; the rest is cut extractively first.
SUMMARY_SOURCE_TOKENS = 2048
# Seconds per attempt: a summary is worth a short wait only (the edge server answers one request at a
# time; a typical summary here takes 10–30 s).
SUMMARY_TIMEOUT = 120.0
# Fewer tokens than this say nothing a head-and-tail cut would not.
MIN_REPLY_TOKENS = 16
# When at least this share of a text may stay, keeping it verbatim (head + tail) loses less than
# rewriting it — and costs no model call.
EXTRACTIVE_SHARE = 0.5
SYSTEM = prompt.system("summariser", "summary", "You summarise text for another assistant. Keep names, file paths, "
                       "identifiers, numbers, decisions, requirements and failures; drop everything else. Write "
                       "plain sentences, no preamble.")


class EdgeSummariser:
    """``await summarise(text, max_tokens)``: a summary within ``max_tokens``, written by the edge tier.

    Usable as ``apack``'s summariser. ``budget`` (what the goal may still spend) guards its calls like
    the step's own; every call is reported through the gateway's ``on_call`` (``backend.call`` events).
    A cut that keeps at least ``extractive_share`` of the text stays extractive (1.0: always summarise);
    ``label`` heads a summary with what it replaces and which model wrote it.
    """

    def __init__(self, gateway: ModelGateway, *, tier: str = "edge", budget: BudgetGuard | None = None,
                 max_source_tokens: int = SUMMARY_SOURCE_TOKENS, extractive_share: float = EXTRACTIVE_SHARE,
                 label: bool = True) -> None:
        self.gateway = gateway
        self.tier = tier
        self.budget = budget
        self.max_source_tokens = max_source_tokens
        self.extractive_share = extractive_share
        self.label = label

    async def __call__(self, text: str, max_tokens: int) -> str:
        size = estimate_tokens(text)
        if size <= max_tokens:
            return text
        head = f"[summary of ~{size} tokens by {self.gateway.tiers[self.tier].model}]\n" if self.label else ""
        reply = min(max_tokens - estimate_tokens(head), SUMMARY_MAX_TOKENS)
        if max_tokens >= size * self.extractive_share or reply < MIN_REPLY_TOKENS:
            return truncate(text, max_tokens)
        instruction = f"Summarise the text below in at most {reply * 3 // 4} words.\n\n" + prompt.section(prompt.TEXT, "")
        frame = [ChatMessage(role="system", content=SYSTEM), ChatMessage(role="user", content=instruction)]
        # What does not fit the edge window (or would take too long to read) is cut extractively first.
        room = min(self.gateway.window(self.tier) - reply - messages_tokens(frame) - 16, self.max_source_tokens)
        source = truncate(text, room)
        request = ChatRequest(
            messages=[frame[0], ChatMessage(role="user", content=instruction + source)], max_tokens=reply,
            temperature=0.2, metadata={"role": "summariser"},
        )
        try:
            response = await self.gateway.chat(request, self.tier, budget=self.budget, fallback=False,
                                               timeout=SUMMARY_TIMEOUT)
        except BackendError as exc:
            log.info("edge summary failed (%s: %s); keeping head and tail instead", type(exc).__name__, exc)
            return truncate(text, max_tokens)
        summary = response.text.strip()
        if not summary:
            return truncate(text, max_tokens)
        return truncate(head + summary, max_tokens)
