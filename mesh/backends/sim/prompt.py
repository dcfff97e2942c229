"""Reading the mesh prompt protocol (``mesh.contracts.prompt``) back out of a conversation: the sim
answers from what the prompt says, as a model would, not from side channels."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mesh.backends.base import ChatMessage, ToolSpec
from mesh.contracts import prompt as protocol


@dataclass
class Prompt:
    role: str = "assistant"
    kind: str | None = None  # what the role produces (``OUTPUT KIND:``): plan, note, code, review, …
    roles: dict[str, str] = field(default_factory=dict)  # a plan request's roles: output kind → role
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
    p.role = protocol.role_of(system) or p.role
    p.kind = protocol.kind_of(system)
    # The last user turn carries the step; tool results after it mean the model already acted.
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    user = messages[last_user].content if last_user >= 0 else ""
    p.tool_results = [m.content for m in messages[last_user + 1 :] if m.role == "tool"]
    first_user = next((m.content for m in messages if m.role == "user"), "")
    secs = protocol.sections(first_user) | protocol.sections(user)
    p.constraints = protocol.parse_bullets(secs.get(protocol.CONSTRAINTS, ""))
    p.goal = secs.get(protocol.GOAL, "") or secs.get("", "")
    head, _, acceptance = secs.get(protocol.STEP, "").partition(protocol.ACCEPTANCE)
    p.step = head.strip()
    p.acceptance = protocol.parse_bullets(acceptance)
    p.inputs = _nested(secs.get(protocol.INPUTS, ""))
    p.memory = secs.get(protocol.MEMORY, "")
    p.roles = protocol.parse_roles(secs.get(protocol.ROLES, ""))
    if protocol.PREVIOUS_REVIEW in secs:  # the feedback texts, without their ``### <name>`` headings
        p.previous_review = "\n\n".join(_nested(secs[protocol.PREVIOUS_REVIEW]).values())
    p.subtask = next((v for k, v in secs.items() if k.startswith(protocol.SUB_TASK)), None)
    p.sub_results = secs.get(protocol.SUB_RESULTS)
    p.text = secs.get(protocol.TEXT, "")
    return p


def _nested(body: str) -> dict[str, str]:
    return {k: v for k, v in protocol.sections(body, level=3).items() if k}
