"""The goal-options registry: every option has a type, bounds and a reader; a misspelt or
out-of-range option is refused at the door and by the planner, never silently clamped or ignored."""

from __future__ import annotations

import pytest

from mesh.bus import Bus
from mesh.config import MeshSettings
from mesh.contracts import Goal, GoalFailed, GoalPlanned
from mesh.contracts.options import OPTIONS, parse_option, validate_options
from mesh.errors import OptionInvalid
from tests.meshkit import in_process_mesh, run_goal


def test_every_option_says_what_it_is_and_who_reads_it() -> None:
    for option in OPTIONS.values():
        assert option.doc and option.reader and option.type in ("int", "float", "bool", "str")


def test_command_line_values_are_read_as_the_options_type() -> None:
    assert parse_option("sim_plan_steps=200") == ("sim_plan_steps", 200)
    assert parse_option("sim_quality=1") == ("sim_quality", 1.0)
    assert parse_option("sim_review=approve") == ("sim_review", "approve")


@pytest.mark.parametrize(("item", "message"), [
    ("sim_plan_steps=201", "goal option 'sim_plan_steps' takes an int from 8 to 200; got 201"),
    ("sim_plan_steps=4", "goal option 'sim_plan_steps' takes an int from 8 to 200; got 4"),
    ("sim_plan_steps=lots", "goal option 'sim_plan_steps' takes an int from 8 to 200; got 'lots'"),
    ("sim_plan_steps=12.5", "got 12.5"),
    ("sim_review=maybe", "goal option 'sim_review' takes one of first_changes, approve, changes; got 'maybe'"),
    ("sim_plan_step=24", "unknown goal option 'sim_plan_step'; known options: "),
    ("sim_plan_steps", "is not KEY=VALUE"),
])
def test_bad_options_are_refused_with_a_clear_error(item: str, message: str) -> None:
    with pytest.raises(OptionInvalid) as info:
        parse_option(item)
    assert message in str(info.value)


def test_validate_checks_every_option_of_a_goal() -> None:
    assert validate_options({"sim_plan_steps": 24, "sim_tests": "fail_first"}) == {"sim_plan_steps": 24,
                                                                                   "sim_tests": "fail_first"}
    with pytest.raises(OptionInvalid, match="sim_quality"):
        validate_options({"sim_plan_steps": 24, "sim_quality": 1.5})
    with pytest.raises(OptionInvalid, match="got True"):
        validate_options({"sim_plan_steps": True})  # a bool is not an int here


async def test_the_planner_fails_a_goal_whose_options_are_invalid(fast: MeshSettings, bus: Bus) -> None:
    goal = Goal(brief="Build me a login system", options={"sim_plan_steps": 500})
    async with in_process_mesh(fast, {"planner": 1}):
        events = await run_goal(bus, goal, timeout=60)
    assert isinstance(events[-1], GoalFailed)
    assert "goal option 'sim_plan_steps' takes an int from 8 to 200; got 500" in events[-1].reason
    assert not any(isinstance(e, GoalPlanned) for e in events)
