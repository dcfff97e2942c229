"""Structured outputs: lenient parsing, strict validation, truncation and re-asks (mesh/backends/structured.py),
the text tool protocol (mesh/tools/textproto.py) and the fallback plan (mesh/roles/plans.py).

The ``smollm2`` cases are real answers of SmolLM2-135M-Instruct on llama-cpp-python's server, captured
from the mesh's own prompts (tests/fixtures/smollm2/, see its README)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mesh.backends.base import ChatMessage, ChatRequest, ChatResponse
from mesh.backends.structured import StructuredFailed, ask_structured, extract_json
from mesh.contracts import Goal, Plan
from mesh.errors import OutputInvalid, PlanInvalid
from mesh.roles.plans import fallback_plan, plan_from_doc
from mesh.tools.textproto import parse_calls, protocol_prompt
from tests.meshkit import role_specs

FIXTURES = Path(__file__).parent / "fixtures" / "smollm2"


@pytest.mark.parametrize(("text", "expected"), [
    ('{"a": 1}', {"a": 1}),
    ('Here is the plan:\n```json\n{"a": [1, 2,], }\n```\nHope it helps!', {"a": [1, 2]}),
    ('Sure! {"a": "line one\nline two\ttabbed"} and that is all {"b": 2}', {"a": "line one\nline two\ttabbed"}),
    ('prose with a brace } first, then {"x": "a } in a string", "y": [{"z": 1},]}', {"x": "a } in a string",
                                                                                     "y": [{"z": 1}]}),
    ('[{"step_id": "a"}]', [{"step_id": "a"}]),
    ('```\n{"escaped": "a \\" quote, a \\\\ backslash,"}\n```', {"escaped": 'a " quote, a \\ backslash,'}),
])
def test_json_is_read_leniently(text: str, expected: Any) -> None:
    assert extract_json(text) == expected


@pytest.mark.parametrize(("text", "reason"), [
    ("", "the answer is empty"),
    ("no json here at all", "no JSON object in the answer"),
    ('{"steps": [{"step_id": "a", "role": "coder"', "never closes: the answer is truncated"),
    ('{"a": 1 "b": 2}', "not valid JSON: Expecting ',' delimiter: line 1 column 9"),
])
def test_what_cannot_be_read_says_exactly_why(text: str, reason: str) -> None:
    with pytest.raises(OutputInvalid) as info:
        extract_json(text)
    assert reason in str(info.value)


class Scripted:
    """A model that answers from a script (one response per call) and records each request."""

    def __init__(self, *answers: tuple[str, str]) -> None:
        self.answers = list(answers)
        self.requests: list[ChatRequest] = []

    async def __call__(self, req: ChatRequest) -> ChatResponse:
        self.requests.append(req)
        text, finish = self.answers.pop(0)
        return ChatResponse(text=text, finish_reason=finish, tier="edge")  # type: ignore[arg-type]


def _verdict(doc: Any) -> str:
    if not isinstance(doc, dict) or doc.get("verdict") not in ("approve", "changes_requested"):
        raise OutputInvalid('"verdict" must be "approve" or "changes_requested"')
    return str(doc["verdict"])


REQUEST = ChatRequest(messages=[ChatMessage(role="user", content="review it")], max_tokens=100)


async def test_a_truncated_answer_is_asked_again_with_room_then_told_to_be_shorter() -> None:
    model = Scripted(('{"verdict": "appr', "length"), ('{"verdict": "approve", "notes": ["lo', "length"),
                     ('{"verdict": "approve"}', "stop"))
    asked = await ask_structured(model, REQUEST, _verdict, attempts=3, room=lambda r: 200, what="verdict")
    assert asked.value == "approve" and asked.attempts == 3 and asked.truncated == 2
    assert [r.max_tokens for r in model.requests] == [100, 200, 200]  # room first, then the same limit
    assert model.requests[1].messages == REQUEST.messages  # the same question, with room
    last = model.requests[2].messages[-1].content
    assert "truncated at the output limit of 200 tokens" in last and "shorter" in last
    assert all("finish_reason=length" in e for e in asked.errors)


async def test_an_invalid_answer_is_re_asked_quoting_the_exact_error() -> None:
    model = Scripted(('{"verdict": "maybe"}', "stop"), ('{"verdict": "changes_requested"}', "stop"))
    asked = await ask_structured(model, REQUEST, _verdict, attempts=3, room=lambda r: 100, what="verdict")
    assert asked.value == "changes_requested"
    reask = model.requests[1].messages
    assert reask[-2].content == '{"verdict": "maybe"}'
    assert reask[-1].content.startswith('That verdict is invalid: "verdict" must be "approve" or "changes_requested"')


async def test_no_valid_answer_within_the_attempts_raises_with_every_reason() -> None:
    model = Scripted(("nothing", "stop"), ("{", "stop"))
    with pytest.raises(StructuredFailed) as info:
        await ask_structured(model, REQUEST, _verdict, attempts=2, room=lambda r: 100, what="verdict")
    assert len(info.value.errors) == 2 and "never closes" in str(info.value)


def test_a_plan_is_validated_strictly() -> None:
    plan = plan_from_doc({"steps": [{"step_id": "a", "role": "coder", "instruction": "x", "depends_on": []}]},
                         goal_id="g", version=1)
    assert plan.steps[0].role == "coder"
    with pytest.raises(PlanInvalid, match='a JSON object with a "steps" array'):
        plan_from_doc({"plan": []}, goal_id="g", version=1)
    with pytest.raises(ValueError, match="instruction"):
        plan_from_doc({"steps": [{"step_id": "a", "role": "coder", "depends_on": []}]}, goal_id="g", version=1)


@pytest.mark.parametrize(("words", "research", "parts"), [(12, 1, 1), (90, 3, 3)])
def test_the_fallback_plan_is_built_from_the_role_specs_and_sized_by_the_goal(words: int, research: int,
                                                                              parts: int) -> None:
    goal = Goal(brief=" ".join(["palindrome"] * words))
    plan = fallback_plan(goal, role_specs(), version=1, reason="no valid plan after 3 attempts")
    roles = [s.role for s in plan.steps]
    assert roles.count("researcher") == research and roles.count("coder") == parts
    assert roles.count("reviewer") == parts and roles.count("tester") == parts and roles[-1] == "synthesizer"
    layers = plan.check(set(role_specs()) - {"planner"})
    assert layers[-1] == ["synthesize"] and "no valid plan after 3 attempts" in plan.rationale
    order = [s.step_id for s in plan.steps]
    assert order.index("implement-1") < order.index("review-1") < order.index("test-1")


def test_text_edits_become_guarded_tool_calls() -> None:
    text = ("I will write two files.\n\n```python palindrome.py\ndef is_palindrome(s):\n    return s == s[::-1]\n```\n"
            "Tests, in **test_palindrome.py**:\n```python\nfrom palindrome import is_palindrome\n\n"
            "def test_yes():\n    assert is_palindrome('aba')\n```\n"
            "```diff\n--- a/README.md\n+++ b/README.md\n@@ -1 +1 @@\n-old\n+new\n```\n"
            "```run\npython -m pytest -q\n```\n```text\nnot a file\n```\n")
    calls = parse_calls(text, {"fs.write", "fs.patch", "shell.run"})
    assert [(c.name, c.arguments.get("path")) for c in calls] == [
        ("fs.write", "palindrome.py"), ("fs.write", "test_palindrome.py"), ("fs.patch", None), ("shell.run", None)]
    assert calls[0].arguments["content"] == "def is_palindrome(s):\n    return s == s[::-1]\n"
    assert calls[3].arguments == {"argv": ["python", "-m", "pytest", "-q"]}
    # a role without those tools gets none of them, and the prompt only describes what it may use
    assert parse_calls(text, {"fs.read"}) == []
    assert "```run" not in protocol_prompt({"fs.write"}) and protocol_prompt({"fs.read"}) == ""


def test_unnamed_code_blocks_of_a_writing_role_get_default_names() -> None:
    text = "```python\ndef f():\n    return 1\n```\nand\n```py\ndef test_f():\n    assert f() == 1\n```\n"
    assert [c.arguments["path"] for c in parse_calls(text, {"fs.write"})] == ["main.py", "test_main.py"]


def _fixtures(kind: str) -> list[Path]:
    return sorted(FIXTURES.glob(f"{kind}-*.json"))


@pytest.mark.parametrize("path", _fixtures("plan"), ids=lambda p: p.stem)
def test_real_smollm2_plans_parse_or_fail_with_a_reason(path: Path) -> None:
    case = json.loads(path.read_text())
    if case["expect"] == "invalid":
        with pytest.raises((OutputInvalid, PlanInvalid, ValueError)) as info:
            plan_from_doc(extract_json(case["answer"]), goal_id="g", version=1).check(case["roles"])
        assert case["reason"] in str(info.value)
    else:
        plan = plan_from_doc(extract_json(case["answer"]), goal_id="g", version=1)
        assert isinstance(plan, Plan) and len(plan.steps) == case["steps"]


@pytest.mark.parametrize("path", _fixtures("answer"), ids=lambda p: p.stem)
def test_real_smollm2_answers_yield_the_expected_edits(path: Path) -> None:
    case = json.loads(path.read_text())
    calls = parse_calls(case["answer"], set(case["tools"]))
    assert [c.arguments.get("path") for c in calls if c.name == "fs.write"] == case["writes"]


@pytest.mark.parametrize("path", _fixtures("verdict"), ids=lambda p: p.stem)
def test_real_smollm2_verdicts(path: Path) -> None:
    case = json.loads(path.read_text())
    if case["expect"] == "invalid":
        with pytest.raises(OutputInvalid) as info:
            _verdict(extract_json(case["answer"]))
        assert case["reason"] in str(info.value)
    else:
        assert _verdict(extract_json(case["answer"])) == case["expect"]
