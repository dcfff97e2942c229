"""Plans from a model's answer, strictly validated, and the plan the planner falls back to when a
model cannot write one within its attempts.

The fallback is built from the worker role specs, by what each role does rather than by its name:
research (a tool-less role writing notes) → implement (a role that ``revises``, i.e. writes the work a
review sends back) → review (``verdicts``) → test (``verdict_from_tests``) → synthesize (``synthesizes``),
sized by the goal. A phase with no role to do it is left out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mesh.contracts import Goal, Plan, Step
from mesh.errors import PlanInvalid
from mesh.roles.spec import RoleSpec

_NOT_TOKEN = re.compile(r"[^A-Za-z0-9_-]+")
# A brief this many words long adds one research question and one implementation part (up to the caps).
WORDS_PER_PART = 40
MAX_RESEARCH = 3
MAX_PARTS = 3


def plan_from_doc(doc: Any, *, goal_id: str, version: int) -> Plan:
    """The plan in a parsed answer: an object with ``steps`` (pydantic checks every field). Step ids are
    read leniently ("Step 1" → "Step-1", consistently in ``depends_on``); everything else is strict."""
    if isinstance(doc, list):  # a bare list of steps: the object around it was left out
        doc = {"steps": doc}
    if not isinstance(doc, dict) or "steps" not in doc:
        raise PlanInvalid('the plan must be a JSON object with a "steps" array')
    steps = doc["steps"]
    if isinstance(steps, list):
        steps = [_slug_ids(s) if isinstance(s, dict) else s for s in steps]
    return Plan(goal_id=goal_id, steps=steps, version=version, rationale=str(doc.get("rationale", "")))


def _slug_ids(step: dict[str, Any]) -> dict[str, Any]:
    out = dict(step)
    if isinstance(out.get("step_id"), str | int):
        out["step_id"] = _slug(str(out["step_id"]))
    deps = out.get("depends_on")
    if isinstance(deps, str | int):  # one dependency, not in a list
        deps = [deps]
    if isinstance(deps, list):
        out["depends_on"] = [_slug(str(d)) if isinstance(d, str | int) else d for d in deps]
    return out


def _slug(text: str) -> str:
    return _NOT_TOKEN.sub("-", text.strip()).strip("-")[:64] or text


def fallback_plan(goal: Goal, roles: Mapping[str, RoleSpec], *, version: int, reason: str) -> Plan:
    """research → implement → review → test → synthesize from the specs, sized by the goal's brief."""
    workers = {r: s for r, s in roles.items() if s.kind == "worker"}
    research = min([r for r, s in workers.items() if not s.tools and s.output_kind == "note"], default=None)
    implement = min([r for r, s in workers.items() if s.revises], default=None)
    review = min([r for r, s in workers.items() if s.verdicts], default=None)
    test = min([r for r, s in workers.items() if s.verdict_from_tests], default=None)
    synthesize = min([r for r, s in workers.items() if s.synthesizes], default=None)
    size = 1 + len(goal.brief.split()) // WORDS_PER_PART
    topic = " ".join(goal.brief.split())[:400]
    steps: list[Step] = []
    previous: list[str] = []
    if research:
        questions = ["the requirements, interfaces and acceptance tests", "existing approaches and libraries",
                     "risks and failure modes"][:min(size, MAX_RESEARCH)]
        for i, q in enumerate(questions, 1):
            steps.append(Step(step_id=f"research-{i}", role=research, instruction=f"Research {q} for: {topic}",
                              acceptance=["Concise notes that obey the pinned constraints"], difficulty=0.3))
        previous = [s.step_id for s in steps]
    parts = min(size, MAX_PARTS)
    for k in range(1, parts + 1):
        part = f" (part {k} of {parts})" if parts > 1 else ""
        if implement:
            steps.append(Step(step_id=f"implement-{k}", role=implement, depends_on=previous, difficulty=0.6,
                              instruction=f"Implement{part}: {topic}. Write the code and its tests as files.",
                              acceptance=["Code and tests are written to the workspace"]))
            previous = [f"implement-{k}"]
        if review and implement:
            steps.append(Step(step_id=f"review-{k}", role=review, depends_on=previous, difficulty=0.5,
                              instruction=f"Review the implementation{part} against the goal and the constraints.",
                              acceptance=["A verdict with concrete notes"]))
        if test and implement:
            steps.append(Step(step_id=f"test-{k}", role=test, difficulty=0.4,
                              depends_on=[*previous, *([f"review-{k}"] if review else [])],
                              instruction=f"Run the tests of the implementation{part} and report what passed.",
                              acceptance=["The test command ran; the report says what passed and failed"]))
            previous = [f"test-{k}"]
    if synthesize:
        sinks = _sinks(steps)
        steps.append(Step(step_id="synthesize", role=synthesize, depends_on=sinks, difficulty=0.3,
                          instruction=f"Compose every output into the final deliverable for: {topic}",
                          acceptance=["Says what was built, what passed, and how each constraint holds"]))
    if not steps:
        raise PlanInvalid("no worker role can take any phase of a fallback plan")
    return Plan(goal_id=goal.goal_id, steps=steps, version=version,
                rationale=f"Fallback plan built from the role specs: {reason}"[:2000])


def _sinks(steps: list[Step]) -> list[str]:
    needed = {d for s in steps for d in s.depends_on}
    return [s.step_id for s in steps if s.step_id not in needed]
