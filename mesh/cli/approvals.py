"""`mesh approvals | approve | reject`: the inbox of approval gates and a person's decisions on them
(docs/APPROVALS.md), and the terminal prompt `mesh run` shows at a gate."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, TextIO

from mesh.cli.local import _client, _run_async, who
from mesh.errors import ApprovalNotPending, MeshError

if TYPE_CHECKING:
    from mesh.client import MeshClient
    from mesh.contracts import ApprovalRequested, Decision

DECISION_WAIT_SECONDS = 30.0  # how long `mesh approve/reject` waits for the planner to apply the decision


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("approvals", help="the approval gates waiting for a person, across goals")
    p.add_argument("goal", nargs="?", help="only this goal's")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=lambda a: _run_async(_approvals(a)))

    for action, verb in (("approve", "approve"), ("reject", "reject")):
        p = sub.add_parser(action, help=f"{verb} a goal's pending gate (plan, final, <step>.before/.after)")
        p.add_argument("goal")
        p.add_argument("gate", nargs="?", help="the gate (default: the goal's only pending one)")
        p.add_argument("--note", default="", required=action == "reject",
                       help="a note for the record" + ("; a rejection's note is the feedback the planner or the "
                                                      "revision gets" if action == "reject" else ""))
        p.set_defaults(handler=lambda a, action=action: _run_async(_decide(a, action)))


async def _approvals(a: argparse.Namespace) -> int:
    from mesh.cli.progress import dump_json

    async with _client() as client:
        inbox = await client.approvals(a.goal)
    if a.json:
        print(dump_json([p.model_dump(mode="json") for p in inbox]))
        return 0
    if not inbox:
        print("no gate is waiting for approval")
        return 0
    for p in inbox:
        ap = p.approval
        deadline = ap.deadline.isoformat(timespec="seconds") if ap.deadline else "-"
        print(f"{p.goal_id}  {ap.gate:<24} {ap.kind:<7} until {deadline} (then {ap.on_timeout})  {p.brief[:50]}")
        print(f"    {ap.summary.splitlines()[0] if ap.summary else ''}")
    return 0


async def _decide(a: argparse.Namespace, decision: Decision) -> int:
    async with _client() as client:
        decided = await client.decide(a.goal, a.gate, decision, by=who(f"mesh {decision}"), note=a.note,
                                      wait=DECISION_WAIT_SECONDS)
    if decided is None:
        print(f"{decision} sent; the planner has not applied it within {DECISION_WAIT_SECONDS:.0f}s "
              "(it will when it is back)")
    else:
        print(f"gate {decided.gate} of goal {a.goal}: {'approved' if decision == 'approve' else 'rejected'}")
    return 0


async def read_line(prompt: str, out: TextIO = sys.stdout) -> str:
    """A line typed on stdin, read without blocking the loop (and cancellable, unlike a thread's input())."""
    loop = asyncio.get_running_loop()
    line: asyncio.Future[str] = loop.create_future()

    def ready() -> None:
        if not line.done():
            line.set_result(sys.stdin.readline())

    out.write(prompt)
    out.flush()
    loop.add_reader(sys.stdin.fileno(), ready)
    try:
        return await line
    finally:
        loop.remove_reader(sys.stdin.fileno())


async def answer_gate(client: MeshClient, request: ApprovalRequested, out: TextIO, *, ask: bool) -> None:
    """At a gate of `mesh run`: ask in the terminal (``ask``: stdin is one), else say which command decides."""
    from mesh.client import parse_decision

    ap, gid = request.approval, request.goal_id
    print(f"\n⏸  goal {gid} waits for approval at gate {ap.gate} ({ap.kind}):\n{ap.summary}", file=out, flush=True)
    if not ask:
        print(f"   decide with: mesh approve {gid} {ap.gate}   or   mesh reject {gid} {ap.gate} --note '…'",
              file=out, flush=True)
        return
    while True:
        answer = parse_decision(await read_line("   approve, or reject: <note>? ", out))
        if answer is None:
            print("   type 'approve' (or 'a'), or 'reject: <note>' (or 'r <note>')", file=out, flush=True)
            continue
        try:
            await client.decide(gid, ap.gate, answer[0], by=who("mesh run"), note=answer[1],
                                wait=DECISION_WAIT_SECONDS)
        except ApprovalNotPending as exc:  # decided elsewhere meanwhile (another client, its deadline)
            print(f"   {exc}", file=out, flush=True)
        except MeshError as exc:
            print(f"   could not send the decision: {exc}", file=out, flush=True)
        return
