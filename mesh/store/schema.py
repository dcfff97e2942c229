"""The ledger's DuckDB schema: raw tables, derived tables, views, and the schema version.

Two kinds of table, and why:

* **Raw** — ``events`` (one row per stream message, the full event as JSON) and ``ledger_meta``
  (schema version, ingest high-water mark). They are the only state that cannot be recomputed, so
  they are the only tables a migration ever has to transform by hand (``MIGRATIONS``).
* **Derived** — goals, steps, artifacts, route_decisions, backend_calls, tool_calls, nodes and the
  views. Each is a pure function of the events table: ``FOLDS`` holds, per table, one SQL statement
  that folds the events of a sequence range ``[$lo, $hi]`` into it. Folding is batch-independent
  (append tables dedupe on ``event_id``; state tables merge with "last non-null value by stream
  sequence wins"), so a live ledger fed in many small batches and a rebuild fed in big ones end up
  with identical tables, and a migration can simply drop the derived tables and fold all events again.

Column ``ts`` is the event's ``at`` (``AT`` is a reserved word in DuckDB's grammar).
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.contracts import EVENT_TYPES

SCHEMA_VERSION = 3


@dataclass(frozen=True, slots=True)
class Migration:
    """Upgrades the raw tables of a file from ``version - 1`` to ``version``."""

    version: int
    sql: tuple[str, ...]


# Hand-written steps for the raw tables, in order. Derived tables need none: they are rebuilt from
# the events table after any migration (see ``mesh.store.ledger``).
MIGRATIONS: tuple[Migration, ...] = (
    # 2: simulated on calls, steps and goals; step and goal quality; attempt on route decisions. Only
    # derived tables changed: they are refolded from the events.
    Migration(2, ()),
    # 3: the approvals table (approval.requested / approval.decided); derived only.
    Migration(3, ()),
)

META_DDL = "CREATE TABLE IF NOT EXISTS ledger_meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)"

RAW_DDL: tuple[str, ...] = (
    """CREATE TABLE events (
        seq UBIGINT PRIMARY KEY,          -- JetStream stream sequence: the ledger's clock
        subject VARCHAR NOT NULL,
        event_id VARCHAR NOT NULL,
        goal_id VARCHAR NOT NULL,
        type VARCHAR NOT NULL,
        ts TIMESTAMPTZ NOT NULL,
        node VARCHAR,
        -- The whole event as JSON. VARCHAR: pydantic wrote valid JSON, and a JSON column would parse
        -- it again on insert. zstd: a third of the default's size, and a checkpoint spends a third of
        -- the CPU on it (the default analyses every segment for FSST).
        payload VARCHAR USING COMPRESSION zstd NOT NULL
    )""",
)

DERIVED_TABLES: tuple[str, ...] = (
    "goals", "steps", "artifacts", "route_decisions", "backend_calls", "tool_calls", "nodes", "approvals",
)
VIEWS: tuple[str, ...] = ("artifact_lineage", "goal_summary", "tier_stats")
TABLES: tuple[str, ...] = ("events", *DERIVED_TABLES)

_USAGE_COLUMNS = """
        prompt_tokens BIGINT, completion_tokens BIGINT, cached_tokens BIGINT, reasoning_tokens BIGINT,
        cost_usd DOUBLE, calls BIGINT"""

DERIVED_DDL: tuple[str, ...] = (
    f"""CREATE TABLE goals (
        goal_id VARCHAR PRIMARY KEY,
        status VARCHAR,                   -- submitted | running | completed | failed | cancelled
        brief VARCHAR, constraints VARCHAR[], budget JSON, options JSON, submitted_at TIMESTAMPTZ,
        plan_version INTEGER, plan_steps INTEGER, plan JSON, planned_at TIMESTAMPTZ,
        result_digest VARCHAR, workspace_digest VARCHAR, steps_run INTEGER, reason VARCHAR,
        finished_at TIMESTAMPTZ, updated_at TIMESTAMPTZ,{_USAGE_COLUMNS},
        simulated BOOLEAN,                -- some model call of the goal was simulated
        tests VARCHAR,                    -- last test run: passed | failed | not_run
        quality JSON                      -- the goal's quality record (tests, reviews, revisions)
    )""",
    f"""CREATE TABLE steps (
        goal_id VARCHAR, step_id VARCHAR, attempt INTEGER,
        role VARCHAR, task_id VARCHAR,
        status VARCHAR,                   -- dispatched | running | completed | failed
        dispatched_at TIMESTAMPTZ, started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ, updated_at TIMESTAMPTZ,
        tier VARCHAR, verdict VARCHAR, outputs VARCHAR[], error VARCHAR, retryable BOOLEAN,
        progress VARCHAR, progress_fraction DOUBLE,{_USAGE_COLUMNS},
        simulated BOOLEAN,
        quality_grade DOUBLE, quality_source VARCHAR,   -- 1 approved / tests passed, 0 not; tests | review | none
        quality_exit_code INTEGER, quality_judged VARCHAR[],  -- the steps whose work the grade is about
        PRIMARY KEY (goal_id, step_id, attempt)
    )""",
    """CREATE TABLE artifacts (
        seq UBIGINT NOT NULL, event_id VARCHAR NOT NULL, goal_id VARCHAR NOT NULL, ts TIMESTAMPTZ,
        node VARCHAR, digest VARCHAR NOT NULL, name VARCHAR, media_type VARCHAR, size BIGINT, kind VARCHAR,
        producer_step VARCHAR, producer_role VARCHAR, parents VARCHAR[], created_at TIMESTAMPTZ
    )""",
    """CREATE TABLE route_decisions (
        seq UBIGINT NOT NULL, event_id VARCHAR NOT NULL, goal_id VARCHAR NOT NULL, ts TIMESTAMPTZ,
        node VARCHAR, step_id VARCHAR, role VARCHAR,
        tier VARCHAR, thinking BOOLEAN, probabilities MAP(VARCHAR, DOUBLE), thinking_probability DOUBLE,
        propensity DOUBLE, explored BOOLEAN, overridden_by VARCHAR, model_version VARCHAR,
        feature_version VARCHAR, features DOUBLE[], attempt INTEGER
    )""",
    f"""CREATE TABLE backend_calls (
        seq UBIGINT NOT NULL, event_id VARCHAR NOT NULL, goal_id VARCHAR NOT NULL, ts TIMESTAMPTZ,
        node VARCHAR, step_id VARCHAR, tier VARCHAR, model VARCHAR, endpoint VARCHAR,{_USAGE_COLUMNS},
        latency_ms DOUBLE, outcome VARCHAR, attempt INTEGER, thinking BOOLEAN, simulated BOOLEAN
    )""",
    """CREATE TABLE tool_calls (
        seq UBIGINT NOT NULL, event_id VARCHAR NOT NULL, goal_id VARCHAR NOT NULL, ts TIMESTAMPTZ,
        node VARCHAR, step_id VARCHAR, role VARCHAR, tool VARCHAR, arguments JSON,
        ok BOOLEAN, refused BOOLEAN, error VARCHAR, duration_ms DOUBLE
    )""",
    """CREATE TABLE nodes (
        node_id VARCHAR PRIMARY KEY,
        role VARCHAR, status VARCHAR,     -- up | down
        host VARCHAR, pid BIGINT, version VARCHAR,
        up_at TIMESTAMPTZ, down_at TIMESTAMPTZ, down_reason VARCHAR, last_seen TIMESTAMPTZ
    )""",
    """CREATE TABLE approvals (
        goal_id VARCHAR, request INTEGER,  -- the goal's n-th approval request (docs/APPROVALS.md)
        gate VARCHAR, kind VARCHAR,       -- plan | final | <step>.before | <step>.after; plan | before | after | final
        step_id VARCHAR, role VARCHAR, summary VARCHAR,
        status VARCHAR,                   -- pending | approved | rejected
        requested_at TIMESTAMPTZ, deadline TIMESTAMPTZ, on_timeout VARCHAR,
        decision VARCHAR, decided_by VARCHAR, note VARCHAR, decided_at TIMESTAMPTZ, timed_out BOOLEAN,
        updated_at TIMESTAMPTZ,
        PRIMARY KEY (goal_id, request)
    )""",
    """CREATE VIEW artifact_lineage AS
        SELECT a.digest, a.goal_id, a.producer_step, a.kind, unnest(a.parents) AS parent
        FROM artifacts a""",
    """CREATE VIEW goal_summary AS
        SELECT g.goal_id, g.status, g.brief, g.submitted_at, g.finished_at,
               date_diff('millisecond', g.submitted_at, g.finished_at) / 1000.0 AS duration_s,
               g.plan_version, g.plan_steps,
               coalesce(s.attempts, 0) AS step_attempts,
               coalesce(s.completed, 0) AS steps_completed,
               coalesce(s.failed, 0) AS steps_failed,
               coalesce(b.calls, 0) AS backend_calls,
               coalesce(b.failed_calls, 0) AS backend_errors,
               coalesce(b.prompt_tokens, 0) AS prompt_tokens,
               coalesce(b.completion_tokens, 0) AS completion_tokens,
               coalesce(b.cost_usd, 0) AS cost_usd,
               coalesce(t.calls, 0) AS tool_calls,
               coalesce(t.failed, 0) AS tool_errors,
               g.reason,
               coalesce(g.simulated, b.simulated, false) AS simulated,
               coalesce(b.simulated_cost_usd, 0) AS simulated_cost_usd,
               g.tests
        FROM goals g
        LEFT JOIN (SELECT goal_id, count(*) AS attempts,
                          count(*) FILTER (status = 'completed') AS completed,
                          count(*) FILTER (status = 'failed') AS failed
                   FROM steps GROUP BY goal_id) s USING (goal_id)
        LEFT JOIN (SELECT goal_id, count(*) AS calls, count(*) FILTER (outcome <> 'ok') AS failed_calls,
                          sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
                          sum(cost_usd) AS cost_usd, bool_or(simulated) AS simulated,
                          sum(cost_usd) FILTER (simulated) AS simulated_cost_usd
                   FROM backend_calls GROUP BY goal_id) b USING (goal_id)
        LEFT JOIN (SELECT goal_id, count(*) AS calls, count(*) FILTER (NOT ok) AS failed
                   FROM tool_calls GROUP BY goal_id) t USING (goal_id)""",
    """CREATE VIEW tier_stats AS
        SELECT tier, count(*) AS calls,
               count(*) FILTER (outcome = 'ok') AS ok_calls,
               count(*) FILTER (outcome = 'ok') / count(*) AS success_rate,
               sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
               sum(cost_usd) AS cost_usd,
               avg(latency_ms) AS mean_latency_ms,
               quantile_cont(latency_ms, 0.5) AS p50_latency_ms,
               quantile_cont(latency_ms, 0.95) AS p95_latency_ms,
               count(*) FILTER (simulated) AS simulated_calls
        FROM backend_calls GROUP BY tier""",
)

# --- folding events into derived tables -------------------------------------------------------
# Every statement reads the stored events with $lo <= seq <= $hi.


@dataclass(frozen=True, slots=True)
class Fold:
    """How one derived table absorbs events: the types it reads and the statement that folds them."""

    table: str
    types: frozenset[str]
    sql: str


@dataclass(frozen=True, slots=True)
class _Group:
    """Columns one kind of event sets together; the latest such event defines all of them.

    The first column must be non-null whenever such an event exists: it tells a batch that had one
    from a batch that did not.
    """

    when: str
    columns: dict[str, str]


_USAGE_JSON = ('{"prompt_tokens":"BIGINT","completion_tokens":"BIGINT","cached_tokens":"BIGINT",'
               '"reasoning_tokens":"BIGINT","cost_usd":"DOUBLE","calls":"BIGINT"}')
_REF_JSON = '{"digest":"VARCHAR","media_type":"VARCHAR","size":"BIGINT","name":"VARCHAR"}'
_USAGE = {c: f"j.usage.{c}" for c in
          ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "cost_usd", "calls")}


def _types(prefix: str) -> frozenset[str]:
    return frozenset(t for t in EVENT_TYPES if t.startswith(prefix))


def _source(types: frozenset[str], shape: str) -> str:
    """The range's events of ``types``, each payload parsed once into the struct ``j``."""
    listed = ", ".join(f"'{t}'" for t in sorted(types))
    return (f"(SELECT seq, event_id, goal_id, type, ts, node, json_transform(payload, '{shape}') AS j "
            f"FROM events WHERE seq BETWEEN $lo AND $hi AND type IN ({listed}))")


