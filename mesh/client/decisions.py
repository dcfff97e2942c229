"""A person's decision written as text, as a terminal (`mesh run`) or a chat-like client (A2A) sends it."""

from __future__ import annotations

from mesh.contracts import Decision

APPROVE_WORDS = frozenset({"approve", "approved", "a", "y", "yes"})
REJECT_WORDS = frozenset({"reject", "rejected", "r", "n", "no"})


def parse_decision(text: str) -> tuple[Decision, str] | None:
    """"approve" (or "a", "y"), optionally with a note after ":" or a space; "reject: <note>" (or "r <note>").
    (decision, note), or None when the text is neither."""
    stripped = text.strip()
    head, _, note = stripped.partition(":") if ":" in stripped else stripped.partition(" ")
    word = head.strip().lower()
    if word in APPROVE_WORDS:
        return "approve", note.strip()
    if word in REJECT_WORDS:
        return "reject", note.strip()
    return None
