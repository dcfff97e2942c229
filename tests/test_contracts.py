"""Contracts and codec: every contract round-trips; garbage raises the codec's own error."""

from __future__ import annotations

from datetime import UTC, datetime

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.contracts import (
    Artifact,
    ArtifactCreated,
    ArtifactRef,
    BackendCall,
    Budget,
    DagPosition,
    Goal,
    GoalCompleted,
    GoalFailed,
    GoalPlanned,
    GoalSubmitted,
    NodeUp,
    Plan,
    RouteDecided,
    RouteDecision,
    Step,
    StepCompleted,
    StepProgress,
    StepStarted,
    Task,
    ToolCall,
    Usage,
    decode,
    encode,
    open_envelope,
)
from mesh.contracts.codec import EVENT_HISTORY_MAJORS, SCHEMA_MAJOR, SCHEMA_VERSION
from mesh.errors import CodecError, MessageTooLarge, PlanInvalid, SchemaViolation, UnsupportedVersion

token = st.from_regex(r"\A[A-Za-z0-9_-]{1,20}\Z")
digest = st.from_regex(r"\A[0-9a-f]{64}\Z")
text = st.text(max_size=200)
nonempty = st.text(min_size=1, max_size=200)
when = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))
money = st.floats(min_value=0, max_value=1e6, allow_nan=False)
count = st.integers(min_value=0, max_value=10**9)

usages = st.builds(Usage, prompt_tokens=count, completion_tokens=count, cached_tokens=count,
                   reasoning_tokens=count, cost_usd=money, calls=count)
budgets = st.builds(Budget, max_tokens=st.none() | st.integers(1, 10**9), max_cost_usd=st.none() | money,
                    max_steps=st.none() | st.integers(1, 1000),
                    max_wall_seconds=st.none() | st.floats(0.1, 1e6, allow_nan=False))
json_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text,
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=8)
goals = st.builds(Goal, goal_id=token, brief=nonempty, constraints=st.lists(text, max_size=4), budget=budgets,
                  options=st.dictionaries(text, json_values, max_size=3), submitted_at=when)
refs = st.builds(ArtifactRef, digest=digest, media_type=text, size=count, name=st.text(max_size=50))
steps = st.builds(Step, step_id=token, role=token, instruction=nonempty, depends_on=st.lists(token, max_size=3, unique=True),
                  inputs=st.lists(refs, max_size=2), acceptance=st.lists(text, max_size=2),
                  difficulty=st.floats(0, 1), revision_of=st.none() | token)
plans = st.builds(Plan, goal_id=token, steps=st.lists(steps, min_size=1, max_size=4), version=st.integers(1, 9),
                  rationale=text)
tasks = st.builds(Task, task_id=text, goal_id=token, step=steps, attempt=st.integers(1, 9), brief=text,
                  constraints=st.lists(text, max_size=3), inputs=st.lists(refs, max_size=2), memory=text,
                  position=st.builds(DagPosition, depth=st.integers(0, 50), fan_out=st.integers(0, 50),
                                     dependents=st.integers(0, 50), total_steps=st.integers(0, 200)),
                  remaining=budgets, prior_failures=st.integers(0, 9), deadline=st.none() | when)
artifacts = st.builds(Artifact, ref=refs, goal_id=token, producer_step=st.none() | token,
                      producer_role=st.none() | token, kind=text, parents=st.lists(digest, max_size=3), created_at=when)
decisions = st.builds(RouteDecision, tier=st.sampled_from(["edge", "long_context", "swarm"]), thinking=st.booleans(),
                      probabilities=st.dictionaries(st.sampled_from(["edge", "long_context", "swarm"]),
                                                    st.floats(0, 1), max_size=3),
                      thinking_probability=st.floats(0, 1), propensity=st.floats(0, 1), explored=st.booleans(),
                      overridden_by=st.none() | text, model_version=text, feature_version=text,
                      features=st.lists(st.floats(-1e6, 1e6, allow_nan=False), max_size=8))
events = st.one_of(
    st.builds(GoalSubmitted, goal_id=token, goal=goals, at=when),
    st.builds(GoalPlanned, goal_id=token, plan=plans, at=when),
    st.builds(GoalCompleted, goal_id=token, result=refs, usage=usages, at=when),
    st.builds(GoalFailed, goal_id=token, reason=text, usage=usages, at=when),
    st.builds(StepCompleted, goal_id=token, step_id=token, role=token, outputs=st.lists(refs, max_size=2),
              usage=usages, verdict=st.none() | st.sampled_from(["approve", "changes_requested"]), at=when),
    st.builds(StepProgress, goal_id=token, step_id=token, role=token, message=text,
              detail=st.dictionaries(text, json_values, max_size=3), at=when),
    st.builds(RouteDecided, goal_id=token, step_id=token, role=token, decision=decisions, at=when),
    st.builds(BackendCall, goal_id=token, tier=text, model=text, usage=usages, latency_ms=money, at=when),
    st.builds(ToolCall, goal_id=token, tool=text, arguments=st.dictionaries(text, json_values, max_size=3),
              ok=st.booleans(), error=st.none() | text, at=when),
    st.builds(ArtifactCreated, goal_id=token, artifact=artifacts, at=when),
    st.builds(NodeUp, goal_id=token, role=token, host=text, pid=st.integers(0, 2**31), at=when),
)
contracts = st.one_of(goals, plans, steps, tasks, artifacts, refs, decisions, usages, events)


