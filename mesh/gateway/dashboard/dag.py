"""A plan's DAG laid out on the server as SVG: columns by dependency depth, so no layout library ships to
the browser. A 200-step plan stays readable — every step labelled at full size, in a box that scrolls a
little rather than a drawing 40,000 pixels long: a layer wider than ``MAX_ROWS`` steps wraps into several
columns, and the columns wrap into bands of ``BAND_COLUMNS`` below each other (a long chain of revisions
reads like lines of text).

Within a layer, steps are ordered by the mean row of their dependencies (one barycentre pass), which keeps
most edges short; ties keep plan order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from html import escape

from mesh.roles.goalstate import StepState

NODE_W, NODE_H = 168, 42
COL_GAP, ROW_GAP, PAD, BAND_GAP = 56, 12, 16, 36
MAX_ROWS = 24
BAND_COLUMNS = 6  # 1,320 pixels: the width of a laptop screen
LABEL_CHARS = 22


@dataclass(frozen=True, slots=True)
class Placed:
    step_id: str
    x: int
    y: int


def depths(steps: Mapping[str, StepState]) -> dict[str, int]:
    """Longest dependency chain to each step (roots are 0); unknown dependencies are ignored."""
    out: dict[str, int] = {}

    def depth(sid: str, seen: frozenset[str]) -> int:
        if sid not in out:
            deps = [d for d in steps[sid].step.depends_on if d in steps and d not in seen]
            out[sid] = 1 + max((depth(d, seen | {sid}) for d in deps), default=-1)
        return out[sid]

    for sid in steps:
        depth(sid, frozenset())
    return out


def layout(steps: Mapping[str, StepState]) -> tuple[dict[str, Placed], int, int]:
    """Each step's top-left corner, and the drawing's width and height."""
    depth = depths(steps)
    layers: dict[int, list[str]] = {}
    for sid in steps:  # dict order = plan order
        layers.setdefault(depth[sid], []).append(sid)
    row: dict[str, float] = {}
    cell: dict[str, tuple[int, int]] = {}  # step → (column, row)
    column = 0
    for d in sorted(layers):
        order = list(enumerate(layers[d]))

        def key(item: tuple[int, str]) -> tuple[float, int]:
            deps = [row[p] for p in steps[item[1]].step.depends_on if p in row]
            return (sum(deps) / len(deps) if deps else float(item[0]), item[0])

        ordered = [sid for _, sid in sorted(order, key=key)]
        for i, sid in enumerate(ordered):
            row[sid] = i % MAX_ROWS
            cell[sid] = (column + i // MAX_ROWS, i % MAX_ROWS)
        column += -(-len(ordered) // MAX_ROWS)
    columns = max(column, 1)
    # bands of BAND_COLUMNS columns, each as tall as its tallest column
    rows_in_band: dict[int, int] = {}
    for col, r in cell.values():
        rows_in_band[col // BAND_COLUMNS] = max(rows_in_band.get(col // BAND_COLUMNS, 0), r + 1)
    band_y, y = {}, PAD
    for band in range(-(-columns // BAND_COLUMNS)):
        band_y[band] = y
        y += rows_in_band.get(band, 1) * (NODE_H + ROW_GAP) - ROW_GAP + BAND_GAP
    placed = {sid: Placed(sid, PAD + (col % BAND_COLUMNS) * (NODE_W + COL_GAP),
                          band_y[col // BAND_COLUMNS] + r * (NODE_H + ROW_GAP)) for sid, (col, r) in cell.items()}
    width = PAD * 2 + min(columns, BAND_COLUMNS) * (NODE_W + COL_GAP) - COL_GAP
    return placed, width, y - BAND_GAP + PAD


def _short(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1] + "…"


def render(steps: Mapping[str, StepState], *, selected: str | None = None) -> str:
    """The SVG element: one ``g.step`` per step (``data-step``, class ``st-<status>``) with its id, role and
    tier, and one path per dependency."""
    placed, width, height = layout(steps)
    edges: list[str] = []
    for sid, st in steps.items():
        to = placed[sid]
        for dep in st.step.depends_on:
            fr = placed.get(dep)
            if fr is None:
                continue
            x1, y1 = fr.x + NODE_W, fr.y + NODE_H // 2
            x2, y2 = to.x, to.y + NODE_H // 2
            bend = max(COL_GAP // 2, (x2 - x1) // 2)  # into the next band: out to the right, in from the left
            edges.append(f'<path class="edge" d="M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}"/>')
    nodes: list[str] = []
    for sid, st in steps.items():
        p = placed[sid]
        tier = st.tier or ""
        sub = st.step.role + (f" · {tier}" if tier else "") + (f" · #{st.attempt}" if st.attempt > 1 else "")
        cls = f"step st-{st.status}" + (" revision" if st.step.revision_of else "") + \
            (" selected" if sid == selected else "")
        tip = f"{sid} ({st.step.role}, {st.status}): {st.step.instruction[:300]}"
        nodes.append(
            f'<g class="{cls}" data-step="{escape(sid)}" transform="translate({p.x},{p.y})" tabindex="0">'
            f"<title>{escape(tip)}</title>"
            f'<rect width="{NODE_W}" height="{NODE_H}" rx="6"/>'
            f'<text x="8" y="17" class="sid">{escape(_short(sid))}</text>'
            f'<text x="8" y="33" class="sub">{escape(_short(sub))}</text></g>')
    return (f'<svg class="dag" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="plan DAG, {len(steps)} steps">'
            f'<g class="edges">{"".join(edges)}</g><g class="nodes">{"".join(nodes)}</g></svg>')
