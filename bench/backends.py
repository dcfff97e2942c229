"""bench/backends: the model-backend layer, in one run.

    (1) throughput  ``mesh sim-server`` in its own process (latency model off) and the official SDK
                    clients, ``CONCURRENCY`` requests in flight, streamed: requests/s for the OpenAI
                    path (``/v1/chat/completions``) and the Anthropic path (``/v1/messages``), in
                    ``ROUNDS`` interleaved rounds (median and best).
    (2) overhead    the mesh's cost per call: a bare ``AsyncOpenAI`` streamed call (iterate the chunks,
                    join the text) vs the same request through ``ModelGateway.chat`` (budget check,
                    breaker, retry loop, adapter, usage + cost, on_call record). Sequential, interleaved,
                    medians; the difference is what the mesh adds to every model call.
    (3) packing     ``pack`` of ~1M tokens of inputs (200 inputs of ~5,000 tokens) into the
                    long-context window (1M − 16k reserve) and into the swarm window (256k): wall time
                    and peak Python memory (tracemalloc), plus ``estimate_tokens`` over 4 MB.

    .venv/bin/python -m bench.backends            # writes the "backends" section of bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path

import anthropic
import openai

from bench.results import finish, parse_args
from mesh.backends.base import ChatMessage, ChatRequest
from mesh.backends.gateway import BudgetGuard, CallRecord, ModelGateway
from mesh.backends.tiers import load_tiers
from mesh.contracts import Budget
from mesh.packing import estimate_tokens, pack

CONCURRENCY = 16
ROUNDS = 3
SYSTEM = "ROLE: researcher\nYou research one angle of the goal and write concise notes."
USER = "## Pinned constraints\n- Cite sources\n\n## Goal\nBuild me a login system\n\n## Step\nResearch prior art"


async def start_server() -> tuple[asyncio.subprocess.Process, str]:
    exe = str(Path(sys.executable).parent / "mesh")
    env = {**os.environ, "MESH_SIM_FAULTS": "", "MESH_SIM_LATENCY_SCALE": "0"}
    proc = await asyncio.create_subprocess_exec(exe, "sim-server", "--port", "0", stdout=asyncio.subprocess.PIPE,
                                                env=env)
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    m = re.search(r"(http://127\.0\.0\.1:\d+)", line)
    if not m:
        raise RuntimeError(f"sim-server did not start: {line!r}")
    return proc, m.group(1)


async def _bounded(call: Callable[[], Awaitable[None]], requests: int) -> None:
    """``requests`` calls, ``CONCURRENCY`` at a time."""
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one() -> None:
        async with sem:
            await call()

    async with asyncio.TaskGroup() as tg:
        for _ in range(requests):
            tg.create_task(one())


async def throughput(url: str, requests: int) -> dict[str, float]:
    oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    ant = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)

    async def one_openai() -> None:
        stream = await oai.chat.completions.create(
            model="sim-long-context", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}])
        async for _ in stream:
            pass

    async def one_anthropic() -> None:
        stream = await ant.messages.create(model="sim-long-context", max_tokens=1024, system=SYSTEM, stream=True,
                                           messages=[{"role": "user", "content": USER}])
        async for _ in stream:
            pass

    runs: dict[str, list[float]] = {"openai": [], "anthropic": []}
    paths = (("openai", one_openai), ("anthropic", one_anthropic))
    for _, call in paths:
        await call()  # warm the connection pools
    for _ in range(ROUNDS):  # interleaved, so a burst of outside load hits both paths alike
        for name, call in paths:
            start = time.perf_counter()
            await _bounded(call, requests // ROUNDS)
            runs[name].append(requests // ROUNDS / (time.perf_counter() - start))
    await oai.close()
    await ant.close()
    return {name: statistics.median(r) for name, r in runs.items()} | {f"{n}_best": max(r) for n, r in runs.items()}


async def overhead(url: str, calls: int) -> dict[str, float]:
    tiers = load_tiers(environ={})
    tier = tiers["long_context"].model_copy(update={"kind": "openai", "base_url": url + "/v1", "sim": True})
    records: list[CallRecord] = []
    gw = ModelGateway({**tiers, "long_context": tier}, on_call=records.append, allow_sim=True)  # a sim-server
    bare = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    req = ChatRequest(messages=[ChatMessage(role="system", content=SYSTEM), ChatMessage(role="user", content=USER)])
    wire = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]

    async def bare_call() -> None:
        stream = await bare.chat.completions.create(model=tier.model, messages=wire, stream=True,  # type: ignore[call-overload]
                                                    stream_options={"include_usage": True}, max_tokens=2048)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(parts)

    async def mesh_call() -> None:
        resp = await gw.chat(req, "long_context", budget=BudgetGuard(Budget()), fallback=True)
        assert resp.text

    bare_ms: list[float] = []
    mesh_ms: list[float] = []
    for fn in (bare_call, mesh_call):  # warm both paths
        await fn()
    for _ in range(calls):
        for fn, sink in ((bare_call, bare_ms), (mesh_call, mesh_ms)):
            t = time.perf_counter()
            await fn()
            sink.append((time.perf_counter() - t) * 1000)
    await bare.close()
    await gw.aclose()
    b, m = statistics.median(bare_ms), statistics.median(mesh_ms)
    return {"bare_ms": b, "mesh_ms": m, "overhead_ms": m - b, "ratio": m / b}


def packing() -> list[tuple[str, float, float, int, int, int]]:
    paragraph = ("The login service validates credentials, rate-limits attempts, hashes passwords with a "
                 "memory-hard function and issues short-lived session tokens. ")
    text = paragraph * 143  # ~5,200 tokens: 200 of them overfill the 1M window a little
    inputs = [(f"input-{i:03d}", text, i % 7) for i in range(200)]
    total = sum(estimate_tokens(t) for _, t, _ in inputs)
    rows = []
    for name, window, reserve in (("long_context", 1_048_576, 16_384), ("swarm", 262_144, 16_384)):
        tracemalloc.start()
        t = time.perf_counter()
        packed = pack(system=SYSTEM, constraints=["Cite sources", "No plaintext passwords"],
                      brief="Build me a login system", instruction="Research prior art", acceptance=["notes"],
                      inputs=inputs, memory="", window=window, output_reserve=reserve)
        elapsed = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert packed.tokens <= packed.budget
        rows.append((name, elapsed, peak / 2**20, total, len(packed.summarised), len(packed.dropped)))
    return rows


def estimate_speed() -> float:
    text = "word " * 800_000  # 4 MB
    t = time.perf_counter()
    estimate_tokens(text)
    return (time.perf_counter() - t) * 1000


async def main(requests: int, calls: int, write: bool) -> None:
    proc, url = await start_server()
    try:
        rps = await throughput(url, requests)
        over = await overhead(url, calls)
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    pack_rows = packing()
    est_ms = estimate_speed()
    load = os.getloadavg()[0]
    body = f"""Command: `.venv/bin/python -m bench.backends --requests {requests} --calls {calls}` (2-core machine,
1-minute load average {load:.1f} at the end of the run; absolute figures move with load, the overhead ratio
much less). The sim-server runs in its own process with the latency model off, so these measure the
HTTP + SDK + mesh path, not a model.

