"""Fault injection for the sim: which calls fail, and how, at configurable per-tier rates.

A spec is ``"kind:rate,kind:rate,..."`` (``MESH_SIM_FAULTS``), e.g.
``"429:0.1,500:0.05,timeout:0.02,cut:0.02,garbage:0.01"``. Kinds:

* an HTTP status — ``400 401 402 403 404 429 500 502 503 529`` — answered as the real API would
  (429 carries ``Retry-After``/``retry-after-ms``; ``retry_after:<seconds>`` in the spec sets it);
* ``timeout`` — the server stalls until the client gives up;
* ``cut`` — the stream stops half-way and the connection drops;
* ``garbage`` — a 200 response whose body is not the API's JSON/SSE;
* ``badjson`` — a well-formed response whose *content* is broken JSON (for roles that answer JSON).

Faults are drawn from their own seeded stream, not from the request's content, so a retried call
can succeed where the first attempt failed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from mesh.errors import ConfigError

STATUS_KINDS = frozenset({"400", "401", "402", "403", "404", "429", "500", "502", "503", "529"})
OTHER_KINDS = frozenset({"timeout", "cut", "garbage", "badjson"})
ALL_TIERS = "*"


def parse_spec(spec: str) -> tuple[dict[str, float], float | None]:
    """``"429:0.1,retry_after:0.5"`` → ``({"429": 0.1}, 0.5)``; raises ``ConfigError`` on nonsense."""
    rates: dict[str, float] = {}
    retry_after: float | None = None
    for item in filter(None, (p.strip() for p in spec.split(","))):
        kind, sep, value = item.partition(":")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not sep or number < 0:
            raise ConfigError(f"sim fault {item!r} is not kind:rate with a non-negative number")
        if kind == "retry_after":
            retry_after = number
        elif kind in STATUS_KINDS or kind in OTHER_KINDS:
            if number > 1:
                raise ConfigError(f"sim fault rate {item!r} is above 1")
            rates[kind] = number
        else:
            raise ConfigError(f"unknown sim fault kind {kind!r}; known: {sorted(STATUS_KINDS | OTHER_KINDS)}")
    if sum(rates.values()) > 1 + 1e-9:
        raise ConfigError(f"sim fault rates {spec!r} add up to more than 1")
    return rates, retry_after


@dataclass
class FaultPlan:
    """Per-tier fault rates (``"*"`` for tiers without their own), switchable at run time."""

    rates: dict[str, dict[str, float]] = field(default_factory=dict)
    retry_after: float = 0.2
    seed: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)  # faults left before a tier's rates clear

    def __post_init__(self) -> None:
        self._rng = random.Random(f"faults:{self.seed}")

    @classmethod
    def from_spec(cls, spec: str, *, seed: int = 0) -> FaultPlan:
        plan = cls(seed=seed)
        plan.set(spec)
        return plan

    def set(self, spec: str, tier: str = ALL_TIERS, *, limit: int | None = None) -> None:
        """Replace the rates of one tier (or the default for all); an empty spec clears them.
        With ``limit``, the rates clear by themselves after that many faults (a storm that ends)."""
        rates, retry_after = parse_spec(spec)
        if tier == ALL_TIERS:
            self.rates.clear()
            self.limits.clear()
        self.rates[tier] = rates
        self.limits.pop(tier, None)
        if limit is not None:
            self.limits[tier] = limit
        if retry_after is not None:
            self.retry_after = retry_after

    def describe(self) -> dict[str, str]:
        return {t: ",".join(f"{k}:{v:g}" for k, v in r.items()) for t, r in self.rates.items()}

    def draw(self, tier: str) -> str | None:
        """The fault for the next call on ``tier``, or ``None``; counted in ``counts``."""
        source = tier if tier in self.rates else ALL_TIERS
        rates = self.rates.get(source, {})
        if not rates:
            return None
        u = self._rng.random()
        for kind, rate in rates.items():
            if u < rate:
                tally = self.counts.setdefault(tier, {})
                tally[kind] = tally.get(kind, 0) + 1
                if source in self.limits:
                    self.limits[source] -= 1
                    if self.limits[source] <= 0:
                        del self.limits[source]
                        self.rates[source] = {}
                return kind
            u -= rate
        return None
