"""`qc.inspect`: a plain-text report of a prepared or quantized module.

One row per quantized tensor (node, the op it feeds, dtype, granularity, scale(s), zero-point(s),
observed and chosen range) followed by the pass log (time, stats, op-count changes per pass).
"""
from __future__ import annotations

import torch
from torch import fx

from ..errors import InvalidModelError
from ..graph import ANNOTATION, STATE
from ..graph.annotation import get_arg
from ..graph.weights import weight_coverage


def _summary(t: torch.Tensor, fmt: str) -> str:
    t = t.flatten()
    if t.numel() == 1:
        return format(t.item(), fmt)
    return f"[{format(t.min().item(), fmt)} .. {format(t.max().item(), fmt)}] x{t.numel()}"


def _granularity(spec) -> str:
    g = spec.granularity
    return type(g).__name__ + ("" if not hasattr(g, "axis") else f"(axis={g.axis}" +
                               (f", size={g.size})" if hasattr(g, "size") else ")"))


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _consumers(members) -> str:
    names = sorted({m[1] for m in members if m[0] == "in"} | {m[1] for m in members if m[0] == "out"})
    return ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")


def _kv_cache_line(layout, quantized: bool) -> str:
    """What one token costs in the KV cache of a captured causal LM, against a float32 cache."""
    spec = layout.spec
    if spec is None:
        kind = "float"
    else:
        kind = (f"{spec.dtype} {'per token and head (dynamic)' if spec.dynamic else _granularity(spec) + ' (static)'}"
                + ("" if quantized else ", quantized at convert"))
    used = layout.bytes_per_token() if quantized or spec is None else None
    fp32 = 2 * layout.kv_heads * layout.head_dim * 4
    cost = (f"{used['per_layer']} bytes per token and layer ({used['all_layers']} for all {layout.layers} layers; "
            f"float32: {fp32})") if used else f"float32 now: {fp32} bytes per token and layer"
    return (f"KV cache: {kind}; {layout.layers} layers x {layout.kv_heads} KV heads x {layout.head_dim}; {cost}; "
            f"longest sequence {layout.max_seq_len} tokens")


def inspect(gm: fx.GraphModule) -> str:
    state = getattr(gm, "meta", {}).get(STATE) if isinstance(gm, fx.GraphModule) else None
    if state is None:
        raise InvalidModelError(f"inspect takes a module from qc.prepare or qc.convert, got {type(gm).__name__}")
    out = [f"qcompile {state.stage} module, recipe {state.recipe.name!r}, "
           f"{state.calibration_batches} calibration batches"]
    if state.cache is not None:
        out.append(_kv_cache_line(state.cache, quantized=state.stage == "quantized"))
    if state.precision:
        from ..passes.precision import precision_table
        out.append(_table(["node", "op", "module", "computes in"], [list(r) for r in precision_table(gm)]))
    elif state.stage == "quantized":
        rows = [[q["tensor"], q["kind"], _consumers(q["members"]), q["spec"].dtype, _granularity(q["spec"]),
                 _summary(q["scale"], ".4g"), _summary(q["zero_point"], "d"),
                 f"[{q['observed'][0]:.4g}, {q['observed'][1]:.4g}]", f"[{q['chosen'][0]:.4g}, {q['chosen'][1]:.4g}]"]
                for q in state.qparams]
        dynamic = [g for g in state.groups if g.spec.dynamic]
        rows += [[f"group {g.id}", "dynamic", _consumers(g.members), g.spec.dtype, _granularity(g.spec),
                  "per batch", "per batch", "-", "-"] for g in dynamic]
        out.append(_table(["tensor", "kind", "feeds", "dtype", "granularity", "scale", "zero_point",
                           "observed range", "chosen range"], rows))
    else:
        rows = []
        for g in state.groups:
            obs = gm.get_submodule(state.observers[g.id]) if g.id in state.observers else None
            seen = f"[{float(obs.seen_min):.4g}, {float(obs.seen_max):.4g}]" if obs is not None and obs.calibrated else "-"
            rows.append([f"group {g.id}", _consumers(g.members), g.spec.dtype, _granularity(g.spec),
                         g.spec.observer if not g.spec.dynamic else "dynamic", seen])
        for node in gm.graph.nodes:  # weights are quantized at convert, straight from the tensor
            ann = node.meta.get(ANNOTATION)
            if ann is not None and ann.weight is not None:
                spec = ann.weight[1]
                rows.append([get_arg(node, ann.weight[0]).target, node.name, spec.dtype, _granularity(spec),
                             f"weight {spec.observer}", "at convert"])
        out.append(_table(["tensor", "feeds", "dtype", "granularity", "observer", "observed range"], rows))
    out.append("")
    out.append(_table(["pass", "ms", "stats", "changes"],
                      [[r.name, f"{r.seconds * 1e3:.1f}", ", ".join(f"{k}={v}" for k, v in r.stats.items()),
                        r.changes()] for r in state.records]))
    if not state.precision:   # which GEMM/conv weights are integer, and why the others are not
        out += ["", str(weight_coverage(gm))]
    return "\n".join(out)
