"""GoalStore: compare-and-swap on the KV revision, from the remembered entry when it is still the latest."""

from __future__ import annotations

from mesh.bus import Bus
from mesh.contracts import Goal
from mesh.roles.goalstate import GoalState
from mesh.roles.goalstore import GoalStore


def _bump(s: GoalState) -> bool:
    s.replans += 1
    return True


async def test_replicas_writing_one_goal_lose_no_update(bus: Bus) -> None:
    a, b = GoalStore(bus), GoalStore(bus)
    assert await a.create(GoalState(goal=Goal(goal_id="g1", brief="count")))
    await a.mutate("g1", _bump)  # a swaps against the revision it created
    await b.mutate("g1", _bump)  # b has never read it: reads first
    state, _ = await a.mutate("g1", _bump)  # a's remembered revision is stale: refused, re-read, applied
    assert state.replans == 3
    assert (await b.get("g1")).replans == 3  # type: ignore[union-attr]


async def test_nothing_to_do_is_decided_on_the_latest_state(bus: Bus) -> None:
    a, b = GoalStore(bus), GoalStore(bus)
    assert await a.create(GoalState(goal=Goal(goal_id="g2", brief="count")))
    await b.mutate("g2", _bump)
    # on a's stale copy replans is 0, so this change would do nothing; on the latest it applies
    state, changed = await a.mutate("g2", lambda s: s.replans == 1 and _bump(s))
    assert changed and state.replans == 2
    state, changed = await a.mutate("g2", lambda s: s.replans == 0 and _bump(s))
    assert not changed and state.replans == 2
