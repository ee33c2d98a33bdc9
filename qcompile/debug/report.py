"""`qc.report(...).to_html(path)`: one self-contained HTML page about a quantized module.

No scripts, no external files, no fonts to fetch: inline CSS and hand-written SVG, so the page
works offline and from an e-mail attachment. Sections: summary, per-node error plot (from
`qc.compare`), sensitivity ranking (from `qc.sensitivity`), chosen precision per layer (read from
the converted graph), the pass log (time, stats and op-count changes per pass) and a drawing of the
rewritten graph. The drawing is laid out here in pure Python (networkx's topological generations
give the rows), not by graphviz, so it needs no system package.
"""
from __future__ import annotations

import datetime
import html
import math
import os
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import torch
from torch import fx

from ..errors import InvalidModelError
from ..graph import STATE, module_name
from .compare import CompareReport
from .sensitivity import SensitivityReport, weight_bits

qops = torch.ops.qcompile
_COLORS = {"quantize": "#d9534f", "dequantize": "#f0ad4e", "weighted": "#337ab7", "input": "#5cb85c",
           "output": "#5cb85c", "other": "#999999"}
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}
th{background:#f5f5f5}tr.bad td{background:#fde8e8}.note{color:#666;font-size:.85em}
.graph{overflow:auto;border:1px solid #ddd;max-height:900px}code{background:#f5f5f5;padding:0 3px}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _db(x: float) -> str:
    return "inf" if math.isinf(x) and x > 0 else f"{x:.1f}"


def _table(head: list[str], rows: list[list], bad: set[int] = frozenset()) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for i, r in enumerate(rows):
        cls = ' class="bad"' if i in bad else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>")
    return "".join(out) + "</table>"


def bar_chart(labels: list[str], values: list[float], unit: str, *, marker: float | None = None,
              color: str = "#337ab7", width: int = 900) -> str:
    """Horizontal bars as inline SVG; infinite values are drawn at the largest finite one."""
    finite = [v for v in values if math.isfinite(v)]
    top = max([abs(v) for v in finite] + [marker or 0.0, 1e-12])
    row, left, right = 16, 330, 60
    height = row * len(values) + 30
    scale = (width - left - right) / top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'font-family="sans-serif" font-size="11">']
    for i, (label, v) in enumerate(zip(labels, values)):
        y = 10 + i * row
        shown = top if not math.isfinite(v) else max(v, 0.0)
        parts.append(f'<text x="{left - 6}" y="{y + 11}" text-anchor="end"><title>{_e(label)}</title>'
                     f'{_e(_short(label))}</text>')
        parts.append(f'<rect x="{left}" y="{y + 2}" width="{shown * scale:.1f}" height="{row - 4}" fill="{color}"/>')
        parts.append(f'<text x="{left + shown * scale + 4:.1f}" y="{y + 11}">{_e(_db(v) if unit == "dB" else f"{v:.3g}")}'
                     f'</text>')
    if marker is not None:
        x = left + marker * scale
        parts.append(f'<line x1="{x:.1f}" y1="4" x2="{x:.1f}" y2="{height - 16}" stroke="#d9534f" '
                     f'stroke-dasharray="4 3"/><text x="{x + 3:.1f}" y="{height - 4}" fill="#d9534f">'
                     f'{marker:g} {unit}</text>')
    parts.append(f'<text x="{left}" y="{height - 4}" fill="#666">{_e(unit)}</text></svg>')
    return "".join(parts)


def _short(label: str, n: int = 46) -> str:
    """The end of a long label, cut at a dot: 'encoder.layer.5.output.dense' reads better than 'der.layer...'."""
    if len(label) <= n:
        return label
    tail = label[-(n - 1):]
    return "\u2026" + (tail[tail.index(".") + 1:] if "." in tail[:-8] else tail)


def _kind(node: fx.Node) -> str:
    from ..graph import WEIGHTED

    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.target == qops.quantize.default:
        return "quantize"
    if node.target == qops.dequantize.default:
        return "dequantize"
    if node.target in WEIGHTED:
        return "weighted"
    return "other"


def graph_svg(gm: fx.GraphModule, max_nodes: int = 1500) -> str:
    """The graph (get_attr nodes left out) in rows of topological generations, as inline SVG."""
    g = nx.DiGraph()
    nodes = [n for n in gm.graph.nodes if n.op != "get_attr"][:max_nodes]
    keep = set(nodes)
    for n in nodes:
        g.add_node(n.name)
        for a in n.all_input_nodes:
            if a in keep:
                g.add_edge(a.name, n.name)
    by_name = {n.name: n for n in nodes}
    order = {name: i for i, name in enumerate(by_name)}
    # rows: longest path from the inputs; a weight's dequantize sits just above its consumer
    level = {}
    for gen in nx.topological_generations(g):
        for name in gen:
            level[name] = max((level[p] + 1 for p in g.predecessors(name)), default=0)
    for name in level:
        if g.in_degree(name) == 0 and by_name[name].op != "placeholder" and g.out_degree(name):
            level[name] = max(0, min(level[s] for s in g.successors(name)) - 1)
    rows: dict[int, list[str]] = {}
    for name in sorted(level, key=order.get):
        rows.setdefault(level[name], []).append(name)
    pos, bw, bh, gx, gy = {}, 150, 34, 14, 36
    width = 0
    for y, names in sorted(rows.items()):
        for x, name in enumerate(names):
            pos[name] = (10 + x * (bw + gx), 10 + y * (bh + gy))
            width = max(width, 10 + (x + 1) * (bw + gx))
    height = max((p[1] for p in pos.values()), default=0) + bh + 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="10"><defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
             f'markerHeight="6" orient="auto"><path d="M0,0L10,5L0,10z" fill="#888"/></marker></defs>']
    for a, b in g.edges:
        (x1, y1), (x2, y2) = pos[a], pos[b]
        parts.append(f'<line x1="{x1 + bw / 2}" y1="{y1 + bh}" x2="{x2 + bw / 2}" y2="{y2}" stroke="#888" '
                     f'stroke-width="1" marker-end="url(#arrow)"/>')
    for name, (x, y) in pos.items():
        n = by_name[name]
        kind = _kind(n)
        op = n.op if n.op in ("placeholder", "output") else str(getattr(n.target, "__name__", n.target))
        op = op.replace(".default", "")
        if kind == "dequantize" and n.args[0].op == "get_attr":
            op = f"dq {n.args[0].target}"   # a stored weight: name it
        parts.append(f'<g><title>{_e(name)} ({_e(op)}) {_e(module_name(n))}</title>'
                     f'<rect x="{x}" y="{y}" width="{bw}" height="{bh}" rx="4" fill="{_COLORS[kind]}" '
                     f'fill-opacity="0.85"/><text x="{x + 5}" y="{y + 13}" fill="#fff">{_e(name[:24])}</text>'
                     f'<text x="{x + 5}" y="{y + 27}" fill="#fff">{_e(op[:24])}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


@dataclass
class Report:
    quantized: fx.GraphModule
    compare: CompareReport | None = None
    sensitivity: SensitivityReport | None = None
    title: str = "qcompile report"

    def html(self) -> str:
        state = self.quantized.meta[STATE]
        body = [f"<h1>{_e(self.title)}</h1>",
                f'<p>Recipe <code>{_e(state.recipe.name)}</code>, stage {_e(state.stage)}, '
                f'{state.calibration_batches} calibration batches. Written '
                f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.</p>']
        bits = weight_bits(self.quantized)
        total = sum(n for _, n in bits.values())
        if total:
            avg = sum(b * n for b, n in bits.values()) / total
            body.append(f"<p>{len(bits)} weighted layers, {total} weight elements, {avg:.3f} average weight bits "
                        f"({sum(b * n for b, n in bits.values()) / 8 / 1024:.1f} KiB of weight codes).</p>")
        if self.compare is not None:
            c = self.compare
            first = c.first_divergence()
            body.append("<h2>Per-node error (float vs quantized)</h2>")
            body.append(f'<p class="note">SQNR of each quantized node against the float model on {c.batches} '
                        f"batch(es), in topological order; errors accumulate downstream. Output SQNR "
                        f"{_db(c.output.sqnr_db)} dB. " + ("No node below the threshold." if first is None else
                        f"First divergence: <b>{_e(first.name)}</b> (module {_e(first.module or '-')}).") + "</p>")
            body.append(bar_chart([f"{r.module or '-'} \u00b7 {'weight' if r.kind == 'weight' else r.name}"
                                   for r in c.rows], [r.sqnr_db for r in c.rows],
                                  "dB", marker=c.threshold_db))
            bad = {i for i, r in enumerate(c.rows) if r.sqnr_db < c.threshold_db}
            body.append(_table(["node", "kind", "module", "dtype", "SQNR dB", "MSE", "max err (scales)", "clipped %"],
                               [[r.name, r.kind, r.module or "-", r.dtype or "-", _db(r.sqnr_db), f"{r.mse:.3g}",
                                 "-" if math.isnan(r.max_err_scales) else f"{r.max_err_scales:.2f}",
                                 "-" if r.kind == "op" else f"{100 * r.clipped_fraction:.3f}"] for r in c.rows], bad))
        if self.sensitivity is not None:
            s = self.sensitivity
            quantized = [x for x in s.candidates if x is not None]
            ranking = s.ranking(quantized[0]) if quantized else []
            body.append("<h2>Sensitivity ranking</h2>")
            body.append(f'<p class="note">Each layer quantized alone; relative MSE of the model output against '
                        f"float on {s.batches} batch(es), most sensitive first ({_e(quantized[0] if quantized else '')}).</p>")
            body.append(bar_chart([r.layer for r in ranking], [r.rel_mse for r in ranking], "relative MSE",
                                  color="#d9534f"))
            body.append(_table(["rank", "layer", "weights"] + [f"{x} SQNR dB" for x in quantized],
                               [[i, r.layer, r.numel] + [_db(s.get(r.layer, x).sqnr_db) for x in quantized]
                                for i, r in enumerate(ranking, 1)]))
        body.append("<h2>Chosen precision per layer</h2>")
        body.append(_table(["layer", "recipe", "weight bits", "weight elements"],
                           [[layer, _recipe_name(state.recipe, layer), b, n] for layer, (b, n) in bits.items()]))
        body.append("<h2>Pass log</h2>")
        recs = state.records
        body.append(bar_chart([r.name for r in recs], [r.seconds * 1e3 for r in recs], "ms", color="#5cb85c"))
        body.append(_table(["pass", "ms", "changed", "stats", "op-count changes"],
                           [[r.name, f"{r.seconds * 1e3:.1f}", "yes" if r.modified else "no",
                             ", ".join(f"{k}={v}" for k, v in r.stats.items()), r.changes()] for r in recs]))
        body.append("<h2>Rewritten graph</h2>")
        legend = " ".join(f'<span style="color:{c}">&#9632;</span> {k}' for k, c in _COLORS.items())
        body.append(f'<p class="note">{legend}. Weights and qparams (get_attr nodes) are left out; hover a box '
                    f"for its module.</p>")
        body.append(f'<div class="graph">{graph_svg(self.quantized)}</div>')
        return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>' + _e(self.title) +
                f"</title><style>{_CSS}</style></head><body>" + "".join(body) + "</body></html>")

    def to_html(self, path: "str | os.PathLike") -> Path:
        path = Path(path)
        path.write_text(self.html(), encoding="utf-8")
        return path


def _recipe_name(recipe, layer: str) -> str:
    r = recipe.recipe_for(layer)
    return "float (excluded)" if r is None else r.name


def report(quantized: fx.GraphModule, *, compare: CompareReport | None = None,
           sensitivity: SensitivityReport | None = None, title: str = "qcompile report") -> Report:
    """A report of a module from qc.convert, with the tables of `qc.compare` / `qc.sensitivity` if given."""
    state = getattr(quantized, "meta", {}).get(STATE) if isinstance(quantized, fx.GraphModule) else None
    if state is None or state.stage != "quantized":
        raise InvalidModelError(f"report takes the module qc.convert returned, got {type(quantized).__name__}")
    return Report(quantized, compare, sensitivity, title)
