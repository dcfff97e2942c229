"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright's Python API — no
browser is downloaded) against a real local mesh on the sim behind a gateway with tokens.

It signs in with the login form, opens a goal's page before the goal exists, submits the goal through the
gateway and watches, without a reload, the plan's graph gain every step; approves the plan with the
inbox's button and sees the goal move on; reads a step's routing decision and cost; and sees the goal
complete. Screenshots go to a temporary folder, or to ``MESH_SCREENSHOTS`` (`make screenshots` points it
at docs/img/).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from itertools import pairwise
from pathlib import Path

import httpx
import pytest

from mesh.client import MeshClient
from mesh.config import MeshSettings
from mesh.gateway.app import running
from mesh.gateway.dashboard.views import money
from mesh.gateway.goals import idempotent_goal_id
from tests.gatewaykit import tokens_file
from tests.meshkit import fast, in_process_mesh, role_specs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install "
                                "chromium; .ci/run installs it)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 60_000


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("MESH_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[object]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1400, "height": 1000})
        try:
            yield context
        finally:
            await context.close()


# Records, in the page, every set of step ids the graph has shown, and whether the page was reloaded.
RECORDER = """() => {
  window.__sameDocument = true;
  window.__seen = [];
  const note = () => {
    const ids = [...document.querySelectorAll('#view svg.dag g.step')].map(g => g.dataset.step).sort().join(',');
    if (window.__seen[window.__seen.length - 1] !== ids) window.__seen.push(ids);
  };
  note();
  new MutationObserver(note).observe(document.getElementById('view'), {childList: true, subtree: true});
}"""


async def test_dashboard_follows_a_goal_live(settings: MeshSettings, tmp_path: Path, browser: object,
                                             shots: Path) -> None:
    from playwright.async_api import BrowserContext, expect

    assert isinstance(browser, BrowserContext)
    path, token = tokens_file(tmp_path)
    s = fast(settings, gateway_tokens_file=path, sim_latency_scale=0.02)
    async with MeshClient.connect(s, name="browser-test") as client, \
            in_process_mesh(s, specs=role_specs(with_ledger=True)), running(client, s) as gw, \
            httpx.AsyncClient(base_url=gw.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        page = await browser.new_page()
        # the shell loads without a token; its data asks for one: the login form
        await page.goto(gw.url + "/")
        await expect(page.locator("#login")).to_be_visible()
        await page.fill("#login input[name=token]", token)
        await page.click("#login button[type=submit]")
        await expect(page.locator("#view")).to_contain_text("No goals yet")

        # the goal's page, open before the goal exists (an idempotency key names the goal in advance)
        goal_id = idempotent_goal_id("ci", "browser-1")
        await page.goto(f"{gw.url}/ui/goals/{goal_id}")
        await expect(page.locator("#view")).to_contain_text("Waiting for the planner")
        await page.evaluate(RECORDER)
        r = await http.post("/v1/goals", json={"brief": "Build me a login system", "constraints": ["use bcrypt"],
                                               "options": {"approve": "plan"}},
                            headers={"Idempotency-Key": "browser-1"})
        assert r.status_code == 202 and r.json()["goal_id"] == goal_id
        # the plan waits for a person: on the goal's page, and in the inbox (another tab, signed in there too:
        # the token lives in one tab's sessionStorage)
        await expect(page.locator("#goal-status")).to_have_text("awaiting_approval", timeout=WAIT_MS)
        await expect(page.locator("#view .gates .approval[data-gate='plan']")).to_be_visible()
        inbox = await browser.new_page()
        await inbox.goto(gw.url + "/ui/approvals")
        await inbox.fill("#login input[name=token]", token)
        await inbox.click("#login button[type=submit]")
        gate = inbox.locator(f".approval[data-goal='{goal_id}'][data-gate='plan']")
        await expect(gate).to_contain_text("Build me a login system")
        await gate.locator("textarea[name=note]").fill("looks right, go")
        loads = await inbox.evaluate("window.meshDashboard.loads")  # the inbox is polled: the note survives it
        await inbox.wait_for_function(f"window.meshDashboard.loads > {loads}")
        await expect(gate.locator("textarea[name=note]")).to_have_value("looks right, go")
        await inbox.screenshot(path=str(shots / "approvals.png"), full_page=True)
        await gate.locator("button[value=approve]").click()
        await expect(inbox.locator("#view")).to_contain_text("Nothing waits for a person")
        await inbox.close()
        # the goal moves on, on the page that never reloaded
        await expect(page.locator("#timeline .ev[data-type='approval.decided']")).to_contain_text(
            "plan: approve by ci: looks right, go")
        await expect(page.locator("#goal-status")).to_have_text("completed", timeout=WAIT_MS)
        await expect(page.locator("#timeline .ev[data-type='goal.completed']")).to_have_count(1)

        state = await client.goal(goal_id)
        assert state is not None and state.status == "completed"
        decided = state.approvals["plan"]
        assert (decided.status, decided.decided_by, decided.note) == ("approved", "ci", "looks right, go")
        everything = ",".join(sorted(state.steps))
        seen: list[str] = await page.evaluate("window.__seen")
        assert await page.evaluate("window.__sameDocument") is True  # no reload happened
        assert seen[0] == "" and seen[-1] == everything  # from no step to every step, live
        assert len(seen) >= 2 and all(set(a.split(",")) <= set(b.split(",")) for a, b in pairwise(seen[1:]))
        assert await page.locator("#view g.step.st-completed").count() == len(state.steps)

        # a step's routing decision and cost, as the ledger-free event history tells them
        coder = next(sid for sid, st in state.steps.items() if st.step.role == "coder")
        await page.click(f"#view g.step[data-step='{coder}']")
        detail = page.locator("#detail")
        await expect(detail.locator(".route")).to_contain_text(f"tier {state.steps[coder].tier}")
        await expect(detail.locator(".route")).to_contain_text("propensity")
        await expect(detail.locator("h2 + .facts .cost")).to_have_text(
            money(state.steps[coder].usage.cost_usd, state.steps[coder].simulated))
        assert state.steps[coder].simulated  # the sim's costs are never shown as real: sim$…
        await page.screenshot(path=str(shots / "goal.png"), full_page=True)

        # the workspace browser: a diff between the first and the last revision
        files = page.locator("#files")
        await expect(files.locator("select[name=rev] option")).not_to_have_count(0)
        options = files.locator("select[name=against] option")
        await files.locator("select[name=against]").select_option(await options.nth(1).get_attribute("value"))
        await files.locator("button[type=submit]").click()
        await expect(files.locator("pre.diff, .file p")).to_be_visible()

        await page.goto(gw.url + "/")
        row = page.locator(f"tr[data-goal='{goal_id}']")
        await expect(row).to_contain_text("completed")
        await expect(row).to_contain_text(f"{len(state.steps)} / {len(state.steps)}")
        await expect(row).to_contain_text("simulated")
        await page.screenshot(path=str(shots / "goals.png"), full_page=True)
        # a goal submitted with the list's form opens its own page
        await page.fill("#submit-goal input[name=brief]", "Write a haiku about queues")
        await page.click("#submit-goal button[type=submit]")
        await page.wait_for_url(f"{gw.url}/ui/goals/*")
        haiku = page.url.rsplit("/", 1)[1]
        await expect(page.locator("#view h1")).to_contain_text("Write a haiku about queues", timeout=WAIT_MS)
        assert (await http.post(f"/v1/goals/{haiku}/cancel", json={"reason": "seen"})).status_code in (200, 202)

        # a 200-step plan: every step drawn, in a box that scrolls rather than a page 10,000 pixels tall
        r = await http.post("/v1/goals", json={"brief": "Build me a login system", "options": {"sim_plan_steps": 200}})
        big = r.json()["goal_id"]
        await page.goto(f"{gw.url}/ui/goals/{big}")
        await expect(page.locator("#view svg.dag g.step")).to_have_count(200, timeout=WAIT_MS)
        # the plan is one long chain: its columns wrap into bands, so it scrolls down, never sideways
        shown, drawn = await page.evaluate("() => { const b = document.getElementById('dag-box'); "
                                           "return [b.clientWidth, b.scrollWidth]; }")
        assert 0 < drawn <= shown
        await page.screenshot(path=str(shots / "dag-200.png"))  # the viewport: the graph is re-rendered as it runs
        assert (await http.post(f"/v1/goals/{big}/cancel", json={"reason": "screenshot taken"})).status_code == 202

        # the mesh (heartbeats, lag, dead letters, breakers) and the router (from the ledger)
        await page.click("nav a[href='/ui/mesh']")
        await expect(page.locator("#view table.breakers tr[data-tier='swarm']")).to_contain_text("closed")
        await page.screenshot(path=str(shots / "mesh.png"), full_page=True)
        await page.click("nav a[href='/ui/router']")
        await expect(page.locator("#view #baseline-cost")).to_contain_text("sim$", timeout=WAIT_MS)
        await page.screenshot(path=str(shots / "router.png"), full_page=True)
