// The dashboard's only script: the token, event streams read with fetch (EventSource cannot send an
// Authorization header), and swapping in the HTML fragments the gateway renders when an event says they
// changed. No framework, no build step.
"use strict";

const TOKEN_KEY = "mesh-token";
const FINAL = new Set(["goal.completed", "goal.failed", "goal.cancelled"]);
const TIMELINE_MAX = 5000;
const state = { events: 0, loads: 0, selected: null, nodes: {} };
window.meshDashboard = state; // read by the browser test

const $ = (sel, root = document) => root.querySelector(sel);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function headers(extra = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

class NeedsLogin extends Error {}

async function request(url, options = {}) {
  const r = await fetch(url, { cache: "no-store", ...options, headers: headers(options.headers || {}) });
  if (r.status === 401) {
    showLogin();
    throw new NeedsLogin(url);
  }
  return r;
}

async function errorText(r) {
  try {
    return (await r.json()).error.message;
  } catch {
    return `HTTP ${r.status}`;
  }
}

// --- login -------------------------------------------------------------------------------------------

function showLogin() {
  const form = $("#login");
  form.hidden = false;
  $("input", form).focus();
}

function setupLogin() {
  const form = $("#login");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, form.elements.token.value.trim());
    const r = await fetch("/v1/ui/goals", { headers: headers() });
    if (r.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      $("#login-error").textContent = await errorText(r);
      return;
    }
    location.reload(); // a fresh start with the token: every stream and fragment
  });
  const logout = $("#logout");
  logout.hidden = !sessionStorage.getItem(TOKEN_KEY);
  logout.addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
}

// --- fragments ---------------------------------------------------------------------------------------

async function load(el, url) {
  if (url) el.dataset.src = url;
  const r = await request(el.dataset.src);
  const html = r.ok ? await r.text() : `<p class="reason">${escapeHtml(await errorText(r))}</p>`;
  const scroll = {};
  el.querySelectorAll("[data-keep-scroll][id]").forEach((b) => (scroll[b.id] = [b.scrollLeft, b.scrollTop]));
  const open = {};
  el.querySelectorAll("details[id]").forEach((d) => (open[d.id] = d.open));
  // a note being written survives the re-render (polls and events re-render the fragment it sits in)
  const notes = {};
  let focused = null;
  el.querySelectorAll(".approval textarea").forEach((t) => {
    const key = noteKey(t);
    notes[key] = t.value;
    if (t === document.activeElement) focused = [key, t.selectionStart, t.selectionEnd];
  });
  el.innerHTML = html;
  el.querySelectorAll(".approval textarea").forEach((t) => {
    const key = noteKey(t);
    if (key in notes) t.value = notes[key];
    if (focused && focused[0] === key) {
      t.focus();
      t.setSelectionRange(focused[1], focused[2]);
    }
  });
  for (const [id, [left, top]] of Object.entries(scroll)) {
    const b = document.getElementById(id);
    if (b) [b.scrollLeft, b.scrollTop] = [left, top];
  }
  for (const [id, isOpen] of Object.entries(open)) {
    const d = document.getElementById(id);
    if (d) d.open = isOpen;
  }
  decorate(el);
  state.loads += 1;
  el.dispatchEvent(new CustomEvent("mesh:loaded", { bubbles: true }));
}

function noteKey(textarea) {
  const gate = textarea.closest(".approval");
  return `${gate.dataset.goal}/${gate.dataset.gate}`;
}

// At most one load in flight and one queued per element, a short pause to gather a burst of events.
function refresher(el, delay = 250) {
  let timer = null;
  let busy = false;
  let again = false;
  const run = async () => {
    timer = null;
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    try {
      await load(el);
    } catch (e) {
      if (!(e instanceof NeedsLogin)) console.warn("load failed", e);
    } finally {
      busy = false;
      if (again) {
        again = false;
        schedule();
      }
    }
  };
  const schedule = () => {
    if (!timer) timer = setTimeout(run, delay);
  };
  return schedule;
}

function decorate(root) {
  root.querySelectorAll("[data-node-of]").forEach((td) => (td.textContent = state.nodes[td.dataset.nodeOf] || ""));
  if (state.selected) {
    root.querySelectorAll(`g.step[data-step="${CSS.escape(state.selected)}"]`).forEach((g) => g.classList.add("selected"));
  }
}

function escapeHtml(text) {
  const div = document.createElement("div");
  div.textContent = text;
  return div.innerHTML;
}

