"""The operator pages' data: the mesh (nodes, lag, dead letters, circuit breakers) and the router (tier mix
and cost against the always-best-tier baseline, from the ledger). Plain data for the templates, no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from typing import Any

from markupsafe import Markup

from mesh.bus.client import ConsumerState
from mesh.client import NodeInfo
from mesh.gateway.dashboard.views import money
from mesh.node.beats import overdue

BREAKER_STATES = ("closed", "half_open", "open")
MAX_BUCKETS = 48
MAX_TIME_ROWS = 10_000  # minutes × tiers (the ledger service's own cap): about two days at three tiers
ROLE_CONSUMER = "role-"  # Topology.consumer_name(role)


@dataclass(frozen=True, slots=True)
class NodeRow:
    node: str
    role: str
    host: str
    pid: int
    version: str
    in_flight: int
    age: str
    breakers: dict[str, str]


@dataclass(slots=True)
class RoleCard:
    role: str
    nodes: list[str] = field(default_factory=list)
    pending: int = 0
    in_flight: int = 0
    dead: int = 0


@dataclass(frozen=True, slots=True)
class BreakerRow:
    """A tier's circuit across the nodes that call it: the worst state any node reports, and how many say each."""

    tier: str
    state: str
    closed: int
    half_open: int
    open: int


