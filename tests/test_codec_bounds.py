"""Bounded decoding: a pinned corpus of hostile messages (≤ 1 MB each) costs at most ~32× its wire size in
heap, or is refused part-way; the free-form fields refuse deep or large data; ordinary messages pass.
CPU time per message is measured by ``python -m bench.codec`` (bench/RESULTS.md), not asserted here."""

from __future__ import annotations

import msgpack
import pytest
from pydantic import ValidationError

from bench.codec import CORPUS, WIRE_LIMIT, corpus_digest, envelope, heap_cost, hostile_corpus
from mesh.contracts import Goal, Plan, Step, StepProgress, ToolCall, decode, encode
from mesh.contracts.codec import decode_body, open_envelope
from mesh.contracts.models import FREEFORM_MAX_BYTES, FREEFORM_MAX_DEPTH
from mesh.errors import CodecError, DecodeLimitExceeded, SchemaViolation
from mesh.tools.toolbox import ToolBox
from mesh.tools.workspace import Workspace
from tests.test_workspace import Blobs

HEAP_RATIO = 32  # the acceptance bound: peak heap of decoding ≤ ~32× the wire size
PINNED = "aa9b439bab7590cb"  # corpus_digest()[:16]; a changed corpus is a changed acceptance test

CORPUS_BYTES = hostile_corpus()


def test_the_corpus_is_pinned_and_within_a_megabyte() -> None:
    assert corpus_digest().startswith(PINNED)
    assert all(len(data) <= WIRE_LIMIT for data in CORPUS_BYTES.values())


@pytest.mark.parametrize("name", CORPUS)
def test_hostile_message_costs_bounded_heap(name: str) -> None:
    cost = heap_cost(CORPUS_BYTES[name])
    assert cost.ratio <= HEAP_RATIO, f"{name}: {cost.peak:,} B of heap for {cost.wire:,} B ({cost.ratio:.1f}×)"
    assert cost.refused != "RecursionError"


@pytest.mark.parametrize("name", [n for n in CORPUS if n != "one long string"])
def test_hostile_message_is_refused_with_a_contract_error(name: str) -> None:
    with pytest.raises((CodecError, SchemaViolation)):
        decode(CORPUS_BYTES[name])


def test_amplifying_bytes_are_refused_part_way_with_a_clear_error() -> None:
    data = envelope({"type": "step.started", "goal_id": "g", "junk": [{}] * 500_000})
    with pytest.raises(DecodeLimitExceeded, match=f"message of {len(data)} bytes holds more than") as caught:
        open_envelope(data)
    assert isinstance(caught.value, CodecError)
    with pytest.raises(DecodeLimitExceeded):
        decode_body(msgpack.packb({"x": [[]] * 100_000}))


def test_ordinary_messages_decode() -> None:
    steps = [Step(step_id=f"s{i}", role="coder", instruction=f"do part {i}", depends_on=[f"s{i - 1}"] if i else [],
                  acceptance=["tests pass"]) for i in range(200)]
    plan = Plan(goal_id="g1", steps=steps)
    assert decode(encode(plan), Plan) == plan
    progress = StepProgress(goal_id="g1", step_id="s1", role="coder", attempt=1, message="x",
                            detail={"tiers": {"edge": [1, 2, 3], "swarm": {"calls": 2}}, "dropped": 3})
    assert decode(encode(progress)) == progress
    assert open_envelope(CORPUS_BYTES["one long string"]).message().message.startswith("xxx")


def _deep(depth: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


def test_free_form_fields_refuse_deep_or_large_data() -> None:
    StepProgress(goal_id="g", step_id="s", role="r", attempt=1, message="m",
                 detail=_deep(FREEFORM_MAX_DEPTH - 1))
    with pytest.raises(ValidationError, match="nested deeper than"):
        StepProgress(goal_id="g", step_id="s", role="r", attempt=1, message="m",
                     detail=_deep(FREEFORM_MAX_DEPTH + 1))
    with pytest.raises(ValidationError, match=f"larger than {FREEFORM_MAX_BYTES} bytes"):
        Goal(brief="b", options={"x": "y" * FREEFORM_MAX_BYTES})
    with pytest.raises(ValidationError, match="larger than"):
        ToolCall(goal_id="g", tool="fs.write", arguments={"x": list(range(FREEFORM_MAX_BYTES // 8))})
    body = {"type": "tool.call", "goal_id": "g", "tool": "fs.write", "arguments": _deep(40)}
    with pytest.raises(SchemaViolation, match="arguments: Value error, free-form data nested deeper"):
        decode(envelope(body))


async def test_a_models_deep_or_huge_tool_arguments_are_recorded_within_the_bounds() -> None:
    """Whatever arguments a model sends, the tool.call event that records them is valid (elided if need be)."""
    ws = Workspace({}, Blobs().fetch)
    async with ToolBox(["fs.read"], ws) as tools:
        deep = await tools.call("fs.read", {"path": "a.py", "x": _deep(40)})
        wide = await tools.call("fs.read", {"path": "a.py", "x": list(range(20_000))})
        plain = await tools.call("fs.read", {"path": "a.py" + "y" * 500})
    assert deep.arguments == {"elided": "not recorded: free-form data nested deeper than 16 levels"}
    assert wide.arguments["elided"].endswith(f"larger than {FREEFORM_MAX_BYTES} bytes")
    assert plain.arguments == {"path": "a.py" + "y" * 196 + "…"}  # long strings are cut, as before
    for result in (deep, wide, plain):
        event = ToolCall(goal_id="g", tool="fs.read", arguments=result.arguments)
        assert decode(encode(event)) == event
