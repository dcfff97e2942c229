"""The router's feature spec: one function, ``featurize``, turns a ``RouteContext`` into the vector a
model sees — at decision time in every node and, from the logged ``route.decided`` events, at
training time. A model records the ``FEATURE_VERSION`` it was trained on and a node refuses a model
of another version, so changing anything below (order, scaling, hashing) means bumping the version.

Version ``route-f2`` (``FEATURE_NAMES`` lists the 47 columns in order):

* size — ``log1p(needed_tokens) / 14``; per tier the fill ``needed / window`` (capped at 4), whether
  it fits, and ``log1p(100 · worst-case USD of the call)``;
* role — what the role *is*, never its name (a renamed role routes as before): one-hot of its output
  kind (``plan`` for the orchestrator; any kind not listed is ``kind_other``), with its tool count,
  swarm capability and thinking preference below;
* step — difficulty; DAG depth, layer width (fan-out), dependents (each capped at 64) and
  ``log1p(total steps)``; ``attempt − 1`` and prior failures (capped at 8); tools the role may call;
* budget and time — the least fraction left of any goal budget; deadline pressure
  (0 = none or ≥ ``DEADLINE_HORIZON_S`` left, 1 = due); whether the role can fan out on swarm;
  the role's thinking preference (one-hot on / off / auto);
* text — signed feature hashing of the instruction's lower-case word tokens (first
  ``TEXT_CHARS`` characters, CRC-32, ``TEXT_BUCKETS`` buckets, L2-normalised).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from mesh.backends.tiers import TierConfig
from mesh.contracts.models import TIERS, DagPosition

FEATURE_VERSION = "route-f2"
# f1 one-hot encoded the default roles' names; f2 encodes their output kinds (the same columns for the
# default team, which has one role per kind), so that routing follows what a role is.
OUTPUT_KINDS: tuple[str, ...] = ("plan", "note", "code", "review", "test_report", "synthesis")
THINKING_PREFS: tuple[str, ...] = ("on", "off", "auto")
TEXT_BUCKETS = 16
TEXT_CHARS = 2000
DEADLINE_HORIZON_S = 1800.0
_CAP_FILL, _CAP_DAG, _CAP_RETRY = 4.0, 64.0, 8.0
_WORD = re.compile(r"[a-z0-9]+")
_KIND_SLOT = {k: i for i, k in enumerate(OUTPUT_KINDS)}  # anything else: the kind_other slot after them

FEATURE_NAMES: tuple[str, ...] = (
    "log_needed_tokens",
    *(f"fill_{t}" for t in TIERS), *(f"fits_{t}" for t in TIERS), *(f"log_cost_{t}" for t in TIERS),
    *(f"kind_{k}" for k in OUTPUT_KINDS), "kind_other",
    "difficulty", "depth", "fan_out", "dependents", "log_total_steps", "retry", "prior_failures", "tools",
    "budget_fraction_left", "deadline_pressure", "swarm_capable",
    *(f"thinking_{p}" for p in THINKING_PREFS),
    *(f"text_{i}" for i in range(TEXT_BUCKETS)),
)
N_FEATURES = len(FEATURE_NAMES)
# Columns other code reads back out of a logged vector (evaluation re-applies the window constraint).
FILL_COLUMNS = tuple(FEATURE_NAMES.index(f"fill_{t}") for t in TIERS)
FITS_COLUMNS = tuple(FEATURE_NAMES.index(f"fits_{t}") for t in TIERS)
COST_COLUMNS = tuple(FEATURE_NAMES.index(f"log_cost_{t}") for t in TIERS)
THINKING_COLUMNS = {p: FEATURE_NAMES.index(f"thinking_{p}") for p in THINKING_PREFS}


@dataclass(slots=True)
class RouteContext:
    """Everything a policy may look at for one decision; built by ``ModelCaller.route``."""

    role: str  # for logs and metrics only: routing never looks at the name
    needed_tokens: int
    windows: dict[str, int]
    available: dict[str, bool]
    preferred: list[str]
    difficulty: float = 0.5
    position: DagPosition = field(default_factory=DagPosition)
    attempt: int = 1
    prior_failures: int = 0
    budget_fraction_left: float = 1.0
    thinking: str = "auto"  # on | off | auto (from the role spec)
    swarm_capable: bool = False  # the role fans out on the swarm tier
    tools: int = 0  # tools the role may call during the step
    deadline_pressure: float = 0.0
    instruction: str = ""
    costs: dict[str, float] = field(default_factory=dict)  # worst-case USD of the call, per tier
    remaining_usd: float | None = None  # what the goal may still spend; None = unlimited
    output_kind: str = "note"  # what the role produces (its spec's output_kind; "plan" for the planner)


def featurize(ctx: RouteContext) -> np.ndarray:
    """The ``(1, N_FEATURES)`` float32 vector of ``ctx`` (spec ``FEATURE_VERSION``). Written as plain
    list appends: it runs on every decision and is a good part of a decision's latency."""
    needed = max(ctx.needed_tokens, 0)
    pos = ctx.position
    row = [math.log1p(needed) / 14.0]
    fits = []
    for t in TIERS:
        window = max(ctx.windows.get(t, 1), 1)
        row.append(min(needed / window, _CAP_FILL))
        fits.append(1.0 if needed <= window else 0.0)
    row += fits
    row += [math.log1p(100.0 * ctx.costs.get(t, 0.0)) for t in TIERS]
    kind = [0.0] * (len(OUTPUT_KINDS) + 1)
    kind[_KIND_SLOT.get(ctx.output_kind, len(OUTPUT_KINDS))] = 1.0
    row += kind
    row += [ctx.difficulty, min(pos.depth, _CAP_DAG), min(pos.fan_out, _CAP_DAG), min(pos.dependents, _CAP_DAG),
            math.log1p(pos.total_steps), min(ctx.attempt - 1, _CAP_RETRY), min(ctx.prior_failures, _CAP_RETRY),
            ctx.tools, ctx.budget_fraction_left, ctx.deadline_pressure, 1.0 if ctx.swarm_capable else 0.0]
    row += [1.0 if ctx.thinking == p else 0.0 for p in THINKING_PREFS]
    row += text_features(ctx.instruction)
    return np.array(row, dtype=np.float32).reshape(1, N_FEATURES)


