"""The mesh prompt protocol, written and read in one place.

A prompt is plain markdown a real model reads as an ordinary prompt, with a structure the sim reads
back (as a model would, from the text, not from side channels): the system message starts with
``ROLE: <role>`` and ``OUTPUT KIND: <kind>`` (what the role produces: plan, note, code, review…, so
that a reader can tell what a role is without knowing its name); the user message is a run of
``## <Section>`` blocks, inputs and sub-agent results nested as ``### <name>``; a plan request lists
the roles in ``## Roles`` as ``- <role> (<kind>): <description>``. The section titles are the names below; everything that writes a prompt
(packing, the planner, the swarm fan-out, the summariser) renders them with ``render`` and
``section``, and the sim parses them with ``sections`` — so writer and reader cannot drift.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Section titles (the user message of a step, in this order; ``Previous review`` only on revisions).
CONSTRAINTS = "Pinned constraints"
GOAL = "Goal"
STEP = "Step"
PREVIOUS_REVIEW = "Previous review"
INPUTS = "Inputs"
MEMORY = "Memory"
# The planner's sections.
ROLES = "Roles"
REPLAN = "Replan"
OUTPUT = "Output"
# The swarm fan-out: a sub-agent's part (``Sub-task i/n``) and the composing call's input.
SUB_TASK = "Sub-task"
SUB_RESULTS = "Sub-agent results"
# A summariser's source text.
TEXT = "Text"
ACCEPTANCE = "Acceptance:"
NONE = "(none)"

_ROLE = re.compile(r"^\s*ROLE:\s*([A-Za-z0-9_-]+)", re.MULTILINE)
_KIND = re.compile(r"^\s*OUTPUT KIND:\s*([A-Za-z0-9_]+)", re.MULTILINE)
_ROLE_LINE = re.compile(r"^\s*-\s+([A-Za-z0-9_-]+) \(([A-Za-z0-9_]+)\):", re.MULTILINE)
_SECTION = re.compile(r"^## (.+)$", re.MULTILINE)
_SUBSECTION = re.compile(r"^### (.+)$", re.MULTILINE)
_BULLET = re.compile(r"^\s*[-*]\s+(.*\S)\s*$", re.MULTILINE)


# --- writing -----------------------------------------------------------------------------------


def system(role: str, kind: str, prompt: str) -> str:
    """A system message: the role and its output kind, then the role's prompt."""
    return f"ROLE: {role}\nOUTPUT KIND: {kind}\n{prompt}"


def role_line(role: str, kind: str, description: str) -> str:
    """One role of a plan request's ``Roles`` section (a bullet's text)."""
    return f"{role} ({kind}): {description}"


def section(title: str, body: str) -> str:
    return f"## {title}\n{body}"


def subsection(title: str, body: str) -> str:
    return f"### {title}\n{body}"


def render(sections: Iterable[tuple[str, str]]) -> str:
    """``(title, body)`` pairs as ``## title`` blocks separated by blank lines."""
    return "\n\n".join(section(t, b) for t, b in sections)


def nested(items: Iterable[tuple[str, str]]) -> str:
    """``(name, text)`` pairs as ``### name`` blocks: the body of ``Inputs``, ``Previous review``…"""
    return "\n\n".join(subsection(n, t) for n, t in items)


def bullets(items: Iterable[str]) -> str:
    return "\n".join(f"- {i}" for i in items)


def sub_task(index: int, total: int) -> str:
    """The title of sub-agent ``index`` (0-based) of ``total``."""
    return f"{SUB_TASK} {index + 1}/{total}"


# --- reading -----------------------------------------------------------------------------------


def sections(text: str, *, level: int = 2) -> dict[str, str]:
    """``## Title`` (``level`` 3: ``### Title``) → body, in order; text before the first heading is
    under ``""``."""
    pattern = _SECTION if level == 2 else _SUBSECTION
    out: dict[str, str] = {}
    marks = list(pattern.finditer(text))
    if not marks or marks[0].start() > 0:
        out[""] = text[: marks[0].start() if marks else len(text)].strip()
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        out[m.group(1).strip()] = text[m.end() : end].strip()
    return out


def role_of(system_text: str) -> str | None:
    """The role named by a system message's ``ROLE:`` line (lower-cased), if any."""
    m = _ROLE.search(system_text)
    return m.group(1).lower() if m else None


def kind_of(system_text: str) -> str | None:
    """The output kind named by a system message's ``OUTPUT KIND:`` line, if any."""
    m = _KIND.search(system_text)
    return m.group(1).lower() if m else None


def parse_roles(body: str) -> dict[str, str]:
    """A ``Roles`` section → {output kind: role} (the first role of each kind)."""
    out: dict[str, str] = {}
    for role, kind in _ROLE_LINE.findall(body):
        out.setdefault(kind, role)
    return out


def parse_bullets(text: str) -> list[str]:
    """The ``- item`` lines of a section body, ``(none)`` left out."""
    return [b for b in _BULLET.findall(text) if b != NONE]