| measure | result |
| --- | --- |
| sim-server + `openai` SDK, streamed, {CONCURRENCY} in flight (median / best of {ROUNDS}) | {rps['openai']:.0f} / {rps['openai_best']:.0f} requests/s |
| sim-server + `anthropic` SDK, streamed, {CONCURRENCY} in flight (median / best of {ROUNDS}) | {rps['anthropic']:.0f} / {rps['anthropic_best']:.0f} requests/s |
| bare `AsyncOpenAI` streamed call (median of {calls}) | {over['bare_ms']:.2f} ms |
| same call through `ModelGateway.chat` (median of {calls}) | {over['mesh_ms']:.2f} ms |
| mesh overhead per call | {over['overhead_ms']:+.2f} ms ({over['ratio']:.2f}x the bare call) |
""" + "".join(
        f"| `pack` {total / 1e6:.2f}M tokens of inputs into the {name} window | {elapsed * 1000:.0f} ms, "
        f"peak {peak:.0f} MiB, {summ} summarised / {drop} dropped |\n"
        for name, elapsed, peak, total, summ, drop in pack_rows
    ) + f"| `estimate_tokens` over 4 MB of text | {est_ms:.1f} ms |\n"
    finish("backends", body, write)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per SDK for the throughput test")
    parser.add_argument("--calls", type=int, default=300, help="sequential calls per path for the overhead test")
    args = parse_args(parser, None)
    asyncio.run(main(args.requests, args.calls, not args.no_write))
