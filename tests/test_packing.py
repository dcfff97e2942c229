"""Context packing: pinned constraints always in, never over budget, what gave way is reported."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.contracts import prompt
from mesh.errors import ContextTooLong
from mesh.packing import estimate_tokens, messages_tokens, needed_tokens, pack, truncate

SYSTEM = "ROLE: coder\nYou write code."


def _parts(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "system": SYSTEM, "constraints": ["Use Python 3.11", "No network access"], "brief": "Build me a login system",
        "instruction": "Implement the login form", "acceptance": ["tests pass"], "inputs": [], "memory": "step 1 done",
    }
    return base | over


def test_estimate_is_offline_and_plausible() -> None:
    assert estimate_tokens("") == 0
    prose = "The quick brown fox jumps over the lazy dog. " * 100
    # ~10 tokens per sentence with real BPE tokenizers; the estimate stays within 30 %.
    assert 900 <= estimate_tokens(prose) <= 1400
    assert estimate_tokens("登录系统" * 100) >= 250  # CJK is not undercounted to nothing


@given(st.text(max_size=300), st.text(max_size=300))
def test_estimate_is_subadditive(a: str, b: str) -> None:
    assert estimate_tokens(a + b) <= estimate_tokens(a) + estimate_tokens(b)


def test_everything_fits_unchanged() -> None:
    inputs = [("research-1", "notes " * 50, 1), ("spec", "spec " * 50, 2)]
    packed = pack(**_parts(inputs=inputs), window=8192, output_reserve=1024)  # type: ignore[arg-type]
    user = packed.messages[1].content
    assert packed.messages[0].content == SYSTEM
    assert "## Pinned constraints\n- Use Python 3.11\n- No network access" in user
    assert "### research-1\n" in user and "### spec\n" in user and "## Memory\nstep 1 done" in user
    assert packed.dropped == [] and packed.summarised == []
    assert packed.tokens == messages_tokens(packed.messages) == needed_tokens(**_parts(inputs=inputs))  # type: ignore[arg-type]


def test_lowest_priority_is_summarised_first_then_dropped() -> None:
    inputs = [("low", "low value words " * 400, 0), ("high", "high value words " * 400, 9)]
    need = needed_tokens(**_parts(inputs=inputs))  # type: ignore[arg-type]
    # Room for everything but ~300 tokens: only the low-priority input is shortened.
    packed = pack(**_parts(inputs=inputs), window=need - 300 + 100, output_reserve=100)  # type: ignore[arg-type]
    assert packed.summarised == ["low"] and packed.dropped == []
    assert "high value words " * 400 in packed.messages[1].content
    assert "tokens truncated" in packed.messages[1].content
    assert packed.tokens <= packed.budget
    # Less room: the low input is cut to its floor, then the high one is summarised too.
    fixed = needed_tokens(**_parts())  # type: ignore[arg-type]
    packed = pack(**_parts(inputs=inputs), window=fixed + 900, output_reserve=100)  # type: ignore[arg-type]
    assert packed.summarised == ["low", "high"] and packed.dropped == []
    assert packed.tokens <= packed.budget
    # Too little room for even two floors: the low input goes entirely.
    packed = pack(**_parts(inputs=inputs), window=fixed + 300, output_reserve=100)  # type: ignore[arg-type]
    assert packed.dropped == ["low"] and packed.summarised == ["high"]
    assert "high value" in packed.messages[1].content and packed.tokens <= packed.budget


def test_custom_summariser_is_used_and_overshoot_is_cut() -> None:
    calls: list[int] = []

    def summarise(text: str, max_tokens: int) -> str:
        calls.append(max_tokens)
        return "SUMMARY " + "x" * (max_tokens * 8)  # deliberately too long

    inputs = [("big", "word " * 3000, 0)]
    packed = pack(**_parts(inputs=inputs), window=2000, output_reserve=200, summarise=summarise)  # type: ignore[arg-type]
    assert calls and "SUMMARY" in packed.messages[1].content
    assert packed.tokens <= packed.budget


def test_pinned_parts_too_big_raise_context_too_long() -> None:
    with pytest.raises(ContextTooLong, match="bigger window"):
        pack(**_parts(constraints=["must " * 2000]), window=1000, output_reserve=100)  # type: ignore[arg-type]


def test_previous_review_section() -> None:
    packed = pack(**_parts(feedback=[("review-1/review", "changes_requested: add tests", 9)]), window=8192,  # type: ignore[arg-type]
                  output_reserve=512)
    assert "## Previous review\n### review-1/review\nchanges_requested: add tests" in packed.messages[1].content


def test_previous_review_is_a_packed_input_with_its_priority() -> None:
    """Feedback is not pasted into the instruction: it gives way like an input, after the inputs of
    lower priority, so a long review can no longer make a revision's context impossible to pack."""
    feedback = [("review-1/review", "note " * 800, 9)]
    inputs = [("research-1", "notes " * 800, 1)]
    fixed = needed_tokens(**_parts())  # type: ignore[arg-type]
    packed = pack(**_parts(inputs=inputs, feedback=feedback), window=fixed + 1300, output_reserve=100)  # type: ignore[arg-type]
    user = packed.messages[1].content
    assert "research-1" in packed.summarised + packed.dropped and "review-1/review" not in packed.summarised
    assert "## Previous review\n### review-1/review\n" + "note " * 10 in user
    tight = pack(**_parts(inputs=inputs, feedback=feedback), window=fixed + 400, output_reserve=100)  # type: ignore[arg-type]
    assert "review-1/review" in tight.summarised and tight.tokens <= tight.budget
    assert "Implement the login form\n" in tight.messages[1].content  # the instruction itself is untouched


