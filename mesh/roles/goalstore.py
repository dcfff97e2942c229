"""Goal state in KV ``mesh_goals``, changed only by compare-and-swap on the entry's revision.

A store remembers the latest entry it read or wrote per goal, so a replica that keeps writing the
same goal (the planner, one outcome after another) swaps against that revision without reading
first. The remembered copy is only trusted for a write: the CAS refuses it when anyone wrote since,
and a change that finds nothing to do on it is decided again on a fresh read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from mesh.bus.client import Bus
from mesh.errors import BusError, GoalNotFound
from mesh.roles.goalstate import GoalProgressView, GoalState

T = TypeVar("T")
MAX_CAS_ATTEMPTS = 50
REMEMBERED_GOALS = 1024


class GoalStore:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.bucket = bus.topology.kv_goals
        self._latest: dict[str, tuple[int, bytes]] = {}  # goal id → (revision, value), oldest first

    async def get(self, goal_id: str) -> GoalState | None:
        entry = await self._read(goal_id)
        return GoalState.model_validate_json(entry[1]) if entry is not None and entry[1] else None

    async def progress(self, goal_id: str, *, direct: bool = False) -> GoalProgressView | None:
        """The goal's status and its steps' status and attempt, without parsing the rest (see the view).
        ``direct``: by a direct get, cheaper, which any replica may answer a write behind — for a check
        that confirms on the leader (``direct=False``) whatever it would act on from a stale answer."""
        if not direct:
            entry = await self._read(goal_id)
            return GoalProgressView.model_validate_json(entry[1]) if entry is not None and entry[1] else None
        read = await self.bus.kv_get(self.bucket, goal_id, direct=True)  # not remembered: not for writes
        return GoalProgressView.model_validate_json(read.value) if read is not None and read.value else None

    async def create(self, state: GoalState) -> bool:
        """Store a new goal; False when another replica created it first."""
        value = state.model_dump_json().encode()
        revision = await self.bus.kv_create(self.bucket, state.goal.goal_id, value)
        if revision is None:
            return False
        self._remember(state.goal.goal_id, revision, value)
        return True

    async def mutate(self, goal_id: str, change: Callable[[GoalState], T]) -> tuple[GoalState, T]:
        """Apply ``change`` to the latest state and write it back only if nobody wrote in between.

        ``change`` runs again on the fresh state after a lost race, so it must be a pure transition
        of the state it is given. Its return value (e.g. which steps it dispatched) is returned with
        the state that was stored; a ``None``-returning no-op change writes nothing.
        """
        entry = self._latest.get(goal_id)
        for _ in range(MAX_CAS_ATTEMPTS):
            remembered = entry is not None
            entry = entry or await self._read(goal_id)
            if entry is None:
                raise GoalNotFound(f"goal {goal_id} is not in {self.bucket}")
            revision, value = entry
            state = GoalState.model_validate_json(value)
            outcome = change(state)
            if outcome is None or outcome == [] or outcome is False:
                if remembered:  # maybe stale: only the latest state may say there is nothing to do
                    entry = None
                    continue
                return state, outcome
            value = state.model_dump_json().encode()
            swapped = await self.bus.kv_swap(self.bucket, goal_id, value, revision=revision)
            if swapped is None:  # someone wrote since
                entry = None
                continue
            self._remember(goal_id, swapped, value)
            return state, outcome
        raise BusError(f"goal {goal_id}: {MAX_CAS_ATTEMPTS} compare-and-swap attempts lost to other writers")

    async def keys(self) -> list[str]:
        return await self.bus.kv_keys(self.bucket)

    async def all(self) -> list[GoalState]:
        """Every goal's state, read concurrently (a listing: not remembered for writes)."""
        return [GoalState.model_validate_json(e.value) for e in await self.bus.kv_entries(self.bucket) if e.value]

    async def _read(self, goal_id: str) -> tuple[int, bytes] | None:
        entry = await self.bus.kv_get(self.bucket, goal_id)
        if entry is None:
            return None
        self._remember(goal_id, entry.revision, entry.value)
        return entry.revision, entry.value

    def _remember(self, goal_id: str, revision: int, value: bytes) -> None:
        self._latest.pop(goal_id, None)
        self._latest[goal_id] = (revision, value)
        if len(self._latest) > REMEMBERED_GOALS:
            del self._latest[next(iter(self._latest))]