def mesh_view(nodes: Sequence[NodeInfo], backlog: Mapping[str, ConsumerState], dead: Mapping[str, int],
              now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    live = [n for n in nodes if not overdue(n.model_dump(), now)]
    cards: dict[str, RoleCard] = {}

    def card(role: str) -> RoleCard:
        return cards.setdefault(role, RoleCard(role))

    rows = []
    for n in live:
        card(n.role).nodes.append(n.node)
        at = (n.model_extra or {}).get("at")
        age = f"{max(0.0, now - at):.1f}s ago" if isinstance(at, int | float) else ""
        breakers = {tier: state for tier, state in n.breakers.items() if state in BREAKER_STATES}
        rows.append(NodeRow(n.node, n.role, n.host, n.pid, n.version, n.in_flight, age, breakers))
    for name, c in backlog.items():
        if name.startswith(ROLE_CONSUMER):
            entry = card(name.removeprefix(ROLE_CONSUMER))
            entry.pending, entry.in_flight = c.pending, c.in_flight
    for role, count in dead.items():
        card(role).dead = count
    return {"roles": [cards[r] for r in sorted(cards)], "nodes": rows, "breakers": breaker_rows(rows),
            "consumers": [backlog[k] for k in sorted(backlog)], "dead": dict(dead)}


def breaker_rows(rows: Iterable[NodeRow]) -> list[BreakerRow]:
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        for tier, state in row.breakers.items():
            per = counts.setdefault(tier, dict.fromkeys(BREAKER_STATES, 0))
            per[state] += 1
    return [BreakerRow(tier, next(s for s in reversed(BREAKER_STATES) if per[s]) if any(per.values()) else "closed",
                       per["closed"], per["half_open"], per["open"]) for tier, per in sorted(counts.items())]


# --- the router: cost against the always-best-tier baseline -----------------------------------------

# Finished step attempts per tier (the ledger's `steps` table).
TIER_SQL = """
SELECT tier, count(*) AS attempts, count(*) FILTER (WHERE status = 'completed') AS completed,
       coalesce(sum(cost_usd), 0) AS cost, coalesce(sum(prompt_tokens + completion_tokens), 0) AS tokens,
       coalesce(bool_or(simulated), false) AS simulated
FROM steps WHERE tier IS NOT NULL AND status IN ('completed', 'failed') GROUP BY tier ORDER BY tier
"""
# The same attempts per minute and tier, for the curves over time.
TIME_SQL = """
SELECT date_trunc('minute', finished_at) AS minute, tier, count(*) AS n, coalesce(sum(cost_usd), 0) AS cost,
       coalesce(sum(prompt_tokens + completion_tokens), 0) AS tokens
FROM steps WHERE tier IS NOT NULL AND status IN ('completed', 'failed') AND finished_at IS NOT NULL
GROUP BY 1, 2 ORDER BY 1, 2
"""


@dataclass(frozen=True, slots=True)
class TierRow:
    tier: str
    attempts: int
    completed: int
    cost: float
    tokens: int
    cost_text: str
    per_k_text: str

    @property
    def success(self) -> float:
        return self.completed / self.attempts if self.attempts else 0.0

    @property
    def per_token(self) -> float:
        return self.cost / self.tokens if self.tokens else 0.0


@dataclass(slots=True)
class Bucket:
    start: datetime
    label: str = ""
    mix: dict[str, int] = field(default_factory=dict)
    cost: float = 0.0
    baseline: float = 0.0
    cost_text: str = ""
    baseline_text: str = ""


def router_view(tier_rows: Sequence[Sequence[Any]], time_rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """Tier stats, the baseline tier (highest success rate; more attempts break a tie), and per time bucket
    the tier mix, the actual cost and the baseline's: each bucket's tokens at the baseline tier's observed
    cost per token."""
    simulated = any(bool(r[5]) for r in tier_rows)
    tiers = [TierRow(str(r[0]), int(r[1]), int(r[2]), float(r[3]), int(r[4]), money(float(r[3]), simulated),
                     money(1000 * float(r[3]) / int(r[4]) if int(r[4]) else 0.0, simulated)) for r in tier_rows]
    if not tiers:
        return {"tiers": []}
    best = max(tiers, key=lambda t: (t.success, t.attempts))
    minutes = sorted({_when(r[0]) for r in time_rows})
    step = max(1, -(-len(minutes) // MAX_BUCKETS))  # at most MAX_BUCKETS rows: consecutive minutes merged
    start_of = {m: minutes[i - i % step] for i, m in enumerate(minutes)}
    buckets: dict[datetime, Bucket] = {}
    for when, tier, n, cost, tokens in ((_when(r[0]), str(r[1]), int(r[2]), float(r[3]), int(r[4])) for r in time_rows):
        b = buckets.setdefault(start_of[when], Bucket(start_of[when]))
        b.mix[tier] = b.mix.get(tier, 0) + n
        b.cost += cost
        b.baseline += tokens * best.per_token
    ordered = [buckets[k] for k in sorted(buckets)]
    for b in ordered:
        b.label = b.start.strftime("%Y-%m-%d %H:%M")
        b.cost_text, b.baseline_text = money(b.cost, simulated), money(b.baseline, simulated)
    actual = sum(t.cost for t in tiers)
    baseline = sum(t.tokens for t in tiers) * best.per_token
    saving = (f"{100 * (1 - actual / baseline):.0f}% below the baseline" if baseline and actual <= baseline
              else f"{100 * (actual / baseline - 1):.0f}% above the baseline" if baseline else "")
    total = {"attempts": sum(t.attempts for t in tiers), "cost": money(actual, simulated),
             "baseline": money(baseline, simulated), "saving": saving}
    return {"tiers": tiers, "best": best, "buckets": ordered, "total": total, "simulated": simulated,
            "chart": cumulative_chart(ordered)}


def _when(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def cumulative_chart(buckets: Sequence[Bucket], width: int = 720, height: int = 200) -> Markup:
    """Two cumulative cost lines (actual, baseline) from zero through each bucket's end, as SVG."""
    if not buckets:
        return Markup("")
    acc_real, acc_base, real, base = 0.0, 0.0, [0.0], [0.0]
    for b in buckets:
        acc_real += b.cost
        acc_base += b.baseline
        real.append(acc_real)
        base.append(acc_base)
    top = max(max(real), max(base)) or 1.0
    pad, n = 36, len(real)

    def points(values: list[float]) -> str:
        xs = [pad + i * (width - 2 * pad) / (n - 1) for i in range(n)]
        return " ".join(f"{x:.1f},{height - pad - v / top * (height - 2 * pad):.1f}" for x, v in zip(xs, values,
                                                                                                  strict=True))

    return Markup(f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="cumulative cost, actual and baseline">'
            f'<polyline class="base" points="{points(base)}"/><polyline class="real" points="{points(real)}"/>'
            f'<text x="{pad}" y="14">{escape(f"{top:.4f} USD")}</text>'
            f'<text x="{pad}" y="{height - 8}">{escape(buckets[0].label)}</text>'
            f'<text x="{width - pad}" y="{height - 8}" text-anchor="end">{escape(buckets[-1].label)}</text></svg>')
