"""`qc.compare`: the float model and its quantized graph side by side, node by node.

The float reference is the model captured the same way `prepare` captures it (so BatchNorm is
folded and node names match the quantized graph's: convert never renames the original ops). Both
graphs run on the same batches; per quantized node, in topological order, a row holds the error
of the quantized graph's value against the float graph's value of the same node:

- an activation row per quantize op: the dequantized tensor vs the float value it quantizes
  (errors accumulated from upstream included), its SQNR, MSE, largest error in units of its own
  scale, and the share of values the quantizer clipped (outside the grid by more than half a step);
- a weight row per quantized weight: dequantized weight vs the float weight;
- an op row per op that reads dequantized values (conv, linear, matmul, add, cat ...): its output.

Rows are keyed by the module that owns the node (node.meta["nn_module_stack"]), so a bad row
names a layer of the user's model.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import fx, nn

from ..capture import flatten_for_graph, normalize_inputs
from ..errors import InvalidInputsError, InvalidModelError
from ..graph import STATE, module_name
from ..numerics import broadcast_param, dequantize_math

qops = torch.ops.qcompile
QDQ = (qops.quantize.default, qops.dequantize.default, qops.choose_qparams_per_token.default)
DEFAULT_THRESHOLD_DB = 20.0   # a node diverges when its SQNR falls below this (INT8 rows sit at 30-45 dB)


@dataclass
class NodeError:
    """The float-vs-quantized error of one node, accumulated over the batches."""

    name: str            # node in the quantized graph
    kind: str            # "activation" | "weight" | "op"
    module: str          # owning module of the user's model ('' for the root)
    source: str          # the float node it is compared with
    dtype: str = ""
    numel: int = 0
    signal: float = 0.0  # sum of squares of the float values
    noise: float = 0.0   # sum of squared differences
    max_err_scales: float = math.nan   # max |q - f| / scale (activation and weight rows)
    max_abs_err: float = 0.0
    clipped: int = 0

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        return 10.0 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf

    @property
    def mse(self) -> float:
        return self.noise / self.numel if self.numel else 0.0

    @property
    def clipped_fraction(self) -> float:
        return self.clipped / self.numel if self.numel else 0.0

    def as_dict(self) -> dict:
        return dict(name=self.name, kind=self.kind, module=self.module, source=self.source, dtype=self.dtype,
                    sqnr_db=self.sqnr_db, mse=self.mse, max_err_scales=self.max_err_scales,
                    max_abs_err=self.max_abs_err, clipped_fraction=self.clipped_fraction)


@dataclass
class CompareReport:
    rows: list[NodeError]
    batches: int
    output: NodeError
    threshold_db: float = DEFAULT_THRESHOLD_DB

    def first_divergence(self, threshold_db: float | None = None) -> NodeError | None:
        """The first row (topological order) whose SQNR is below `threshold_db`."""
        t = self.threshold_db if threshold_db is None else threshold_db
        return next((r for r in self.rows if r.sqnr_db < t), None)

    def __getitem__(self, name: str) -> NodeError:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def by_module(self) -> dict[str, list[NodeError]]:
        out: dict[str, list[NodeError]] = {}
        for r in self.rows:
            out.setdefault(r.module, []).append(r)
        return out

    def __str__(self) -> str:
        head = ["node", "kind", "module", "compares", "dtype", "SQNR dB", "MSE", "max err (scales)", "clipped %"]
        rows = [[r.name, r.kind, r.module or "-", r.source, r.dtype or "-", _db(r.sqnr_db), f"{r.mse:.3g}",
                 "-" if math.isnan(r.max_err_scales) else f"{r.max_err_scales:.2f}",
                 f"{100 * r.clipped_fraction:.3f}" if r.kind != "op" else "-"] for r in self.rows]
        widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h) for i, h in enumerate(head)]
        first = self.first_divergence()
        lines = [f"qcompile compare: float graph vs quantized graph, {self.batches} batch(es), "
                 f"{len(self.rows)} quantized nodes (errors accumulate downstream)",
                 "  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
        for r, cells in zip(self.rows, rows):
            mark = "  <- first divergence" if r is first else ""
            lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() + mark)
        o = self.output
        lines.append(f"model output: SQNR {_db(o.sqnr_db)} dB, MSE {o.mse:.3g}, max |q - f| {o.max_abs_err:.4g}")
        lines.append("no node below %.1f dB" % self.threshold_db if first is None else
                     f"first divergence: {first.name} ({first.kind}, module {first.module or '-'}) at "
                     f"{_db(first.sqnr_db)} dB < {self.threshold_db:.1f} dB")
        return "\n".join(lines)


def _db(x: float) -> str:
    return "inf" if math.isinf(x) and x > 0 else f"{x:.1f}"


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps the values of the named nodes (and the arguments of those in `args_of`);
    observers pass their input through untouched."""

    def __init__(self, gm: fx.GraphModule, keep: set[str], args_of: set[str] = frozenset(),
                 observers: set[str] = frozenset()):
        super().__init__(gm)
        self.keep, self.args_of, self.observers = keep, args_of, observers
        self.values: dict[str, Any] = {}
        self.args: dict[str, tuple] = {}

    def call_module(self, target, args, kwargs):
        if target in self.observers:
            return args[0]
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node):
        # copies, not references: a later in-place op (one that FunctionalizeInplace had to keep,
        # e.g. a write through a view) would otherwise change the recorded value after the fact and
        # charge the difference to the wrong node
        if n.name in self.args_of:
            self.args[n.name] = _snapshot(self.fetch_args_kwargs_from_env(n)[0])
        out = super().run_node(n)
        if n.name in self.keep:
            self.values[n.name] = _snapshot(out)
        return out


