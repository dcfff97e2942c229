"""Goal state in KV ``mesh_goals``, changed only by compare-and-swap on the entry's revision.

A store remembers the latest entry it read or wrote per goal, so a replica that keeps writing the
same goal (the planner, one outcome after another) swaps against that revision without reading
first. The remembered copy is only trusted for a write: the CAS refuses it when anyone wrote since,
and a change that finds nothing to do on it is decided again on a fresh read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue

from mesh.errors import BusError
from mesh.roles.goalstate import GoalProgressView, GoalState

T = TypeVar("T")
MAX_CAS_ATTEMPTS = 50
REMEMBERED_GOALS = 1024


class GoalStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self._latest: dict[str, tuple[int, bytes]] = {}  # goal id → (revision, value), oldest first

    async def get(self, goal_id: str) -> GoalState | None:
        try:
            _, value = await self._read(goal_id)
        except KeyNotFoundError:
            return None
        return GoalState.model_validate_json(value) if value else None

    async def progress(self, goal_id: str) -> GoalProgressView | None:
        """The goal's status and its steps' status and attempt, without parsing the rest (see the view)."""
        try:
            _, value = await self._read(goal_id)
        except KeyNotFoundError:
            return None
        return GoalProgressView.model_validate_json(value) if value else None

    async def create(self, state: GoalState) -> bool:
        """Store a new goal; False when another replica created it first."""
        value = state.model_dump_json().encode()
        try:
            revision = await self.kv.create(state.goal.goal_id, value)
        except KeyWrongLastSequenceError:
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
            revision, value = entry or await self._read(goal_id)
            state = GoalState.model_validate_json(value)
            outcome = change(state)
            if outcome is None or outcome == [] or outcome is False:
                if remembered:  # maybe stale: only the latest state may say there is nothing to do
                    entry = None
                    continue
                return state, outcome
            value = state.model_dump_json().encode()
            try:
                revision = await self.kv.update(goal_id, value, last=revision)
            except KeyWrongLastSequenceError:
                entry = None
                continue
            self._remember(goal_id, revision, value)
            return state, outcome
        raise BusError(f"goal {goal_id}: {MAX_CAS_ATTEMPTS} compare-and-swap attempts lost to other writers")

    async def keys(self) -> list[str]:
        try:
            return list(await self.kv.keys())
        except NoKeysError:
            return []

    async def _read(self, goal_id: str) -> tuple[int, bytes]:
        entry = await self.kv.get(goal_id)
        assert entry.revision is not None
        self._remember(goal_id, entry.revision, entry.value or b"")
        return entry.revision, entry.value or b""

    def _remember(self, goal_id: str, revision: int, value: bytes) -> None:
        self._latest.pop(goal_id, None)
        self._latest[goal_id] = (revision, value)
        if len(self._latest) > REMEMBERED_GOALS:
            del self._latest[next(iter(self._latest))]
