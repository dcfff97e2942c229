"""bench/codec: what decoding costs — the hot path (typical events) and a pinned corpus of hostile messages.

Hot path: µs per decode (``open_envelope`` + ``Envelope.message``) of three typical events, median of
interleaved rounds. Hostile corpus (``hostile_corpus``): envelopes of ≤ 1 MB built to amplify (many
tiny maps or arrays, deep nesting, long and many short strings, many map keys, many invalid items
in a typed list, hostile data in a field the contract does not know). For each: the peak Python heap
of decoding it (tracemalloc), as a multiple of its wire size, and the milliseconds it took (without
tracemalloc), and whether it was refused.

Run it against another tree (before/after) by putting that tree's ``mesh`` first on the path::

    .venv/bin/python -m bench.codec                               # writes the "codec" section
    PYTHONPATH=/tmp/before:$PWD .venv/bin/python -m bench.codec --no-write --label before
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import re
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgpack

import mesh
from bench.results import finish, parse_args
from mesh.contracts import ArtifactRef, StepCompleted, StepProgress, ToolCall, Usage, encode, new_id
from mesh.contracts.codec import SCHEMA_VERSION, open_envelope
from mesh.errors import ContractError

WIRE_LIMIT = 1_000_000  # every hostile message is at most this many bytes
GOAL = "0" * 32


def _progress(detail: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "step.progress", "goal_id": GOAL, "step_id": "s1", "role": "coder", "attempt": 1,
            "task_id": f"{GOAL}.s1.1", "message": "working", "detail": detail, **extra}


def _fill(unit: bytes, overhead: int = 512) -> int:
    """How many ``unit``s fit a message of ``WIRE_LIMIT`` bytes with ``overhead`` bytes of envelope."""
    return (WIRE_LIMIT - overhead) // len(unit)


_DEEP = "\x00deep:"  # a string the packed envelope replaces with nesting msgpack itself cannot pack


def _nested(depth: int) -> str:
    """Placeholder for ``depth`` nested one-key maps ({"n": {"n": … "leaf"}}), spliced in by ``_pack``."""
    return f"{_DEEP}{depth}"


def _pack(doc: Any) -> bytes:
    data = bytes(msgpack.packb(doc, use_bin_type=True))
    # a placeholder packs as a fixstr (header 0xa0 | length): every one is shorter than 32 bytes
    return re.sub(rb"[\xa0-\xbf]\x00deep:(\d+)", lambda m: b"\x81\xa1n" * int(m[1]) + b"\xa4leaf", data)


# name → the body of an event envelope; each builder is deterministic, so the corpus is pinned by
# ``corpus_digest`` (tests/test_codec_bounds.py checks it).
CORPUS: dict[str, Callable[[], dict[str, Any]]] = {
    "empty maps in detail": lambda: _progress({"x": [{}] * _fill(b"\x80")}),
    "empty arrays in detail": lambda: _progress({"x": [[]] * _fill(b"\x90")}),
    "one-key maps in detail": lambda: _progress({"x": [{"a": None}] * _fill(b"\x81\xa1a\xc0")}),
    "pairs of ints in detail": lambda: _progress({"x": [[1, 2]] * _fill(b"\x92\x01\x02")}),
    "deep nesting, 1,000 levels": lambda: _progress(_nested(1_000)),
    "deep nesting, 100,000 levels": lambda: _progress(_nested(100_000)),
    "one long string": lambda: _progress({}, message="x" * (WIRE_LIMIT - 1024)),
    "short strings in detail": lambda: _progress({"x": ["ab"] * _fill(b"\xa2ab")}),
    "many map keys in detail": lambda: _progress({f"k{i:06x}": None for i in range(_fill(b"\xa7k000000\xc0"))}),
    "nils in detail": lambda: _progress({"x": [None] * _fill(b"\xc0")}),
    "floats in detail": lambda: _progress({"x": [1.5] * _fill(b"\xcb" + b"\x00" * 8)}),
    "invalid items in a typed list": lambda: {
        "type": "step.completed", "goal_id": GOAL, "step_id": "s1", "role": "coder", "attempt": 1,
        "task_id": f"{GOAL}.s1.1", "outputs": [{"size": -1}] * _fill(b"\x81\xa4size\xff")},
    "empty maps in an unknown field": lambda: {**_progress({}), "extra": [{}] * _fill(b"\x80")},
    "tool arguments of empty maps": lambda: {
        "type": "tool.call", "goal_id": GOAL, "tool": "fs.write", "arguments": {"x": [{}] * _fill(b"\x80")}},
}


def envelope(body: dict[str, Any]) -> bytes:
    doc = {"v": SCHEMA_VERSION, "id": "h" * 32, "kind": "event", "goal": GOAL,
           "ts": datetime(2026, 1, 1, tzinfo=UTC).isoformat(), "trace": {}, "body": body}
    return _pack(doc)


def hostile_corpus() -> dict[str, bytes]:
    """name → envelope bytes (≤ ``WIRE_LIMIT``)."""
    return {name: envelope(build()) for name, build in CORPUS.items()}


def corpus_digest() -> str:
    """sha256 over the corpus' bodies (not the envelopes, whose version changes with the schema)."""
    h = hashlib.sha256()
    for name, build in CORPUS.items():
        h.update(name.encode() + _pack(build()))
    return h.hexdigest()


