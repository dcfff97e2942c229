"""What the sim answers for each kind of role: well-formed plans, notes, file-writing tool calls,
reviews, test reports and syntheses, shaped by the prompt and by whether the quality model let the
call succeed. Every prose answer starts with ``[simulated]``; every JSON answer has ``"simulated": true``.

A role is answered by what it produces (the prompt's ``OUTPUT KIND``), never by its name, and the
sim planner staffs its plans with the roles the plan request lists for each kind: renaming a role in
``nodes/`` changes nothing here. A prompt that names no kind is read by the default team's role names.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mesh.backends.base import ToolCallRequest
from mesh.backends.sim.prompt import Prompt

MARK = "[simulated]"
_STOP = {"a", "an", "the", "me", "build", "make", "create", "write", "for", "with", "and", "of", "to", "in", "my", "please"}
_STEPS = re.compile(r"\b(\d{1,3})[ -]steps?\b", re.IGNORECASE)


@dataclass
class Answer:
    text: str = ""
    tool_calls: list[ToolCallRequest] = field(default_factory=list)
    json: Any = None  # the structured answer, for roles that answer JSON

    @classmethod
    def of_json(cls, value: Any) -> Answer:
        return cls(text=json.dumps(value, indent=2), json=value)


@dataclass
class Context:
    prompt: Prompt
    rng: random.Random
    success: bool
    metadata: dict[str, Any]

    @property
    def topic(self) -> str:
        return _first_line(self.prompt.goal) or "the goal"

    def slug(self) -> str:
        return _slug(self.topic) or "solution"


def _slug(text: str, words: int = 3) -> str:
    return "_".join([w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOP][:words])


def _first_line(text: str, limit: int = 160) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line[:limit]


def _constraints_note(p: Prompt) -> str:
    if not p.constraints:
        return ""
    return "\n## Constraints honoured\n" + "\n".join(f"- {c}" for c in p.constraints) + "\n"


# --- planner --------------------------------------------------------------------------------------


def _plan_size(ctx: Context) -> int:
    asked = ctx.metadata.get("sim_plan_steps")
    if asked is None and (m := _STEPS.search(ctx.prompt.goal)):
        asked = int(m.group(1))
    return max(8, min(int(asked or 8), 200))


# The default team: output kind → role name (``nodes/``).
DEFAULT_TEAM: dict[str, str] = {"plan": "planner", "note": "researcher", "code": "coder", "review": "reviewer",
                                "test_report": "tester", "synthesis": "synthesizer", "summary": "summariser"}


def plan_steps(n: int, topic: str, rng: random.Random, team: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """A DAG of ``n`` (≥ 8) steps: parallel research, a spec, then implement → review → test
    phases (each phase builds on the last), and a synthesis that depends on the final phase.
    ``team`` (output kind → role) staffs them; the default team fills any kind it lacks."""
    steps: list[dict[str, Any]] = []
    staff = DEFAULT_TEAM | (team or {})
    researcher, coder, reviewer = staff["note"], staff["code"], staff["review"]
    tester, synthesizer = staff["test_report"], staff["synthesis"]

    def add(step_id: str, role: str, instruction: str, deps: list[str], acceptance: list[str]) -> None:
        steps.append({"step_id": step_id, "role": role, "instruction": instruction, "depends_on": deps,
                          "acceptance": acceptance, "difficulty": round(rng.uniform(0.2, 0.8), 2)})

    angles = ["requirements and user stories", "prior art, libraries and interfaces", "security, failure modes and risks"]
    phases = max(1, (n - 2 - len(angles)) // 3)
    extra_research = n - 2 - len(angles) - 3 * phases
    angles += [f"open question {i + 1} of the design" for i in range(extra_research)]
    research = []
    for i, angle in enumerate(angles):
        research.append(f"research-{i + 1}")
        add(research[-1], researcher, f"Research {angle} for: {topic}", [], [f"Notes cover {angle}", "Sources are named"])
    add("spec", researcher, f"Consolidate the research into a specification for: {topic}", research,
        ["Every requirement is testable", "Pinned constraints are restated"])
    previous = "spec"
    for k in range(1, phases + 1):
        part = f" (part {k} of {phases})" if phases > 1 else ""
        add(f"implement-{k}", coder, f"Implement the specification{part} for: {topic}", [previous],
            ["Code and tests are written to the workspace", "Pinned constraints hold"])
        add(f"review-{k}", reviewer, f"Review the implementation{part}", [f"implement-{k}"],
            ["Verdict with concrete notes"])
        add(f"test-{k}", tester, f"Test the implementation{part}", [f"implement-{k}", f"review-{k}"],
            ["Test report with pass/fail per case"])
        previous = f"test-{k}"
    add("synthesize", synthesizer, f"Synthesise the final deliverable for: {topic}", [previous, "spec"],
        ["Summarises what was built and how the constraints were met"])
    return steps


def planner(ctx: Context) -> Answer:
    steps = plan_steps(_plan_size(ctx), ctx.topic, ctx.rng, ctx.prompt.roles)
    if not ctx.success:  # a weaker plan: still valid, but without the parallel research fan-out
        for s in steps:
            if s["step_id"].startswith("research-") and s["step_id"] != "research-1":
                s["depends_on"] = ["research-1"]
    rationale = (f"Research {ctx.topic!r} from several angles in parallel, fix a specification, then build, "
                 f"review and test in phases before a final synthesis.")
    return Answer.of_json({"rationale": rationale, "steps": steps, "simulated": True})


# --- workers ----------------------------------------------------------------------------------------


def researcher(ctx: Context) -> Answer:
    p = ctx.prompt
    depth = ["key requirement", "design option", "risk", "interface", "open question"]
    n = 5 if ctx.success else 2
    findings = "\n".join(f"- {depth[i % len(depth)].capitalize()} {i + 1}: {p.instruction[:80]} "
                         f"(confidence {ctx.rng.uniform(0.6, 0.95) if ctx.success else ctx.rng.uniform(0.2, 0.5):.2f})"
                         for i in range(n))
    used = "\n".join(f"- {name}" for name in p.inputs) or "- (no inputs)"
    return Answer(text=f"{MARK}\n# Research notes: {p.instruction}\n\nGoal: {ctx.topic}\n\n## Findings\n{findings}\n\n"
                       f"## Inputs used\n{used}\n{_constraints_note(p)}")


def _module_source(ctx: Context, part: str) -> str:
    p = ctx.prompt
    rules = "\n".join(f"# Constraint: {c}" for c in p.constraints)
    fix = "\n# Revised after review: " + _first_line(p.previous_review or "", 120) if p.previous_review else ""
    check = "    if not value:\n        raise ValueError(\"value must not be empty\")\n" if ctx.success else ""
    # Goal option sim_tests=fail_first: the first version has a bug its own test catches; a revision
    # (which has feedback to address) fixes it. sim_tests=fail_always: no revision fixes it.
    tests = ctx.metadata.get("sim_tests")
    buggy = tests == "fail_always" or (tests == "fail_first" and not p.previous_review)
    return (f'"""{MARK} {ctx.topic}{part}."""\n{rules}{fix}\n\n\n'
            f"def handle(value: str) -> str:\n    \"\"\"Entry point for: {p.instruction[:60]}.\"\"\"\n"
            f"{check}    return {'value' if buggy else 'value.strip()'}\n")


def coder(ctx: Context) -> Answer:
    p = ctx.prompt
    slug = ctx.slug() + (f"_{_slug(p.subtask)}" if p.subtask else "")  # sub-agents write separate files
    files = {
        f"src/{slug}.py": _module_source(ctx, ""),
        f"tests/test_{slug}.py": f'"""{MARK} tests."""\nfrom {slug} import handle\n\n\n'
                                 f"def test_handle_strips() -> None:\n    assert handle(' x ') == 'x'\n",
    }
    if p.constraints or p.acceptance:  # documented work gets a doc page
        files[f"docs/{slug}.md"] = f"{MARK}\n# {ctx.topic}\n\n{p.instruction}\n{_constraints_note(p)}"
    write = p.tool("fs.write")
    if write is not None and not p.tool_results:
        calls = [ToolCallRequest(id=f"call_{ctx.rng.getrandbits(48):012x}", name=write.name,
                                 arguments={"path": path, "content": content}) for path, content in files.items()]
        return Answer(text="", tool_calls=calls)
    if p.tool_results:
        return Answer(text=f"{MARK}\nWrote {len(files)} files for: {p.instruction}\n" + "\n".join(f"- {f}" for f in files)
                      + "\n\nTool results:\n" + "\n".join(f"- {_first_line(r, 120)}" for r in p.tool_results))
    blocks = "\n\n".join(f"### {path}\n```\n{content}```" for path, content in files.items())
    return Answer(text=f"{MARK}\n# Code for: {p.instruction}\n\n{blocks}")


def reviewer(ctx: Context) -> Answer:
    p = ctx.prompt
    policy = ctx.metadata.get("sim_review", "first_changes")
    if policy == "approve":
        approve = True
    elif policy == "changes":
        approve = False
    else:  # changes on a first review; on a revision, whatever the quality model decided
        approve = p.previous_review is not None and ctx.success
    target = next(iter(p.inputs), "the implementation")
    notes = ([f"{target}: the change meets the acceptance criteria", "Constraints are respected"] if approve else [
        f"{target}: validate empty and oversized input before use",
        f"{target}: add a test for the failure path of {ctx.slug()}",
        "State how each pinned constraint is met" if p.constraints else "Document the public interface",
    ])
    return Answer.of_json({"verdict": "approve" if approve else "changes_requested", "notes": notes, "simulated": True})


def tester(ctx: Context) -> Answer:
    """With ``shell.run`` offered: run the workspace's tests, then report what really happened.
    Without it: a simulated report whose outcome follows the quality model."""
    p = ctx.prompt
    run = p.tool("shell.run")
    if run is not None and not p.tool_results:
        src_layout = "src/" in p.inputs.get("workspace", "")  # the file list the worker packed
        argv = ["python", "-m", "pytest", "-q", *(["-o", "pythonpath=src"] if src_layout else [])]
        return Answer(tool_calls=[ToolCallRequest(id=f"call_{ctx.rng.getrandbits(48):012x}", name=run.name,
                                                  arguments={"argv": argv})])
    if p.tool_results:
        return Answer(text=f"{MARK}\n# Test report: {p.instruction}\n\n{_run_report(p.tool_results[-1])}")
    cases = [f"test_{ctx.slug()}_{name}" for name in ("happy_path", "empty_input", "constraints", "error_path")]
    failing = set() if ctx.success else {cases[ctx.rng.randrange(1, len(cases))]}
    lines = "\n".join(f"| {c} | {'FAIL' if c in failing else 'pass'} |" for c in cases)
    verdict = "FAIL" if failing else "PASS"
    return Answer(text=f"{MARK}\n# Test report: {p.instruction}\n\nResult: {verdict} "
                       f"({len(cases) - len(failing)}/{len(cases)} passed)\n\n| case | result |\n| --- | --- |\n{lines}\n")


def _run_report(result: str) -> str:
    """A report from a ``shell.run`` result (JSON: exit_code, stdout, stderr — or a tool error)."""
    try:
        doc = json.loads(result)
    except ValueError:
        doc = {"error": "unreadable", "message": result[:300]}
    if "exit_code" not in doc:
        return f"Result: ERROR (the tests could not be run: {doc.get('message', doc)})\n"
    code = doc["exit_code"]
    verdict = "PASS" if code == 0 else "NO TESTS" if code == 5 else "FAIL"
    output = (doc.get("stdout", "") + doc.get("stderr", "")).strip()
    tail = "\n".join(output.splitlines()[-15:])
    return f"Result: {verdict} (pytest exit code {code})\n\n```\n{tail}\n```\n"


def synthesizer(ctx: Context) -> Answer:
    p = ctx.prompt
    parts = p.sub_results or "\n".join(f"- {name}: {_first_line(text, 100)}" for name, text in p.inputs.items())
    return Answer(text=f"{MARK}\n# Synthesis: {ctx.topic}\n\n## Summary\n{p.instruction}\n\n"
                       f"## Deliverables\n{parts or '- (none)'}\n{_constraints_note(p)}\n## Memory\n{p.memory or '(empty)'}\n")


def summariser(ctx: Context) -> Answer:
    """The text's opening fifth, by whole lines (an extractive lead; the reply is cut at max_tokens)."""
    text = ctx.prompt.text
    limit = max(len(text) // 5, 200)
    head = text[: text.rfind("\n", 0, limit) if len(text) > limit and "\n" in text[:limit] else limit]
    return Answer(text=f"{MARK} {head.strip()}")


def generic(ctx: Context) -> Answer:
    p = ctx.prompt
    return Answer(text=f"{MARK}\n{p.role.capitalize()} output for: {p.instruction}\n\nGoal: {ctx.topic}\n{_constraints_note(p)}")


KINDS: dict[str, Callable[[Context], Answer]] = {
    "plan": planner, "note": researcher, "code": coder, "review": reviewer, "test_report": tester,
    "synthesis": synthesizer, "summary": summariser,
}
_KIND_OF_DEFAULT_ROLE = {role: kind for kind, role in DEFAULT_TEAM.items()}


def answer(ctx: Context) -> Answer:
    """The answer for the role's output kind; a swarm's composing call (``## Sub-agent results``) is a synthesis."""
    p = ctx.prompt
    if p.sub_results is not None:
        return synthesizer(ctx)
    return KINDS.get(p.kind or _KIND_OF_DEFAULT_ROLE.get(p.role, ""), generic)(ctx)
