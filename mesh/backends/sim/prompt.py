"""Reading the mesh prompt protocol back out of a conversation (see ``mesh.packing``): the sim
answers from what the prompt says, as a model would, not from side channels."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mesh.backends.base import ChatMessage, ToolSpec

_ROLE = re.compile(r"^\s*ROLE:\s*([A-Za-z0-9_-]+)", re.MULTILINE)
_SECTION = re.compile(r"^## (.+)$", re.MULTILINE)
_SUBSECTION = re.compile(r"^### (.+)$", re.MULTILINE)
_BULLET = re.compile(r"^\s*[-*]\s+(.*\S)\s*$", re.MULTILINE)


def sections(text: str, pattern: re.Pattern[str] = _SECTION) -> dict[str, str]:
    """``## Title`` → body, in order; text before the first heading is under ``""``."""
    out: dict[str, str] = {}
    marks = list(pattern.finditer(text))
    if not marks or marks[0].start() > 0:
        out[""] = text[: marks[0].start() if marks else len(text)].strip()
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        out[m.group(1).strip()] = text[m.end() : end].strip()
    return out


@dataclass
class Prompt:
    role: str = "assistant"
    constraints: list[str] = field(default_factory=list)
    goal: str = ""
    step: str = ""
    acceptance: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    memory: str = ""
    previous_review: str | None = None
    subtask: str | None = None
    sub_results: str | None = None
    text: str = ""  # a summariser's ``## Text``
    tool_results: list[str] = field(default_factory=list)
    tools: list[ToolSpec] = field(default_factory=list)

    @property
    def instruction(self) -> str:
        return self.subtask or self.step or self.goal or "the task"

    def tool(self, name: str) -> ToolSpec | None:
        """The offered tool called ``name`` — matched as a mesh name or its wire form (``fs.write`` ~ ``fs_write``)."""
        want = re.sub(r"[^A-Za-z0-9_-]", "_", name)
        return next((t for t in self.tools if re.sub(r"[^A-Za-z0-9_-]", "_", t.name) == want), None)


def parse(messages: list[ChatMessage], tools: list[ToolSpec]) -> Prompt:
    p = Prompt(tools=list(tools))
    system = "\n".join(m.content for m in messages if m.role == "system")
    if m := _ROLE.search(system):
        p.role = m.group(1).lower()
    # The last user turn carries the step; tool results after it mean the model already acted.
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    user = messages[last_user].content if last_user >= 0 else ""
    p.tool_results = [m.content for m in messages[last_user + 1 :] if m.role == "tool"]
    first_user = next((m.content for m in messages if m.role == "user"), "")
    secs = sections(first_user) | sections(user)
    p.constraints = _BULLET.findall(secs.get("Pinned constraints", ""))
    p.constraints = [c for c in p.constraints if c != "(none)"]
    p.goal = secs.get("Goal", "") or secs.get("", "")
    step = secs.get("Step", "")
    head, _, acceptance = step.partition("Acceptance:")
    p.step = head.strip()
    p.acceptance = _BULLET.findall(acceptance)
    p.inputs = {k: v for k, v in sections(secs.get("Inputs", ""), _SUBSECTION).items() if k}
    p.memory = secs.get("Memory", "")
    p.previous_review = secs.get("Previous review")
    p.subtask = next((v for k, v in secs.items() if k.startswith("Sub-task")), None)
    p.sub_results = secs.get("Sub-agent results")
    p.text = secs.get("Text", "")
    return p