def test_prompt_protocol_round_trip() -> None:
    """One module writes the sections and reads them back (the sim's parser is this reader)."""
    text = prompt.render([(prompt.GOAL, "Build it"), (prompt.INPUTS, prompt.nested([("a", "x\ny"), ("b", "z")])),
                          (prompt.sub_task(1, 3), prompt.bullets(["one", "two"]))])
    secs = prompt.sections(text)
    assert secs[prompt.GOAL] == "Build it" and secs["Sub-task 2/3"] == "- one\n- two"
    assert prompt.sections(secs[prompt.INPUTS], level=3) == {"a": "x\ny", "b": "z"}
    assert prompt.parse_bullets(secs["Sub-task 2/3"]) == ["one", "two"]
    system = prompt.system("Coder", "code", "You write code.")
    assert (prompt.role_of(system), prompt.kind_of(system)) == ("coder", "code")
    roles = prompt.bullets([prompt.role_line("developer", "code", "Writes it."), prompt.role_line("qa", "review", "")])
    assert prompt.parse_roles(roles) == {"code": "developer", "review": "qa"}


def test_truncate_respects_limit() -> None:
    text = "alpha beta gamma " * 1000
    for limit in (0, 1, 10, 100, 1000):
        assert estimate_tokens(truncate(text, limit)) <= limit


_words = st.text(alphabet=st.characters(codec="utf-8", categories=("L", "N", "Zs", "P")), max_size=400)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    constraints=st.lists(st.text(min_size=1, max_size=80).filter(lambda c: "\n" not in c and c.strip() == c and c),
                         max_size=5),
    inputs=st.lists(st.tuples(st.text(min_size=1, max_size=20).filter(lambda n: "\n" not in n), _words,
                              st.integers(0, 5)), max_size=6),
    memory=_words, brief=_words, window=st.integers(200, 6000), reserve=st.integers(1, 150),
)
def test_property_constraints_always_in_and_never_over_budget(
    constraints: list[str], inputs: list[tuple[str, str, int]], memory: str, brief: str, window: int, reserve: int
) -> None:
    try:
        packed = pack(system=SYSTEM, constraints=constraints, brief=brief, instruction="Do the step", acceptance=[],
                      inputs=inputs, memory=memory, window=window, output_reserve=reserve)
    except ContextTooLong:
        # Only allowed when the parts that may never be cut do not fit on their own.
        pinned = needed_tokens(system=SYSTEM, constraints=constraints, brief="", instruction="Do the step",
                               acceptance=[], inputs=[], memory="")
        assert pinned > window - reserve - 16
        return
    user = packed.messages[1].content
    for c in constraints:
        assert f"- {c}" in user
    assert packed.tokens == messages_tokens(packed.messages) <= window - reserve
    assert set(packed.dropped).isdisjoint(packed.summarised)
