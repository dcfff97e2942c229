"""Approval gates survive any crash (docs/APPROVALS.md): every node — planner, workers, ledger — is killed
-9 while a gate is pending and started again; the gate is still pending, approving it resumes the goal,
no step runs twice, and the ledger's approvals table has every request and decision."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mesh.bus import Bus
from mesh.client import MeshClient
from mesh.config import MeshSettings
from mesh.contracts import ApprovalDecided, ApprovalRequested, Goal, GoalCompleted, StepStarted
from mesh.roles.ledger_service import LedgerClient
from tests.ledgerkit import Eventually, caught_up
from tests.meshkit import TERMINAL, EventLog, node_env, role_specs
from tests.reliability.kit import Fleet, check_applied_once, stream_events

pytestmark = pytest.mark.timeout(300)


async def test_kill_9_of_every_node_at_a_pending_gate_keeps_it_and_approval_resumes_the_goal(
        bus: Bus, settings: MeshSettings, eventually: Eventually, tmp_path: Path) -> None:
    roles = list(role_specs(with_ledger=True))
    fleet = Fleet(roles, node_env(settings, MESH_DRAIN_SECONDS="2"), tmp_path / "logs").start()
    client = MeshClient(bus)
    goal = Goal(brief="Build me a login system", options={"approve": "plan,final", "sim_review": "approve"})
    gid = goal.goal_id
    log = EventLog(client, gid)
    try:
        async with asyncio.TaskGroup() as tg:
            follower = tg.create_task(log.follow())
            await client.submit(goal)
            for gate in ("plan", "final"):
                request = await log.wait(lambda e, g=gate: isinstance(e, ApprovalRequested) and e.approval.gate == g,
                                         timeout=120)
                await fleet.kill9_all()
                await fleet.started()
                state = await client.goal(gid)
                assert state is not None and state.status == "awaiting_approval"
                assert [a.gate for a in state.pending_approvals()] == [gate], "the gate survived the crash"
                assert [p.approval.gate for p in await client.approvals()] == [gate]
                decided = await client.approve(gid, gate, by="alice", wait=60)
                assert isinstance(decided, ApprovalDecided), f"not applied after the restart:\n{fleet.logs()}"
                assert decided.request == request.approval.request  # type: ignore[attr-defined]
            end = await log.wait(lambda e: isinstance(e, TERMINAL), timeout=120)
            follower.cancel()
        assert isinstance(end, GoalCompleted), end
        final_request = next(e for e in log.of(ApprovalRequested) if e.approval.gate == "final")
        assert not [e for e in log.of(StepStarted) if log.seq(e) > log.seq(final_request)], \
            "no step ran again after the final gate opened"
        check_applied_once(await stream_events(bus), [gid])

        # the ledger (killed twice too) has both requests and their decisions
        ledger = LedgerClient(bus, timeout=10)
        await caught_up(eventually, ledger, bus, timeout=60)
        rows = (await ledger.sql(f"SELECT gate, kind, status, decided_by FROM approvals WHERE goal_id = '{gid}' "
                                 "ORDER BY request")).rows
        assert [tuple(r) for r in rows] == [("plan", "plan", "approved", "alice"), ("final", "final", "approved", "alice")]
    finally:
        fleet.stop()
