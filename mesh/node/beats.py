"""Node heartbeats in KV ``mesh_nodes``: what a beat says, how often it comes, when one is overdue.

The bucket's TTL (``Topology.nodes_ttl``, 15 s) only purges a dead node's entry eventually; a reader
that must not list a killed node for that long (``mesh status``) asks ``overdue`` instead: no beat for
``OVERDUE_BEATS`` intervals. Beats carry the node's wall clock (``at``), so the reader's and the node's
clocks are compared: hosts of one mesh keep time (NTP) far better than the seconds this allows.
"""

from __future__ import annotations

import time
from typing import Any

HEARTBEAT_SECONDS = 2.0
OVERDUE_BEATS = 3


def beat(node: str, role: str, host: str, pid: int, version: str, in_flight: int,
         every: float = HEARTBEAT_SECONDS, breakers: dict[str, str] | None = None) -> dict[str, Any]:
    """A heartbeat document. ``breakers``: each tier's circuit state ({tier: closed | half_open | open}) in a
    node that calls models — a breaker lives in that node's memory, and the beat is how others see it."""
    doc: dict[str, Any] = {"node": node, "role": role, "host": host, "pid": pid, "version": version,
                           "in_flight": in_flight, "at": time.time(), "every": every}
    if breakers is not None:
        doc["breakers"] = breakers
    return doc


def overdue(doc: dict[str, Any], now: float | None = None) -> bool:
    """True when the node's last beat is ``OVERDUE_BEATS`` intervals old (a beat of a release that did not
    stamp its beats is never overdue: the TTL alone removes it)."""
    at, every = doc.get("at"), doc.get("every", HEARTBEAT_SECONDS)
    if not isinstance(at, (int, float)) or not isinstance(every, (int, float)):
        return False
    return (time.time() if now is None else now) - at > OVERDUE_BEATS * every
