"""Goal state in KV ``mesh_goals``, changed only by compare-and-swap on the entry's revision."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue

from mesh.errors import BusError
from mesh.roles.goalstate import GoalState

T = TypeVar("T")
MAX_CAS_ATTEMPTS = 50


class GoalStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, goal_id: str) -> GoalState | None:
        try:
            entry = await self.kv.get(goal_id)
        except KeyNotFoundError:
            return None
        return GoalState.model_validate_json(entry.value) if entry.value else None

    async def create(self, state: GoalState) -> bool:
        """Store a new goal; False when another replica created it first."""
        try:
            await self.kv.create(state.goal.goal_id, state.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            return False
        return True

    async def mutate(self, goal_id: str, change: Callable[[GoalState], T]) -> tuple[GoalState, T]:
        """Apply ``change`` to the latest state and write it back only if nobody wrote in between.

        ``change`` runs again on the fresh state after a lost race, so it must be a pure transition
        of the state it is given. Its return value (e.g. which steps it dispatched) is returned with
        the state that was stored; a ``None``-returning no-op change writes nothing.
        """
        for _ in range(MAX_CAS_ATTEMPTS):
            entry = await self.kv.get(goal_id)
            state = GoalState.model_validate_json(entry.value or b"")
            outcome = change(state)
            if outcome is None or outcome == [] or outcome is False:
                return state, outcome
            try:
                await self.kv.update(goal_id, state.model_dump_json().encode(), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue
            return state, outcome
        raise BusError(f"goal {goal_id}: {MAX_CAS_ATTEMPTS} compare-and-swap attempts lost to other writers")

    async def keys(self) -> list[str]:
        try:
            return list(await self.kv.keys())
        except NoKeysError:
            return []
