"""The dashboard's routes: page shells at ``/`` and ``/ui/…`` and the HTML fragments they load from
``/v1/ui/…``.

A shell carries no data, so it is served without a token (like the static assets); everything with data
is a fragment under ``/v1/``, behind the gateway's usual authentication — the page's script sends the
token a person typed into the login form (kept in ``sessionStorage``) as ``Authorization: Bearer``,
and reads the event streams with ``fetch`` for the same reason (``EventSource`` cannot send headers).
Every fragment is rendered on the server; the script only swaps them in when an event says something
changed, and appends the timeline's rows.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markdown_it import MarkdownIt
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mesh.contracts import ArtifactRef
from mesh.errors import LedgerError, RequestRefused
from mesh.gateway.dashboard import dag, ops, views
from mesh.gateway.goals import Desk
from mesh.roles.goalstate import GoalState
from mesh.tools.manifest import MANIFEST_MEDIA_TYPE

STATIC = Path(str(files("mesh.gateway.dashboard") / "static"))
PAGES = {"goals": "Goals", "approvals": "Approvals", "mesh": "Mesh", "router": "Router"}
# What re-renders an operator page: event type prefixes on `GET /v1/events`, and a poll (ms; 0 = none).
TRIGGERS = {"approvals": "approval. goal.", "mesh": "node. step. goal.", "router": "step.completed step.failed"}
POLLS = {"approvals": 5_000, "mesh": 2_000, "router": 10_000}  # router: the ledger ingests a moment after an event


@cache
def _templates() -> Environment:
    env = Environment(loader=PackageLoader("mesh.gateway.dashboard", "templates"),
                      autoescape=select_autoescape(default=True), trim_blocks=True, lstrip_blocks=True)
    env.filters["short"] = lambda text, n=80: text if len(text) <= n else text[:n - 1] + "…"
    env.globals["WORKSPACE"] = MANIFEST_MEDIA_TYPE
    return env


@cache
def _markdown() -> MarkdownIt:
    return MarkdownIt("commonmark", {"html": False}).enable("table")  # raw HTML in a synthesis stays text


def render(name: str, **context: Any) -> HTMLResponse:
    return HTMLResponse(_templates().get_template(name).render(**context),
                        headers={"Cache-Control": "no-store"})


def desk(request: Request) -> Desk:
    d: Desk = request.app.state.desk
    return d


# --- shells (no data, no token needed) --------------------------------------------------------------


def _shell(page: str, **context: Any) -> HTMLResponse:
    return render("shell.html", page=page, pages=PAGES, triggers=TRIGGERS, polls=POLLS, **context)


async def goals_page(request: Request) -> Response:
    return _shell("goals", status=request.query_params.get("status", ""), statuses=views.STATUSES)


async def goal_page(request: Request) -> Response:
    return _shell("goal", goal_id=request.path_params["goal_id"])


async def other_page(request: Request) -> Response:
    page = request.url.path.removeprefix("/ui/")
    return _shell(page)


# --- fragments (authenticated like the rest of /v1) -------------------------------------------------


async def goals_fragment(request: Request) -> Response:
    status = request.query_params.get("status") or None
    if status is not None and status not in views.STATUSES:
        raise RequestRefused(f"status must be one of {', '.join(views.STATUSES)}, not {status!r}", param="status")
    rows = views.goal_rows(await desk(request).client.goals(), status)
    return render("goals.html", rows=rows, status=status or "")


async def goal_fragment(request: Request) -> Response:
    goal_id = request.path_params["goal_id"]
    client = desk(request).client
    state = await client.goal(goal_id)
    if state is None:  # submitted a moment ago, or never: the page waits for the planner either way
        return render("goal.html", goal_id=goal_id, state=None)
    synthesis = None
    if state.result is not None:
        text = (await client.blob(state.result)).decode(errors="replace")
        synthesis = Markup(_markdown().render(text))
    selected = request.query_params.get("step") or None
    return render("goal.html", goal_id=goal_id, state=state, svg=Markup(dag.render(state.steps, selected=selected)),
                  steps=views.step_rows(state), loop=views.review_loop(state), outputs=views.outputs(state),
                  revisions=views.workspace_revisions(state), quality=state.quality() if state.done else None,
                  cost=views.money(state.usage.cost_usd, state.simulated), tiers=views.tier_mix(state),
                  age=views.duration(state.started_at, state.finished_at), synthesis=synthesis,
                  pending=[] if state.done else state.pending_approvals())


async def step_fragment(request: Request) -> Response:
    goal_id, step_id = request.path_params["goal_id"], request.path_params["step_id"]
    client = desk(request).client
    state = await desk(request).state(goal_id)
    st = state.steps.get(step_id)
    if st is None:
        raise RequestRefused(f"goal {goal_id!r} has no step {step_id!r}", status=404, type="not_found_error",
                             code="unknown_step")
    tried = views.attempts(step_id, await client.history(goal_id))
    return render("step.html", goal_id=goal_id, st=st, attempts=tried,
                  cost=views.money(st.usage.cost_usd, st.simulated),
                  took=views.duration(st.dispatched_at, st.finished_at) if st.attempt else "")


async def files_fragment(request: Request) -> Response:
    """The workspace at one revision (a step's manifest): its files, one file's text, or the diff against
    another revision (all files, or the chosen one)."""
    goal_id = request.path_params["goal_id"]
    client, q = desk(request).client, request.query_params
    state = await desk(request).state(goal_id)
    revisions = views.workspace_revisions(state)
    if not revisions:
        return render("files.html", goal_id=goal_id, revisions=[], rev=None)
    rev = _revision(state, q.get("rev") or revisions[-1][1].digest)
    against = _revision(state, q["against"]) if q.get("against") else None
    path = q.get("path") or None
    tree = await client.workspace(rev)
    text = diff = None
    if against is not None:
        diff = views.diff(await client.workspace(against), tree, path)
    elif path is not None:
        data = tree.get(path)
        if data is None:
            raise RequestRefused(f"no file {path!r} in that revision", status=404, type="not_found_error",
                                 code="no_file")
        text = data.decode(errors="replace") if views.is_text(data) else f"(binary, {len(data)} bytes)"
    return render("files.html", goal_id=goal_id, revisions=revisions, rev=rev, against=against, path=path,
                  tree=sorted((p, len(d)) for p, d in tree.items()), text=text, diff=diff)


def _revision(state: GoalState, digest: str) -> ArtifactRef:
    ref = views.owned_ref(state, digest)
    if ref is None:
        raise RequestRefused(f"goal {state.goal.goal_id!r} has no artifact {digest!r}", status=404,
                             type="not_found_error", code="no_artifact")
    return ref


async def blob_fragment(request: Request) -> Response:
    """One of the goal's text artifacts (a step's notes, a review, a test report), as text."""
    goal_id = request.path_params["goal_id"]
    state = await desk(request).state(goal_id)
    ref = _revision(state, request.path_params["digest"])
    data = await desk(request).client.blob(ref)
    text = data.decode(errors="replace") if views.is_text(data) else f"(binary, {len(data)} bytes)"
    return render("blob.html", ref=ref, text=text)


async def approvals_fragment(request: Request) -> Response:
    """The inbox: every pending gate of every running goal, oldest first, each with its decision form (which
    posts to the Mesh API's ``POST /v1/goals/{id}/approvals/{gate}``)."""
    return render("approvals.html", pending=await desk(request).client.approvals())


async def mesh_fragment(request: Request) -> Response:
    client = desk(request).client
    nodes, backlog, dead = await client.nodes(), await client.backlog(), await client.dead_letters()
    return render("mesh.html", **ops.mesh_view(nodes, backlog, dead))


async def router_fragment(request: Request) -> Response:
    ledger = desk(request).client.ledger()
    try:
        tiers = await ledger.sql(ops.TIER_SQL)
        times = await ledger.sql(ops.TIME_SQL, max_rows=ops.MAX_TIME_ROWS)
    except LedgerError as exc:  # no ledger node, or it refused: the page says so instead of failing
        return render("router.html", error=f"The ledger did not answer: {exc}")
    return render("router.html", **ops.router_view(tiers.rows, times.rows))


ROUTES = [
    Route("/", goals_page, methods=["GET"]),
    Route("/ui/goals/{goal_id}", goal_page, methods=["GET"]),
    *(Route(f"/ui/{page}", other_page, methods=["GET"]) for page in PAGES if page != "goals"),
    Mount("/ui/static", StaticFiles(directory=STATIC), name="dashboard-static"),
    Route("/v1/ui/goals", goals_fragment, methods=["GET"]),
    Route("/v1/ui/goals/{goal_id}", goal_fragment, methods=["GET"]),
    Route("/v1/ui/goals/{goal_id}/steps/{step_id}", step_fragment, methods=["GET"]),
    Route("/v1/ui/goals/{goal_id}/files", files_fragment, methods=["GET"]),
    Route("/v1/ui/goals/{goal_id}/blobs/{digest}", blob_fragment, methods=["GET"]),
    Route("/v1/ui/approvals", approvals_fragment, methods=["GET"]),
    Route("/v1/ui/mesh", mesh_fragment, methods=["GET"]),
    Route("/v1/ui/router", router_fragment, methods=["GET"]),
]