def _snapshot(value):
    return torch.utils._pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)


def float_graph(model: nn.Module, quantized: fx.GraphModule, example: Any) -> tuple[fx.GraphModule, set[str]]:
    """The float graph to compare with: a prepared module as given, else `model` captured with the
    quantized module's recipe (PTQ algorithms left out: they need calibration data)."""
    from ..api import prepare  # api imports debug

    state = getattr(model, "meta", {}).get(STATE) if isinstance(model, fx.GraphModule) else None
    if state is not None:
        if state.stage == "quantized":
            raise InvalidModelError("compare's first argument is the float model (or the module qc.prepare "
                                    "returned), not a quantized one")
        return model, set(state.observers.values())
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"compare takes the float torch.nn.Module, got {type(model).__name__}")
    recipe = quantized.meta[STATE].recipe
    gm = prepare(model, example, recipe.replace(algorithms=()))
    return gm, set(gm.meta[STATE].observers.values())


def _consumer_module(node: fx.Node) -> str:
    """The module a quantize op belongs to: its own, else the first consumer past its dequantize."""
    own = module_name(node)
    if own:
        return own
    for user in node.users:
        for op in ([user] if user.target not in QDQ else list(user.users)):
            if op.target not in QDQ and module_name(op):
                return module_name(op)
    src = node.args[0]
    return module_name(src) if isinstance(src, fx.Node) else ""


def _flat_args(node: fx.Node) -> list:
    out = []
    for a in node.args:
        out.extend(a if isinstance(a, (list, tuple)) else [a])
    return out


def _plan(quantized: fx.GraphModule, fnodes: dict[str, fx.Node]) -> list[tuple[NodeError, str, fx.Node, Any]]:
    """(row, kind, quantized node, float node name or None) per quantized node, in topological order."""
    plan = []
    spec_of = {(m[1], m[2]): q["spec"] for q in quantized.meta[STATE].qparams if q["kind"] == "weight"
               for m in q["members"]}
    for node in quantized.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == qops.quantize.default:
            src = node.args[0]
            row = NodeError(node.name, "activation", _consumer_module(node), src.name,
                            str(node.args[7]).replace("torch.", ""))
            plan.append((row, "activation", node, src.name if src.name in fnodes else None))
        elif node.target == qops.dequantize.default and node.args[0].op == "get_attr":
            for user in node.users:
                if user.target in QDQ:
                    continue
                pos = next(i for i, a in enumerate(user.args) if a is node)
                fuser = fnodes.get(user.name)
                fw = fuser.args[pos] if fuser is not None and pos < len(fuser.args) else None
                spec = spec_of.get((user.name, pos))
                row = NodeError(node.args[0].target, "weight", module_name(user), f"{user.name} arg {pos}",
                                spec.dtype if spec is not None else "")
                plan.append((row, "weight", node, fw.name if isinstance(fw, fx.Node) else None))
        elif node.target not in QDQ and node.target is not operator.getitem and any(
                isinstance(a, fx.Node) and a.target == qops.dequantize.default for a in _flat_args(node)):
            plan.append((NodeError(node.name, "op", module_name(node), node.name), "op", node,
                         node.name if node.name in fnodes else None))
    return plan


def flatten_batch(gm: fx.GraphModule, batch: Any, index: int) -> list:
    """A batch (tensor, tuple or dict) as the flat list of placeholder values of `gm`."""
    args, kwargs = normalize_inputs(batch, what=f"batch {index}")
    try:
        return flatten_for_graph(gm, args, kwargs)
    except InvalidInputsError as e:
        raise InvalidInputsError(f"batch {index} does not match the model's arguments: {e}") from e


