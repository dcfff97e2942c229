"""Permission refusals a NATS server reports on a connection, raised in the operation they stop.

A server drops a publish or subscription that the user's permissions do not allow and says so only in an
``-ERR 'Permissions Violation for Publish to "<subject>"'`` on the connection (nats-py hands it to the
error callback, lowercased). A request so refused gets no reply: it would wait out its timeout, and the
topology check would retry that timeout as a slow server. An operation run under ``Refusals.guard`` is
cancelled by the first refusal of a JetStream API request or of a subscription (its reply inbox) reported
meanwhile, and raises ``PermissionDenied`` naming the subject and the user.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from mesh.aio import unless_set
from mesh.errors import PermissionDenied

_REFUSAL = re.compile(r'permissions violation for (publish|subscription) (?:to|with reply of) "([^"]*)"',
                      re.IGNORECASE)
_JS_API = "$js."  # "$JS.API.…", or "$JS.<domain>.API.…" for another JetStream domain


@dataclass(frozen=True, slots=True)
class Refusal:
    operation: str  # "publish" or "subscription"
    subject: str  # as the server reported it (nats-py lowercases it)


def parse(error: BaseException) -> Refusal | None:
    """The refusal an error from the server reports, or None for any other error."""
    found = _REFUSAL.search(str(error))
    return Refusal(found.group(1).lower(), found.group(2)) if found else None


class Refusals:
    """The connection's refusals, handed to the guarded operations running when they arrive."""

    def __init__(self) -> None:
        self._watchers: list[tuple[asyncio.Event, list[Refusal]]] = []

    def report(self, error: BaseException) -> None:
        """From the connection's error callback: wake every guard this refusal stops."""
        refusal = parse(error)
        if refusal is None or (refusal.operation == "publish" and not refusal.subject.lower().startswith(_JS_API)):
            return  # another kind of error, or a refused message that is no API request of a guarded operation
        for seen, refusals in self._watchers:
            refusals.append(refusal)
            seen.set()

    async def guard(self, work: Coroutine[Any, Any, None], who: str, doing: str) -> None:
        """Run ``work``; ``PermissionDenied`` at once if the server refuses ``who`` (the user, for the
        message) a JetStream API request or a subscription meanwhile. ``doing``: what ``work`` is, for
        the message too."""
        seen = asyncio.Event()
        refusals: list[Refusal] = []
        watcher = (seen, refusals)
        self._watchers.append(watcher)
        try:
            await unless_set(seen, work)
        finally:
            self._watchers.remove(watcher)
        if refusals:
            first = refusals[0]
            hint = ""
            if first.operation == "subscription" and first.subject.startswith("_inbox"):
                hint = ("the user's replies come to its own inbox prefix: set MESH_NATS_INBOX_PREFIX (a generated "
                        "user's credentials file has it)")
            raise PermissionDenied(who, first.operation, first.subject, doing, hint)
