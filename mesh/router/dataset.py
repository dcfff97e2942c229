"""Logged routing decisions joined with their outcomes, read from a ledger.

A decision's outcome is the step attempt it routed (``route.decided`` carries the attempt: an exact
join on goal, step and attempt). When a step attempt was routed more than once (a redelivery after a
crash), only its last decision counts. Success = the attempt completed and its work was not judged
bad: the first review verdict or test run graded after it that names the step among the ones it judged
(``step.completed.quality``), when there is one, decides — so the router learns from quality, not
from completion. ``quality`` keeps that grade (NaN: nothing judged the step). Cost = every backend
call of the step between decision and outcome; latency = decision to outcome. Decisions without an outcome
(the planner's, or steps still running) and decisions logged with another feature spec are left out.

The source is a ledger DuckDB file (opened read-only: stop the ledger, or copy the file) or a
directory written by ``mesh ledger export --parquet``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path

import duckdb
import numpy as np

from mesh.contracts.models import TIERS
from mesh.errors import LedgerError, RouterError
from mesh.router.features import FEATURE_VERSION, N_FEATURES

ACTIONS: tuple[tuple[str, bool], ...] = tuple((t, thinking) for t in TIERS for thinking in (False, True))
N_ACTIONS = len(ACTIONS)

DECISIONS_SQL = """
WITH decisions AS (
    SELECT seq, goal_id, step_id, attempt, ts, tier, thinking, propensity, features, model_version
    FROM route_decisions WHERE feature_version = $feature_version AND propensity > 0
), outcomes AS (
    SELECT goal_id, step_id, attempt, status, finished_at
    FROM steps WHERE status IN ('completed', 'failed') AND finished_at IS NOT NULL
), routed AS (
    SELECT d.*, o.status, o.finished_at
    FROM decisions d JOIN outcomes o USING (goal_id, step_id, attempt)
    QUALIFY row_number() OVER (PARTITION BY d.goal_id, d.step_id, d.attempt ORDER BY d.seq DESC) = 1
), judged AS (
    SELECT goal_id, unnest(quality_judged) AS step_id, quality_grade AS grade, finished_at
    FROM steps WHERE status = 'completed' AND quality_grade IS NOT NULL
), graded AS (
    SELECT r.seq, arg_min(j.grade, j.finished_at) AS grade
    FROM routed r JOIN judged j
      ON j.goal_id = r.goal_id AND j.step_id = r.step_id AND j.finished_at >= r.finished_at
    GROUP BY r.seq
), costs AS (
    SELECT r.seq, sum(b.cost_usd) AS cost_usd
    FROM routed r JOIN backend_calls b
      ON b.goal_id = r.goal_id AND b.step_id = r.step_id AND b.ts BETWEEN r.ts AND r.finished_at
    GROUP BY r.seq
)
SELECT r.goal_id, r.features, r.tier, r.thinking, r.propensity,
       r.status = 'completed' AND coalesce(q.grade, 1.0) >= 0.5 AS success,
       coalesce(c.cost_usd, 0.0) AS cost_usd,
       date_diff('millisecond', r.ts, r.finished_at) / 1000.0 AS latency_s, r.model_version, q.grade
FROM routed r LEFT JOIN costs c USING (seq) LEFT JOIN graded q USING (seq)
ORDER BY r.seq
"""


@dataclass(frozen=True)
class Decisions:
    """Columns of logged decisions with outcomes; row i of every array is one decision."""

    goal_id: np.ndarray  # str
    x: np.ndarray  # float32 (n, N_FEATURES)
    action: np.ndarray  # int, index into ACTIONS
    propensity: np.ndarray  # float
    success: np.ndarray  # float 0/1
    cost: np.ndarray  # USD
    latency: np.ndarray  # seconds
    model_version: np.ndarray  # str
    quality: np.ndarray  # float: the grade a review or test run gave the step's work, NaN when none did

    def __len__(self) -> int:
        return len(self.action)

    def subset(self, mask: np.ndarray) -> Decisions:
        return Decisions(**{f.name: getattr(self, f.name)[mask] for f in fields(self)})

    def split(self, holdout: float) -> tuple[Decisions, Decisions]:
        """(train, held-out) by goal: a goal's decisions all land on one side, the same side every time."""
        held = np.array([_goal_bucket(g) < holdout for g in self.goal_id], dtype=bool)
        return self.subset(~held), self.subset(held)

    def halves(self) -> tuple[Decisions, Decisions]:
        """(validation, evaluation) by goal, about half each, drawn independently of ``split``: whatever is
        tuned on the validation goals (a cost weight λ) is then scored on goals it never saw."""
        validation = np.array([_goal_bucket(g, "validation") < 0.5 for g in self.goal_id], dtype=bool)
        return self.subset(validation), self.subset(~validation)


def _goal_bucket(goal_id: str, salt: str = "") -> float:
    key = f"{salt}/{goal_id}" if salt else goal_id
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0x1_0000_0000


def action_of(tier: str, thinking: bool) -> int:
    return ACTIONS.index((tier, bool(thinking)))


def load_decisions(source: str | Path) -> Decisions:
    """Decisions with outcomes from a ledger file or a parquet export directory."""
    path = Path(source)
    if not path.exists():
        raise RouterError(f"no ledger at {path}")
    try:
        if path.is_dir():
            con = duckdb.connect()
            for table in ("route_decisions", "steps", "backend_calls"):
                parquet = path / f"{table}.parquet"
                if not parquet.exists():
                    raise RouterError(f"{path} lacks {parquet.name}: is it a `mesh ledger export --parquet` directory?")
                literal = str(parquet).replace("'", "''")
                con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{literal}')")
        else:
            con = duckdb.connect(str(path), read_only=True)
        try:
            rows = con.execute(DECISIONS_SQL, {"feature_version": FEATURE_VERSION}).fetchall()
        finally:
            con.close()
    except duckdb.Error as exc:
        raise LedgerError(f"reading routing decisions from {path} failed: {exc}") from exc
    return _columns(rows)


def _columns(rows: list[tuple]) -> Decisions:  # type: ignore[type-arg]
    rows = [r for r in rows if r[1] is not None and len(r[1]) == N_FEATURES]
    return Decisions(
        goal_id=np.array([r[0] for r in rows], dtype=object),
        x=np.array([r[1] for r in rows], dtype=np.float32).reshape(len(rows), N_FEATURES),
        action=np.array([action_of(r[2], r[3]) for r in rows], dtype=np.int64),
        propensity=np.array([r[4] for r in rows], dtype=np.float64),
        success=np.array([1.0 if r[5] else 0.0 for r in rows]),
        cost=np.array([r[6] for r in rows], dtype=np.float64),
        latency=np.array([r[7] for r in rows], dtype=np.float64),
        model_version=np.array([r[8] for r in rows], dtype=object),
        quality=np.array([np.nan if r[9] is None else r[9] for r in rows], dtype=np.float64),
    )