// Links and forms inside fragments load into a panel instead of navigating: data-load="<panel id>".
function setupPanels() {
  document.addEventListener("click", (e) => {
    const link = e.target.closest("a[data-load]");
    if (!link) return;
    e.preventDefault();
    load(document.getElementById(link.dataset.load), link.getAttribute("href")).catch(() => {});
  });
  // Decisions (approve / reject, with a note) post JSON — the button pressed is the decision —, then the
  // fragment they sit in is loaded again (a goal's page also hears approval.decided on its stream).
  document.addEventListener("submit", async (e) => {
    const form = e.target.closest("form[data-post]");
    if (!form) return;
    e.preventDefault();
    const body = {};
    for (const [k, v] of new FormData(form, e.submitter)) body[k] = v;
    form.querySelectorAll("button").forEach((b) => (b.disabled = true));
    try {
      const r = await request(form.dataset.post, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (!r.ok) {
        $(".error", form).textContent = await errorText(r);
        form.querySelectorAll("button").forEach((b) => (b.disabled = false));
        return;
      }
      state.decisions = (state.decisions || 0) + 1;
      const panel = form.closest("[data-src]");
      if (panel) await load(panel);
    } catch (err) {
      if (!(err instanceof NeedsLogin)) console.warn("decision failed", err);
    }
  });
  document.addEventListener("submit", (e) => {
    const form = e.target.closest("form[data-load-form]");
    if (!form) return;
    e.preventDefault();
    const params = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) params.set(k, v);
    load(document.getElementById(form.dataset.loadForm), `${form.getAttribute("action")}?${params}`).catch(() => {});
  });
}

// --- event streams -----------------------------------------------------------------------------------

function setLive(on, text) {
  const live = $("#live");
  live.classList.toggle("off", !on);
  live.textContent = text || (on ? "live" : "offline");
}

// Reads text/event-stream with fetch; reconnects with Last-Event-ID (the stream sequence) after a drop,
// so nothing is missed or seen twice. Ends when the server ends a goal's stream after its final event.
async function stream(url, onEvent) {
  let last = null;
  let finished = false;
  while (!finished) {
    try {
      const r = await request(url, { headers: { Accept: "text/event-stream", ...(last ? { "Last-Event-ID": last } : {}) } });
      if (!r.ok) throw new Error(await errorText(r));
      setLive(true);
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const msg = parseBlock(block);
          if (msg.id !== undefined) last = msg.id;
          if (msg.data.length && msg.event !== "error") {
            const event = JSON.parse(msg.data.join("\n"));
            state.events += 1;
            onEvent(event);
            if (FINAL.has(event.type) && url.includes("/v1/goals/")) finished = true;
          }
        }
      }
    } catch (e) {
      if (e instanceof NeedsLogin) return;
      console.warn("stream dropped", e);
    }
    setLive(false, finished ? "ended" : "offline");
    if (!finished) await sleep(1000);
  }
}

function parseBlock(block) {
  const msg = { data: [] };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") msg.data.push(value);
    else msg[field] = value;
  }
  return msg;
}

// --- the timeline ------------------------------------------------------------------------------------

const tokens = (u) => (u ? (u.prompt_tokens || 0) + (u.completion_tokens || 0) : 0);
const cost = (u, sim) => `${sim ? "sim$" : "$"}${((u && u.cost_usd) || 0).toFixed(4)}`;

function describe(ev) {
  switch (ev.type) {
    case "goal.planned":
      return `plan v${ev.plan.version}: ${ev.plan.steps.length} steps (${ev.source})`;
    case "goal.completed":
      return `${ev.steps_run} steps, ${tokens(ev.usage)} tokens, ${cost(ev.usage, ev.simulated)}`;
    case "goal.failed":
      return ev.reason;
    case "goal.cancelled":
      return `${ev.reason} (${ev.by || "?"})`;
    case "route.decided": {
      const d = ev.decision;
      return `tier ${d.tier}${d.thinking ? " + thinking" : ""}, propensity ${d.propensity.toFixed(2)}${d.explored ? ", explored" : ""}${d.overridden_by ? `, overridden by ${d.overridden_by}` : ""}`;
    }
    case "backend.call":
      return `${ev.model} (${ev.tier}) ${tokens(ev.usage)} tokens ${cost(ev.usage, ev.simulated)} ${Math.round(ev.latency_ms)} ms${ev.outcome !== "ok" ? ` ${ev.outcome}` : ""}`;
    case "tool.call":
      return `${ev.tool} ${ev.ok ? "ok" : `failed: ${ev.error || ""}`}`;
    case "step.started":
      return `attempt ${ev.attempt} on ${ev.node || "?"}`;
    case "step.progress":
      return ev.message;
    case "step.completed":
      return `${ev.verdict ? ev.verdict + ", " : ""}${ev.tier || ""} ${tokens(ev.usage)} tokens ${cost(ev.usage, ev.simulated)}`;
    case "step.failed":
      return ev.error;
    case "approval.requested":
      return `${ev.approval.kind} gate ${ev.approval.gate} waits${ev.approval.step_id ? ` (step ${ev.approval.step_id})` : ""}`;
    case "approval.decided":
      return `${ev.gate}: ${ev.decision} by ${ev.by}${ev.timed_out ? " (deadline)" : ""}${ev.note ? `: ${ev.note}` : ""}`;
    case "approval.refused":
      return `${ev.gate}: ${ev.decision} by ${ev.by} refused: ${ev.reason}`;
    case "artifact.created":
      return `${ev.artifact.kind} ${ev.artifact.ref.name || ev.artifact.ref.digest.slice(0, 12)} (${ev.artifact.ref.size} B)`;
    default:
      return ev.reason || ev.note || "";
  }
}