def decode(data: bytes) -> str | None:
    """Decode and validate as a consumer does; the refusal's error class, or None when accepted."""
    try:
        open_envelope(data).message()
    except ContractError as exc:
        return type(exc).__name__
    except RecursionError:  # not a ContractError: a consumer would crash on it
        return "RecursionError"
    return None


@dataclass(frozen=True, slots=True)
class Cost:
    wire: int
    peak: int  # bytes of Python heap at the peak of decoding (tracemalloc)
    refused: str | None

    @property
    def ratio(self) -> float:
        return self.peak / self.wire


def heap_cost(data: bytes) -> Cost:
    """The peak heap of decoding ``data``, measured by tracemalloc (the data itself is not counted)."""
    gc.collect()
    tracemalloc.start()
    try:
        refused = decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return Cost(len(data), peak, refused)


def cpu_ms(data: bytes, rounds: int = 3) -> float:
    """Median process-CPU milliseconds of one decode."""
    times = []
    for _ in range(rounds):
        started = time.process_time()
        decode(data)
        times.append((time.process_time() - started) * 1000)
    return statistics.median(times)


def typical() -> dict[str, bytes]:
    refs = [ArtifactRef(digest=os.urandom(32).hex(), media_type="text/x-python", size=4096 * (i + 1),
                        name=f"src/auth/module_{i}.py") for i in range(2)]
    gid = new_id()
    return {
        "step.completed": encode(StepCompleted(
            goal_id=gid, step_id="implement-login", role="coder", attempt=1, outputs=refs,
            usage=Usage(prompt_tokens=18_000, completion_tokens=2_400, cost_usd=0.0123, calls=3), tier="long_context",
            node="coder-7f9c")),
        "step.progress (detail)": encode(StepProgress(
            goal_id=gid, step_id="implement-login", role="coder", attempt=1,
            message="context packed", detail={"dropped": 3, "summarised": 2, "tier": "long_context"})),
        "tool.call (arguments)": encode(ToolCall(
            goal_id=gid, step_id="implement-login", role="coder", tool="fs.write",
            arguments={"path": "src/auth/login.py", "content": "def login(user, password):\n" * 6})),
    }


def hot_path_us(messages: dict[str, bytes], rounds: int, n: int) -> dict[str, float]:
    per: dict[str, list[float]] = {name: [] for name in messages}
    for _ in range(rounds):
        for name, data in messages.items():
            started = time.perf_counter()
            for _ in range(n):
                open_envelope(data).message()
            per[name].append((time.perf_counter() - started) / n * 1e6)
    return {name: statistics.median(v) for name, v in per.items()}


def bounds_overhead_us(messages: dict[str, bytes], rounds: int, n: int) -> dict[str, tuple[float, float]]:
    """Per message: (µs of plain ``msgpack.unpackb``, µs of the bounded ``unpack``), interleaved in one process
    — what the container budget adds to the hot path, free of the load on the machine. Empty when this
    tree has no bounded ``unpack`` (before)."""
    try:
        from mesh.contracts.codec import unpack  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return {}
    plain: dict[str, list[float]] = {name: [] for name in messages}
    bounded: dict[str, list[float]] = {name: [] for name in messages}
    for _ in range(rounds):
        for name, data in messages.items():
            for fn, out in ((lambda d: msgpack.unpackb(d, raw=False, strict_map_key=True), plain), (unpack, bounded)):
                started = time.perf_counter()
                for _ in range(n):
                    fn(data)
                out[name].append((time.perf_counter() - started) / n * 1e6)
    return {name: (statistics.median(plain[name]), statistics.median(bounded[name])) for name in messages}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=5_000, help="decodes per round per typical message")
    parser.add_argument("--label", default="after", help="name of this tree in the output (before/after)")
    parser.add_argument("--hot-only", action="store_true", help="only the typical messages (before/after rounds)")
    args = parse_args(parser, argv)

    lines = [f"`mesh` from `{os.path.dirname(mesh.__file__)}` ({args.label}); corpus {corpus_digest()[:12]}", "",
             "| typical message | bytes | µs per decode (median) |", "|---|---:|---:|"]
    messages = typical()
    for name, us in hot_path_us(messages, args.rounds, args.n).items():
        lines.append(f"| {name} | {len(messages[name])} | {us:.1f} |")
    overhead = bounds_overhead_us(messages, args.rounds, args.n)
    if overhead:
        lines += ["", "| typical message | µs `msgpack.unpackb` | µs bounded `unpack` (same process, interleaved) |",
                  "|---|---:|---:|"]
        lines += [f"| {name} | {a:.2f} | {b:.2f} |" for name, (a, b) in overhead.items()]
    if args.hot_only:
        print("\n".join(lines))
        return 0
    lines += ["", "| hostile message | wire bytes | peak heap | × wire | CPU ms | outcome |", "|---|---:|---:|---:|---:|---|"]
    for name, data in hostile_corpus().items():
        cost = heap_cost(data)
        lines.append(f"| {name} | {cost.wire:,} | {cost.peak / 1e6:.1f} MB | {cost.ratio:.1f} | {cpu_ms(data):.0f} | "
                     f"{'refused: ' + cost.refused if cost.refused else 'accepted'} |")
    finish("codec", "\n".join(lines), not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