@settings(max_examples=300, deadline=None)
@given(contracts)
def test_every_contract_round_trips(message: object) -> None:
    data = encode(message)  # type: ignore[arg-type]
    assert decode(data, type(message)) == message


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_raise_codec_error(data: bytes) -> None:
    try:
        open_envelope(data).message()
    except (CodecError, SchemaViolation):
        pass


@settings(max_examples=200, deadline=None)
@given(contracts, st.data())
def test_truncated_messages_raise_codec_error(message: object, data: st.DataObject) -> None:
    raw = encode(message)  # type: ignore[arg-type]
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(CodecError):
        open_envelope(raw[:cut])


def _envelope(**overrides: object) -> bytes:
    doc = msgpack.unpackb(encode(Goal(brief="b")))
    doc.update(overrides)
    return msgpack.packb(doc)


def test_newer_minor_version_with_extra_fields_is_tolerated() -> None:
    doc = msgpack.unpackb(encode(Goal(goal_id="g1", brief="b")))
    doc["v"] = f"{SCHEMA_MAJOR}.7"
    doc["future_envelope_field"] = True
    doc["body"]["future_body_field"] = {"x": 1}
    goal = decode(msgpack.packb(doc), Goal)
    assert goal.goal_id == "g1" and goal.brief == "b"


def test_unknown_major_version_is_rejected_clearly() -> None:
    with pytest.raises(UnsupportedVersion, match=r"unsupported schema version '3\.0'.*major version 2"):
        decode(_envelope(v="3.0"))


def test_schema_1_is_read_only_where_the_event_history_is_read() -> None:
    """Schema 2 changed subjects, not bodies: a schema-1 event decodes for the history's readers (ledger,
    watch) and is refused by every other consumer."""
    old = _envelope(v="1.2", kind="event", body=StepStarted(goal_id="g1", step_id="s1", role="coder").model_dump(
        mode="json"))
    with pytest.raises(UnsupportedVersion, match="'1.2'"):
        open_envelope(old)
    event = open_envelope(old, majors=EVENT_HISTORY_MAJORS).message()
    assert isinstance(event, StepStarted) and event.role == "coder"


@pytest.mark.parametrize("overrides,match", [
    ({"v": None}, "no schema version"),
    ({"v": "x.y"}, "malformed schema version"),
    ({"kind": 5}, "lacks 'kind'"),
    ({"body": [1, 2]}, "'body' must be a map"),
    ({"body": None}, "neither 'body' nor 'claim'"),
    ({"ts": "yesterday"}, "RFC 3339"),
])
def test_malformed_envelopes_name_the_problem(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(CodecError, match=match):
        open_envelope(_envelope(**overrides))


def test_schema_invalid_body_is_a_schema_violation() -> None:
    doc = msgpack.unpackb(encode(Goal(brief="b")))
    doc["body"]["brief"] = ""
    with pytest.raises(SchemaViolation, match="brief"):
        decode(msgpack.packb(doc))


def test_unknown_kind_and_wrong_expectation() -> None:
    with pytest.raises(SchemaViolation, match="unknown message kind"):
        decode(_envelope(kind="banana"))
    with pytest.raises(SchemaViolation, match="expected Task"):
        decode(encode(Goal(brief="b")), Task)


def test_size_limit_on_encode_and_decode() -> None:
    big = Goal(brief="x" * 10_000)
    with pytest.raises(MessageTooLarge):
        encode(big, max_bytes=1000)
    with pytest.raises(MessageTooLarge):
        open_envelope(encode(big), max_bytes=1000)


def test_envelope_carries_version_goal_and_trace() -> None:
    goal = Goal(goal_id="g7", brief="b")
    env = open_envelope(encode(goal, trace={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}))
    assert env.version == SCHEMA_VERSION and env.goal_id == "g7" and env.kind == "goal"
    assert env.trace["traceparent"].startswith("00-aaaa")


def _step(sid: str, role: str = "coder", deps: list[str] | None = None) -> Step:
    return Step(step_id=sid, role=role, instruction="do", depends_on=deps or [])


def test_plan_layers_and_errors() -> None:
    plan = Plan(goal_id="g", steps=[_step("a", "researcher"), _step("b", "researcher"), _step("c", deps=["a", "b"])])
    assert plan.check({"researcher", "coder"}) == [["a", "b"], ["c"]]
    with pytest.raises(PlanInvalid, match="cycle among steps: a, b"):
        Plan(goal_id="g", steps=[_step("a", deps=["b"]), _step("b", deps=["a"])]).check({"coder"})
    with pytest.raises(PlanInvalid, match="unknown role 'wizard'"):
        Plan(goal_id="g", steps=[_step("a", "wizard")]).check({"coder"})
    with pytest.raises(PlanInvalid, match="unknown steps: zz"):
        Plan(goal_id="g", steps=[_step("a", deps=["zz"])]).check({"coder"})
    with pytest.raises(PlanInvalid, match="duplicate step ids: a"):
        Plan(goal_id="g", steps=[_step("a"), _step("a")]).check({"coder"})
    with pytest.raises(PlanInvalid, match="limit is 1"):
        Plan(goal_id="g", steps=[_step("a"), _step("b")]).check({"coder"}, max_steps=1)