def _append(table: str, type_: str, shape: str, columns: str) -> Fold:
    """One row per event of ``type_``."""
    types = frozenset({type_})
    return Fold(table, types, (
        f"INSERT INTO {table} SELECT seq, event_id, goal_id, ts, node, {columns} "
        f"FROM {_source(types, shape)}"))


def _merge(table: str, key: str, types: frozenset[str], source: str, latest: dict[str, str],
           groups: tuple[_Group, ...]) -> Fold:
    """Upsert one row per key. ``latest`` columns take their newest non-null value; each group's
    columns come from the newest event of its kind. Both rules give the same table whether the
    events arrive in one batch or many, which is what makes a rebuild equal to the live ledger."""
    inner = [f"arg_max({expr}, seq) AS {name}" for name, expr in latest.items()]
    outer = list(latest)
    update = [f"{name} = coalesce(excluded.{name}, {table}.{name})" for name in latest]
    for i, group in enumerate(groups):
        fields = ", ".join(f"'{name}': {expr}" for name, expr in group.columns.items())
        inner.append(f"arg_max({{{fields}}}, seq) FILTER ({group.when}) AS _g{i}")
        outer += [f"_g{i}.{name} AS {name}" for name in group.columns]
        marker = next(iter(group.columns))
        update += [f"{name} = CASE WHEN excluded.{marker} IS NULL THEN {table}.{name} "
                   f"ELSE excluded.{name} END" for name in group.columns]
    return Fold(table, types, (
        f"INSERT INTO {table} BY NAME SELECT {key}, {', '.join(outer)} "
        f"FROM (SELECT {key}, {', '.join(inner)} FROM {source} GROUP BY ALL) "
        f"ON CONFLICT ({key}) DO UPDATE SET {', '.join(update)}"))