def _tensor(v) -> torch.Tensor | None:
    return v if isinstance(v, torch.Tensor) else None


def _accumulate(row: NodeError, q: torch.Tensor, f: torch.Tensor | None) -> None:
    if f is None or q.shape != f.shape:
        return
    q, f = q.detach().double(), f.detach().double()
    d = q - f
    row.signal += float((f * f).sum())
    row.noise += float((d * d).sum())
    row.max_abs_err = max(row.max_abs_err, float(d.abs().max()) if d.numel() else 0.0)


def _in_scales(row: NodeError, err: torch.Tensor, scale_b: torch.Tensor) -> None:
    worst = float((err / scale_b).max()) if err.numel() else 0.0
    row.max_err_scales = worst if math.isnan(row.max_err_scales) else max(row.max_err_scales, worst)


# A value the quantizer clipped lies more than half a step (plus float32 roundoff) from its code.
_CLIP_SLACK = 1e-3


def compare(model: nn.Module, quantized: fx.GraphModule, batches: Iterable, *,
            threshold_db: float = DEFAULT_THRESHOLD_DB) -> CompareReport:
    """Run `model` in float and `quantized` (from qc.convert) on `batches`; one row per quantized node.

    `model` is the float nn.Module that was quantized, or the module qc.prepare returned (then the
    float graph is exactly the one calibrated, PTQ algorithms included). Neither is modified."""
    state = getattr(quantized, "meta", {}).get(STATE) if isinstance(quantized, fx.GraphModule) else None
    if state is None or state.stage != "quantized":
        raise InvalidModelError("compare's second argument is the module qc.convert returned, "
                                f"got {type(quantized).__name__}")
    batches = list(batches)
    if not batches:
        raise InvalidInputsError("compare got no batches; pass a non-empty iterable of inputs")
    fgm, observers = float_graph(model, quantized, batches[0])
    fnodes = {n.name: n for n in fgm.graph.nodes}
    plan = _plan(quantized, fnodes)
    q_keep = {node.name for _, kind, node, _ in plan}
    q_args = {node.name for _, kind, node, _ in plan if kind in ("activation", "weight")}
    f_keep = {f for *_, f in plan if f is not None}
    deq_of = {node.name: next((u for u in node.users if u.target == qops.dequantize.default), None)
              for _, kind, node, _ in plan if kind == "activation"}
    q_keep |= {d.name for d in deq_of.values() if d is not None}
    output = NodeError("output", "output", "", "output")
    with torch.no_grad():
        for i, batch in enumerate(batches):
            _run_batch(quantized, fgm, plan, batch, i, q_keep, q_args, f_keep, observers, deq_of, output)
    return CompareReport([row for row, *_ in plan], len(batches), output, threshold_db)


def _run_batch(quantized, fgm, plan, batch, i, q_keep, q_args, f_keep, observers, deq_of, output) -> None:
    flat_q = flatten_batch(quantized, batch, i)
    flat_f = flatten_batch(fgm, batch, i)
    qrec = _Recorder(quantized, q_keep, q_args)
    frec = _Recorder(fgm, f_keep, observers=observers)
    with torch.no_grad():
        q_out = qrec.run(*flat_q)
        f_out = frec.run(*flat_f)
    for row, kind, node, fname in plan:
        f = _tensor(frec.values.get(fname)) if fname else None
        if kind == "op":
            q = _tensor(qrec.values[node.name])
            if q is not None:
                row.numel += q.numel()
                _accumulate(row, q, f)
            continue
        if kind == "activation":
            x, scale, zp, axis, block, qmin, qmax, _ = qrec.args[node.name]
            deq = deq_of[node.name]
            dq = (qrec.values[deq.name] if deq is not None else
                  dequantize_math(qrec.values[node.name], scale, zp, axis, block, torch.float32))
            local_ref = x
        else:
            codes, scale, zp, axis, block, _ = qrec.args[node.name]
            dq = qrec.values[node.name]
            local_ref = f
        s_b = broadcast_param(scale.float(), dq, axis, block)
        row.numel += dq.numel()
        if local_ref is not None and local_ref.shape == dq.shape:
            local = (dq.double() - local_ref.double()).abs()
            row.clipped += int((local > s_b.double() * (0.5 + _CLIP_SLACK)).sum())
        if f is not None and f.shape == dq.shape:
            _accumulate(row, dq, f)
            _in_scales(row, (dq.double() - f.double()).abs(), s_b.double())
    for q, f in zip(torch.utils._pytree.tree_leaves(q_out), torch.utils._pytree.tree_leaves(f_out)):
        if isinstance(q, torch.Tensor) and isinstance(f, torch.Tensor) and q.is_floating_point():
            output.numel += q.numel()
            _accumulate(output, q, f)
