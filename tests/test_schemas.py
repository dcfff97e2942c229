"""schemas/ is generated from the models: a test fails when the checked-in files drift."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from mesh.contracts import Goal, StepCompleted
from mesh.spec import render

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def test_checked_in_schemas_match_the_models() -> None:
    rendered = render()
    on_disk = {p.name for p in SCHEMAS.glob("*.json")}
    assert on_disk == set(rendered), "run `mesh schemas export` and commit schemas/"
    stale = [name for name, text in rendered.items() if (SCHEMAS / name).read_text() != text]
    assert not stale, f"stale schemas (run `mesh schemas export`): {stale}"


def test_asyncapi_lists_every_subject_with_payload_and_operations() -> None:
    doc = json.loads((SCHEMAS / "asyncapi.json").read_text())
    assert doc["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in doc["channels"].values()}
    assert {"mesh.goals", "mesh.task.{role}", "mesh.event.{goal_id}.{role}.{type}", "mesh.dlq.{role}"} <= addresses
    actions = {(op["action"], op["channel"]["$ref"].split("/")[-1]) for op in doc["operations"].values()}
    assert {("send", "goals"), ("receive", "goals"), ("send", "tasks"), ("receive", "tasks"),
            ("send", "events"), ("receive", "events")} <= actions


def test_a_payload_validates_against_its_json_schema() -> None:
    # what a Go or TypeScript client would do with the exported files
    goal_schema = json.loads((SCHEMAS / "goal.schema.json").read_text())
    jsonschema.validate(Goal(brief="b", constraints=["c"]).model_dump(mode="json"), goal_schema)
    event_schema = json.loads((SCHEMAS / "event.schema.json").read_text())
    jsonschema.validate(StepCompleted(goal_id="g", step_id="s", role="coder").model_dump(mode="json"), event_schema)
    bad = {"type": "step.completed", "goal_id": "g"}  # no step_id / role
    try:
        jsonschema.validate(bad, event_schema)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("an incomplete event must not validate")