_GOAL_TYPES = _types("goal.")
_GOAL_JSON = (
    '{"goal":{"brief":"VARCHAR","constraints":"VARCHAR[]","budget":"JSON","options":"JSON",'
    '"submitted_at":"TIMESTAMPTZ"},"plan":"JSON",'
    f'"result":{_REF_JSON},"workspace":{_REF_JSON},"usage":{_USAGE_JSON},'
    '"steps_run":"INTEGER","reason":"VARCHAR","simulated":"BOOLEAN","quality":"JSON"}'
)
_STEP_TYPES = _types("step.")
_STEP_JSON = (
    '{"step_id":"VARCHAR","role":"VARCHAR","attempt":"INTEGER","task_id":"VARCHAR","message":"VARCHAR",'
    '"fraction":"DOUBLE","outputs":[{"digest":"VARCHAR"}],"verdict":"VARCHAR","tier":"VARCHAR",'
    f'"error":"VARCHAR","retryable":"BOOLEAN","usage":{_USAGE_JSON},"simulated":"BOOLEAN",'
    '"quality":{"grade":"DOUBLE","source":"VARCHAR","exit_code":"INTEGER","judged":"VARCHAR[]"}}'
)
_APPROVAL_TYPES = frozenset({"approval.requested", "approval.decided"})  # a refusal changes nothing
_APPROVAL_JSON = (
    '{"approval":{"gate":"VARCHAR","kind":"VARCHAR","request":"INTEGER","step_id":"VARCHAR","role":"VARCHAR",'
    '"summary":"VARCHAR","requested_at":"TIMESTAMPTZ","deadline":"TIMESTAMPTZ","on_timeout":"VARCHAR"},'
    '"gate":"VARCHAR","request":"INTEGER","decision":"VARCHAR","by":"VARCHAR","note":"VARCHAR",'
    '"decided_at":"TIMESTAMPTZ","timed_out":"BOOLEAN"}'
)
_NODE_TYPES = _types("node.")
_NODE_JSON = '{"role":"VARCHAR","host":"VARCHAR","pid":"BIGINT","version":"VARCHAR","reason":"VARCHAR"}'