const GROUPS = new Set(["goal", "step", "route", "backend", "tool", "artifact", "approval"]);

function appendTimeline(ev) {
  const box = $("#timeline");
  const group = ev.type.split(".")[0];
  const row = document.createElement("div");
  row.className = `ev g-${GROUPS.has(group) ? group : "other"}`;
  row.dataset.step = ev.step_id || "";
  row.dataset.type = ev.type;
  const at = new Date(ev.at).toLocaleTimeString([], { hour12: false });
  row.innerHTML = `<span class="t">${at}</span><span class="type">${escapeHtml(ev.type)}</span>` +
    `<span class="s">${escapeHtml(ev.step_id || "")}</span><span class="d">${escapeHtml(describe(ev))}</span>`;
  applyStepFilter(row);
  box.appendChild(row);
  if (box.childElementCount > TIMELINE_MAX) box.firstElementChild.remove();
}

function applyStepFilter(row) {
  const wanted = $("#timeline-step").value.trim();
  row.classList.toggle("filtered", Boolean(wanted) && row.dataset.step !== wanted);
}

function setupTimelineFilters() {
  const box = $("#timeline");
  $("#timeline-filters").addEventListener("change", (e) => {
    if (e.target.type === "checkbox") box.classList.toggle(`hide-${e.target.value}`, !e.target.checked);
  });
  $("#timeline-step").addEventListener("input", () => box.querySelectorAll(".ev").forEach(applyStepFilter));
}

// --- pages -------------------------------------------------------------------------------------------

function goalsPage() {
  const view = $("#view");
  const filter = $("#status-filter");
  const src = () => `/v1/ui/goals${filter.value ? `?status=${filter.value}` : ""}`;
  view.dataset.src = src();
  filter.addEventListener("change", () => {
    history.replaceState(null, "", filter.value ? `/?status=${filter.value}` : "/");
    load(view, src()).catch(() => {});
  });
  $("#submit-goal").addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = e.target;
    const r = await request("/v1/goals", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ brief: form.elements.brief.value }),
    });
    if (!r.ok) return alert(await errorText(r));
    location.assign(`/ui/goals/${(await r.json()).goal_id}`);
  });
  const refresh = refresher(view, 400);
  load(view).catch(() => {});
  stream(view.dataset.stream, (ev) => {
    if (ev.type.startsWith("goal.") || ev.type === "step.completed" || ev.type === "step.failed") refresh();
  });
}

function goalPage() {
  const view = $("#view");
  const detail = $("#detail");
  const files = $("#files");
  const goal = document.body.dataset.goal;
  const refreshView = refresher(view);
  const refreshDetail = refresher(detail);
  const refreshFiles = refresher(files, 500);
  const select = (step) => {
    state.selected = step;
    view.querySelectorAll("g.step.selected").forEach((g) => g.classList.remove("selected"));
    decorate(view);
    load(detail, `/v1/ui/goals/${goal}/steps/${encodeURIComponent(step)}`).catch(() => {});
  };
  view.addEventListener("click", (e) => {
    const hit = e.target.closest("[data-step]");
    if (!hit) return;
    e.preventDefault();
    select(hit.dataset.step);
  });
  view.addEventListener("keydown", (e) => {
    const hit = e.target.closest("g.step");
    if (hit && e.key === "Enter") select(hit.dataset.step);
  });
  setupTimelineFilters();
  load(view).catch(() => {});
  load(files).catch(() => {});
  stream(view.dataset.stream, (ev) => {
    appendTimeline(ev);
    if (ev.type === "step.started" && ev.node) state.nodes[ev.step_id] = ev.node;
    if (ev.type.startsWith("goal.") || ev.type.startsWith("step.") || ev.type.startsWith("approval.")) refreshView();
    if (state.selected && ev.step_id === state.selected && detail.dataset.src.includes("/steps/")) refreshDetail();
    const fileTriggers = files.dataset.on.split(" ");
    if (fileTriggers.some((t) => ev.type.startsWith(t)) && !files.dataset.src.includes("?")) refreshFiles();
  });
}

function operatorPage() {
  const view = $("#view");
  const triggers = view.dataset.on.split(" ");
  const refresh = refresher(view, 1000); // the router's ledger queries are the heaviest: at most one a second
  load(view).catch(() => {});
  if (Number(view.dataset.poll)) setInterval(refresh, Number(view.dataset.poll));
  stream(view.dataset.stream, (ev) => {
    if (triggers.some((t) => ev.type.startsWith(t))) refresh();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setupLogin();
  setupPanels();
  const page = document.body.dataset.page;
  if (page === "goals") goalsPage();
  else if (page === "goal") goalPage();
  else operatorPage();
});