def fitting_tiers(x: np.ndarray) -> np.ndarray:
    """(N, 3) bool from logged feature rows: the tiers whose window fits; with none, the largest window."""
    fits = x[:, FITS_COLUMNS] > 0.5
    none = ~fits.any(axis=1)
    fits[none, np.argmin(x[none][:, FILL_COLUMNS], axis=1)] = True
    return fits


def text_features(text: str) -> list[float]:
    """Signed hashing of word tokens into ``TEXT_BUCKETS`` buckets, L2-normalised (zeros for no words)."""
    buckets = [0.0] * TEXT_BUCKETS
    for word in _WORD.findall(text[:TEXT_CHARS].lower()):
        h = zlib.crc32(word.encode())
        buckets[h % TEXT_BUCKETS] += 1.0 if h & 0x80000000 else -1.0
    norm = math.sqrt(sum(b * b for b in buckets))
    return [b / norm for b in buckets] if norm else buckets


def deadline_pressure(seconds_left: float | None) -> float:
    """0 with no deadline or at least ``DEADLINE_HORIZON_S`` left, rising linearly to 1 when due."""
    if seconds_left is None:
        return 0.0
    return min(max(1.0 - seconds_left / DEADLINE_HORIZON_S, 0.0), 1.0)


def call_costs(tiers: Mapping[str, TierConfig], needed_tokens: int, output_tokens: int) -> dict[str, float]:
    """Worst-case USD of one call per tier: every needed token billed as an uncached prompt token and
    a full output reserve — what the gateway's budget guard holds back before the call."""
    return {name: cfg.prices.cost(prompt_tokens=needed_tokens, cached_tokens=0, completion_tokens=output_tokens)
            for name, cfg in tiers.items()}