FOLDS: tuple[Fold, ...] = (
    _merge("goals", "goal_id", _GOAL_TYPES, _source(_GOAL_TYPES, _GOAL_JSON), latest={
        "status": "CASE type WHEN 'goal.submitted' THEN 'submitted' WHEN 'goal.planned' THEN 'running' "
                  "ELSE split_part(type, '.', 2) END",
        "updated_at": "ts",
    }, groups=(
        _Group("type = 'goal.submitted'", {
            "submitted_at": "j.goal.submitted_at", "brief": "j.goal.brief",
            "constraints": "j.goal.constraints", "budget": "j.goal.budget", "options": "j.goal.options"}),
        _Group("type = 'goal.planned'", {
            "planned_at": "ts", "plan": "j.plan",
            "plan_version": "CAST(j.plan->>'$.version' AS INTEGER)",
            "plan_steps": "CAST(json_array_length(j.plan, '$.steps') AS INTEGER)"}),
        _Group("type IN ('goal.completed', 'goal.failed', 'goal.cancelled')", {
            "finished_at": "ts", "result_digest": "j.result.digest", "workspace_digest": "j.workspace.digest",
            "steps_run": "j.steps_run", "reason": "j.reason", **_USAGE, "simulated": "j.simulated",
            "quality": "j.quality", "tests": "j.quality->>'$.tests'"}),
    )),
    _merge("steps", "goal_id, step_id, attempt", _STEP_TYPES,
           f"(SELECT *, j.step_id AS step_id, j.attempt AS attempt FROM {_source(_STEP_TYPES, _STEP_JSON)})",
           latest={
               "role": "j.role",
               "status": "CASE type WHEN 'step.progress' THEN NULL WHEN 'step.dispatched' THEN 'dispatched' "
                         "WHEN 'step.started' THEN 'running' ELSE split_part(type, '.', 2) END",
               "updated_at": "ts",
           }, groups=(
               _Group("type = 'step.dispatched'", {"dispatched_at": "ts", "task_id": "j.task_id"}),
               _Group("type = 'step.started'", {"started_at": "ts"}),
               _Group("type = 'step.progress'", {"progress": "j.message", "progress_fraction": "j.fraction"}),
               _Group("type IN ('step.completed', 'step.failed')", {
                   "finished_at": "ts", "tier": "j.tier", "verdict": "j.verdict",
                   "outputs": "[o.digest FOR o IN j.outputs]", "error": "j.error", "retryable": "j.retryable",
                   **_USAGE, "simulated": "j.simulated", "quality_grade": "j.quality.grade",
                   "quality_source": "j.quality.source", "quality_exit_code": "j.quality.exit_code",
                   "quality_judged": "j.quality.judged"}),
           )),
    _append("artifacts", "artifact.created",
            '{"artifact":{"ref":' + _REF_JSON + ',"kind":"VARCHAR","producer_step":"VARCHAR",'
            '"producer_role":"VARCHAR","parents":"VARCHAR[]","created_at":"TIMESTAMPTZ"}}',
            "j.artifact.ref.digest, j.artifact.ref.name, j.artifact.ref.media_type, j.artifact.ref.size, "
            "j.artifact.kind, j.artifact.producer_step, j.artifact.producer_role, j.artifact.parents, "
            "j.artifact.created_at"),
    _append("route_decisions", "route.decided",
            '{"step_id":"VARCHAR","role":"VARCHAR","decision":{"tier":"VARCHAR","thinking":"BOOLEAN",'
            '"probabilities":"MAP(VARCHAR, DOUBLE)","thinking_probability":"DOUBLE","propensity":"DOUBLE",'
            '"explored":"BOOLEAN","overridden_by":"VARCHAR","model_version":"VARCHAR",'
            '"feature_version":"VARCHAR","features":"DOUBLE[]"},"attempt":"INTEGER"}',
            "j.step_id, j.role, j.decision.tier, j.decision.thinking, j.decision.probabilities, "
            "j.decision.thinking_probability, j.decision.propensity, j.decision.explored, "
            "j.decision.overridden_by, j.decision.model_version, j.decision.feature_version, "
            "j.decision.features, j.attempt"),
    _append("backend_calls", "backend.call",
            '{"step_id":"VARCHAR","tier":"VARCHAR","model":"VARCHAR","endpoint":"VARCHAR",'
            '"usage":' + _USAGE_JSON + ',"latency_ms":"DOUBLE","outcome":"VARCHAR","attempt":"INTEGER",'
            '"thinking":"BOOLEAN","simulated":"BOOLEAN"}',
            "j.step_id, j.tier, j.model, j.endpoint, " + ", ".join(_USAGE.values())
            + ", j.latency_ms, j.outcome, j.attempt, j.thinking, j.simulated"),
    _append("tool_calls", "tool.call",
            '{"step_id":"VARCHAR","role":"VARCHAR","tool":"VARCHAR","arguments":"JSON","ok":"BOOLEAN",'
            '"refused":"BOOLEAN","error":"VARCHAR","duration_ms":"DOUBLE"}',
            "j.step_id, j.role, j.tool, j.arguments, j.ok, j.refused, j.error, j.duration_ms"),
    _merge("approvals", "goal_id, request", _APPROVAL_TYPES,
           f"(SELECT *, coalesce(j.approval.request, j.request) AS request "
           f"FROM {_source(_APPROVAL_TYPES, _APPROVAL_JSON)})",
           latest={"gate": "coalesce(j.approval.gate, j.gate)",
                   "status": "CASE WHEN type = 'approval.requested' THEN 'pending' "
                             "WHEN j.decision = 'approve' THEN 'approved' ELSE 'rejected' END",
                   "updated_at": "ts"},
           groups=(
               _Group("type = 'approval.requested'", {
                   "requested_at": "j.approval.requested_at", "kind": "j.approval.kind",
                   "step_id": "j.approval.step_id", "role": "j.approval.role", "summary": "j.approval.summary",
                   "deadline": "j.approval.deadline", "on_timeout": "j.approval.on_timeout"}),
               _Group("type = 'approval.decided'", {
                   "decided_at": "j.decided_at", "decision": "j.decision", "decided_by": "j.by", "note": "j.note",
                   "timed_out": "j.timed_out"}),
           )),
    _merge("nodes", "node_id", _NODE_TYPES,
           f"(SELECT *, coalesce(node, j.role) AS node_id FROM {_source(_NODE_TYPES, _NODE_JSON)})",
           latest={"role": "j.role", "status": "CASE type WHEN 'node.up' THEN 'up' ELSE 'down' END",
                   "last_seen": "ts"},
           groups=(
               _Group("type = 'node.up'", {"up_at": "ts", "host": "j.host", "pid": "j.pid",
                                           "version": "j.version"}),
               _Group("type = 'node.down'", {"down_at": "ts", "down_reason": "j.reason"}),
           )),
)
