"""Simulation vs deployment: run the reference QDQ graph and the ONNX file in onnxruntime on the
same batches and compare every quantized tensor (the output of each quantize op), in
topological order.

The ONNX value of a quantize op carries the reference FX node's name (`export.rename_to_fx_names`;
`metadata_props["qcompile.fx_node"]` as a fallback), so a copy of the model can expose those
values as extra graph outputs. Codes are compared as integers; both code tensors are also
dequantized with the reference graph's qparams, so the SQNR says how much the difference costs in
value terms.
"""
from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import fx

from ...capture import flatten_for_graph, normalize_inputs
from ...errors import ExportError, InvalidInputsError, QCompileError
from ...numerics import broadcast_param, dequantize_math
from .export import FX_NODE_KEY

qops = torch.ops.qcompile
DEFAULT_THRESHOLD = 0.01   # a tensor diverges when more than 1% of its codes differ


def ort_session(model: "str | os.PathLike | bytes | onnx.ModelProto", threads: int = 2, providers=None,
                optimization_level=None, config: dict[str, str] | None = None, disabled_optimizers=()):
    """An onnxruntime InferenceSession: `threads` intra-op threads that do not spin when idle (a
    spinning pool takes the cores from PyTorch running in the same process), the execution
    providers chosen by `providers.choose_providers` ("cpu" by default, "auto", "cuda",
    "tensorrt" or a list of provider names), and extra session `config` entries, e.g.
    {"session.qdq_matmulnbits_accuracy_level": "1"}: onnxruntime rewrites DequantizeLinear(weight)
    -> MatMul into MatMulNBits, which by default (level 4) quantizes the float activations again
    to int8 in blocks of 32; a float activation path (weight-only, per-token dynamic) then differs
    from the reference graph by more than rounding (measured on MiniLM w8a8-dynamic: cosine to the
    reference 0.9976 at level 4, 0.9997 at level 1, about 30% slower).

    `disabled_optimizers` names onnxruntime graph transformers to skip, e.g.
    ["SkipLayerNormFusion"]: its fused Add + LayerNorm kernel was 10-15% slower than the two ops on
    this machine's CPU (AMD EPYC, AVX-512; all-MiniLM-L6-v2 batch 8, FP32 and QDQ files alike,
    benchmarks/onnx_runtime.py). A hardware-dependent choice, so not a default."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise QCompileError("running ONNX files needs onnxruntime: pip install 'qcompile[cpu]' (onnxruntime), or "
                            "'qcompile[gpu]' (onnxruntime-gpu, with CUDA 12 and cuDNN 9); qc.export_onnx works "
                            "without it") from e

    from .providers import choose_providers

    providers = choose_providers(providers, ort.get_available_providers())
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if optimization_level is not None:
        options.graph_optimization_level = optimization_level
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, str(value))
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = os.fspath(model)
    return ort.InferenceSession(model, options, providers=providers, disabled_optimizers=list(disabled_optimizers))


def flatten_batch(gm: fx.GraphModule, batch: Any, index: int = 0) -> list:
    """A batch (tensor, tuple or dict) as the flat list of placeholder values of `gm`."""
    args, kwargs = normalize_inputs(batch, what=f"batch {index}")
    try:
        return flatten_for_graph(gm, args, kwargs)
    except InvalidInputsError as e:
        raise InvalidInputsError(f"batch {index} does not match the model's arguments: {e}") from e


def ort_feeds(session, gm: fx.GraphModule, batch: Any, index: int = 0) -> dict[str, np.ndarray]:
    """onnxruntime feeds for a batch: the tensor placeholders, by name (by position as a fallback)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat = flatten_batch(gm, batch, index)
    by_name = {p.name: v for p, v in zip(placeholders, flat) if isinstance(v, torch.Tensor)}
    tensors = [v for v in flat if isinstance(v, torch.Tensor)]
    feeds = {}
    for i, inp in enumerate(session.get_inputs()):
        value = by_name.get(inp.name, tensors[i] if i < len(tensors) else None)
        if value is None:
            raise InvalidInputsError(f"no value in batch {index} for the ONNX input {inp.name!r}")
        feeds[inp.name] = value.detach().cpu().numpy()
    return feeds


def ort_run(session, gm: fx.GraphModule, batch: Any) -> list[np.ndarray]:
    """Run one batch through an onnxruntime session of `gm`'s ONNX export."""
    return session.run(None, ort_feeds(session, gm, batch))


# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------

@dataclass
class TensorReport:
    """One quantized tensor: the output of one quantize op of the reference graph."""

    name: str                 # FX node name in the reference graph (and ONNX value name)
    source: str               # the FX node it quantizes
    dtype: str
    granularity: str
    onnx_name: str = ""       # the ONNX value compared (shared when the exporter merged equal nodes)
    numel: int = 0
    equal: int = 0
    off_by_one: int = 0
    at_ties: int = 0          # differing elements whose reference x / s was within TIE_BAND of k + 0.5
    max_diff: int = 0
    signal: float = 0.0       # sum of squares of the reference dequantized values
    noise: float = 0.0        # sum of squared differences of the dequantized values

    @property
    def equal_fraction(self) -> float:
        return self.equal / self.numel if self.numel else 1.0

    @property
    def off_by_one_fraction(self) -> float:
        return self.off_by_one / self.numel if self.numel else 0.0

    @property
    def at_ties_fraction(self) -> float:
        return self.at_ties / self.numel if self.numel else 0.0

    @property
    def mismatch_fraction(self) -> float:
        """Elements whose codes differ for a reason other than an exact rounding tie."""
        return (self.numel - self.equal - self.at_ties) / self.numel if self.numel else 0.0

    @property
    def sqnr_db(self) -> float:
        """10 log10(signal / noise) of the dequantized values; inf when the codes are equal."""
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)


@dataclass
class OutputReport:
    name: str
    max_abs_diff: float = 0.0
    signal: float = 0.0
    noise: float = 0.0

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        return 10.0 * math.log10(self.signal / self.noise) if self.signal else -math.inf


@dataclass
class VerifyReport:
    """Per quantized tensor, in topological order: how often onnxruntime's codes equal the
    reference graph's, the largest code difference, the SQNR of the dequantized values."""

    tensors: list[TensorReport]
    outputs: list[OutputReport]
    batches: int
    threshold: float = DEFAULT_THRESHOLD
    providers: list[str] = field(default_factory=list)
    local: bool = True

    @property
    def first_divergence(self) -> TensorReport | None:
        """The first tensor (topological order) whose codes differ on more than `threshold` of its
        elements, not counting differences at exact rounding ties (both codes are then correct
        roundings of the same value; which one a runtime gets depends on float summation order)."""
        return next((t for t in self.tensors if t.mismatch_fraction > self.threshold), None)

    @property
    def min_equal_fraction(self) -> float:
        return min((t.equal_fraction for t in self.tensors), default=1.0)

    def __getitem__(self, name: str) -> TensorReport:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def __str__(self) -> str:
        head = ("tensor", "quantizes", "dtype", "granularity", "elements", "equal %", "off-by-1 %", "at ties %",
                "max diff", "SQNR dB")
        rows = [(t.name if t.onnx_name in ("", t.name) else f"{t.name} (= {t.onnx_name})", t.source, t.dtype,
                 t.granularity, str(t.numel), f"{100 * t.equal_fraction:.3f}", f"{100 * t.off_by_one_fraction:.3f}", f"{100 * t.at_ties_fraction:.3f}", str(t.max_diff),
                 _db(t.sqnr_db)) for t in self.tensors]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        mode = ("local: the reference runs on onnxruntime's codes, each row is one segment's own difference"
                if self.local else "end to end: differences accumulate downstream")
        lines = [f"qcompile verify: reference QDQ graph vs onnxruntime ({', '.join(self.providers) or 'CPU'}), "
                 f"{self.batches} batch(es), {len(self.tensors)} quantized tensors; {mode}"]
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        lines.append("  ".join("-" * w for w in widths))
        first = self.first_divergence
        for t, r in zip(self.tensors, rows):
            mark = "  <- first divergence" if t is first else ""
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + mark)
        for o in self.outputs:
            lines.append(f"output {o.name}: max |ort - reference| = {o.max_abs_diff:.4g}, SQNR {_db(o.sqnr_db)} dB")
        if first is None:
            lines.append(f"no divergence: in every tensor at most {100 * self.threshold:.2f}% of codes differ "
                         "other than at exact rounding ties (x / s = k + 0.5, where float summation order "
                         "decides; other off-by-one codes come from requantization in fused integer kernels)")
        else:
            lines.append(f"first divergence: {first.name} (quantizes {first.source}): "
                         f"{100 * first.mismatch_fraction:.2f}% of codes differ away from rounding ties, "
                         f"max by {first.max_diff}")
        return "\n".join(lines)


def _db(x: float) -> str:
    return "inf" if math.isinf(x) and x > 0 else f"{x:.1f}"


# --------------------------------------------------------------------------------------------------
# running both
# --------------------------------------------------------------------------------------------------

class _Recorder(fx.Interpreter):
    """Runs the reference graph and keeps, per quantize op, its codes, its qparams and how far from a
    rounding tie each element was. With `forced` (name -> codes), the op's output is replaced by
    those codes after recording, so what follows runs on onnxruntime's codes."""

    def __init__(self, gm: fx.GraphModule, names: set[str], forced: dict[str, torch.Tensor] | None = None):
        super().__init__(gm)
        self.names = names
        self.forced = forced
        self.seen: dict[str, tuple] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.names:
            x, scale, zp, axis, block, *_ = self.fetch_args_kwargs_from_env(n)[0]
            self.seen[n.name] = (out, scale, zp, axis, block, _tie_distance(x, scale, axis, block))
            if self.forced is not None:
                out = self.forced[n.name].reshape(out.shape).to(out.dtype)
        return out


def _tie_distance(x: torch.Tensor, scale: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    """|frac(x / s) - 0.5|: 0 where the reference rounded an exact tie."""
    t = x.detach().float() / broadcast_param(scale.float(), x, axis, block)
    return (t - torch.floor(t) - 0.5).abs()


def _granularity(node: fx.Node) -> str:
    x, scale, axis, block = node.args[0], node.args[1], node.args[3], node.args[4]
    if isinstance(scale, fx.Node) and scale.target is operator.getitem and \
            getattr(scale.args[0], "target", None) == qops.choose_qparams_per_token.default:
        return "per token (dynamic)"
    s_val = scale.meta.get("val") if isinstance(scale, fx.Node) else None
    x_val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(s_val, torch.Tensor) or s_val.ndim == 0 or s_val.numel() == 1:
        return "per tensor"
    if s_val.ndim == 1:
        return f"per channel (axis {axis})"
    if isinstance(x_val, torch.Tensor) and s_val.shape[-1] == 1 and block == x_val.shape[-1]:
        return "per token"
    return f"blocked ({block} along axis {axis})"


def _same_computation(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """node -> the first node computing the same thing, for qcompile ops and what feeds them: the
    exporter's common-subexpression elimination merges such nodes (e.g. the per-token quantization
    of one tensor for the q, k and v projections) into one ONNX value."""
    rep: dict[fx.Node, fx.Node] = {}
    seen: dict[tuple, fx.Node] = {}
    mergeable = (qops.quantize.default, qops.dequantize.default, qops.choose_qparams_per_token.default,
                 operator.getitem)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            key = ("get_attr", node.target)
        elif node.op == "call_function" and node.target in mergeable:
            args = tuple(rep.get(a, a) if isinstance(a, fx.Node) else a for a in node.args)
            key = (node.target, args, tuple(sorted(node.kwargs.items())))
        else:
            rep[node] = node
            continue
        try:
            rep[node] = seen.setdefault(key, node)
        except TypeError:  # an unhashable argument
            rep[node] = node
    return rep


def _onnx_value_names(model: ir.Model, q_nodes: list[fx.Node], gm: fx.GraphModule) -> dict[str, ir.Value]:
    """FX quantize node name -> the ONNX value holding its codes."""
    by_name, by_meta = {}, {}
    for node in model.graph:
        for out in node.outputs:
            by_name[out.name] = out
        tag = node.metadata_props.get(FX_NODE_KEY)
        if tag is not None and node.outputs:
            by_meta.setdefault(tag, []).append(node.outputs[0])

    def lookup(name):
        if name in by_name:
            return by_name[name]
        return by_meta[name][0] if len(by_meta.get(name, ())) == 1 else None

    rep = _same_computation(gm)
    classes: dict[fx.Node, list[fx.Node]] = {}
    for n in q_nodes:
        classes.setdefault(rep[n], []).append(n)
    found = {}
    for members in classes.values():
        value = next((v for v in map(lookup, (m.name for m in members)) if v is not None), None)
        if value is not None:
            found.update({m.name: value for m in members})
    return found


def verify(quantized: fx.GraphModule, onnx_path: "str | os.PathLike | onnx.ModelProto", batches: Iterable, *,
           threshold: float = DEFAULT_THRESHOLD, local: bool = True, providers=None, threads: int = 2,
           optimization_level=None, config: dict[str, str] | None = None) -> VerifyReport:
    """Compare onnxruntime with the reference graph on `batches`, quantized tensor by quantized tensor.

    - `local=True`: the reference graph runs on onnxruntime's codes (each quantize op's output is
      replaced by onnxruntime's after the comparison), so a row shows what that segment of the graph
      does differently, and a bug shows up where it is, not everywhere downstream. `local=False`
      runs the two graphs side by side and differences accumulate. The outputs are always
      compared end to end.
    - `threshold`: `first_divergence` is the first tensor with more than this fraction of codes
      differing away from exact rounding ties.
    - `optimization_level` (an `onnxruntime.GraphOptimizationLevel`): None keeps onnxruntime's
      default, ORT_ENABLE_ALL, which fuses Q/DQ into integer kernels, as a deployment runs;
      ORT_DISABLE_ALL runs the QDQ graph op by op in float, the closest to the reference.
      `config`: extra onnxruntime session config entries (see `ort_session`).
    """
    q_nodes = [n for n in quantized.graph.nodes if n.op == "call_function" and n.target == qops.quantize.default]
    proto = onnx_path if isinstance(onnx_path, onnx.ModelProto) else onnx.load(os.fspath(onnx_path))
    model = ir.serde.deserialize_model(proto)
    values = _onnx_value_names(model, q_nodes, quantized)
    missing = [n.name for n in q_nodes if n.name not in values]
    if missing:
        raise ExportError(f"the ONNX model has no tensor for the quantize nodes {missing[:5]}"
                          f"{' ...' if len(missing) > 5 else ''}; verify needs a file written by qc.export_onnx "
                          "from this quantized module")
    output_names = [v.name for v in model.graph.outputs]
    for n in q_nodes:
        if not values[n.name].is_graph_output():
            model.graph.outputs.append(values[n.name])  # a value shared by merged nodes is added once
    probe_names = [v.name for v in model.graph.outputs]
    session = ort_session(ir.serde.serialize_model(model), threads=threads, providers=providers,
                          optimization_level=optimization_level, config=config)

    tensors = {n.name: TensorReport(n.name, n.args[0].name, str(n.args[7]).replace("torch.", ""), _granularity(n),
                                    onnx_name=values[n.name].name) for n in q_nodes}
    outputs = [OutputReport(name) for name in output_names]
    names = set(tensors)
    count = 0
    for i, batch in enumerate(batches):
        flat = flatten_batch(quantized, batch, i)
        got = dict(zip(probe_names, session.run(probe_names, ort_feeds(session, quantized, batch, i))))
        ort_codes = {n.name: torch.from_numpy(np.asarray(got[values[n.name].name])) for n in q_nodes}
        with torch.no_grad():
            plain = _Recorder(quantized, names)
            ref_out = plain.run(*flat)
            recorder = _Recorder(quantized, names, forced=ort_codes) if local else plain
            if local:
                recorder.run(*flat)
        for n in q_nodes:
            _accumulate(tensors[n.name], ort_codes[n.name], *recorder.seen[n.name])
        ref_flat = [t for t in torch.utils._pytree.tree_leaves(ref_out) if isinstance(t, torch.Tensor)]
        for o, ref in zip(outputs, ref_flat):
            ref = ref.detach().double()
            out = torch.from_numpy(np.asarray(got[o.name])).double().reshape(ref.shape)
            o.max_abs_diff = max(o.max_abs_diff, float((ref - out).abs().max()) if ref.numel() else 0.0)
            o.signal += float((ref * ref).sum())
            o.noise += float(((ref - out) ** 2).sum())
        count += 1
    if count == 0:
        raise InvalidInputsError("verify got no batches; pass a non-empty iterable of inputs")
    return VerifyReport([tensors[n.name] for n in q_nodes], outputs, count, threshold,
                        list(session.get_providers()), local)


TIE_BAND = 1e-3   # |frac(x / s) - 0.5| below this counts as an exact rounding tie


def _accumulate(row: TensorReport, got: torch.Tensor, ref: torch.Tensor, scale, zp, axis, block, tie) -> None:
    got = got.reshape(ref.shape)
    diff = (ref.to(torch.int32) - got.to(torch.int32)).abs()
    row.numel += ref.numel()
    row.equal += int((diff == 0).sum())
    row.off_by_one += int((diff == 1).sum())
    row.at_ties += int(((diff == 1) & (tie.reshape(diff.shape) < TIE_BAND)).sum())
    row.max_diff = max(row.max_diff, int(diff.max()) if diff.numel() else 0)
    a = dequantize_math(ref, scale, zp, axis, block, torch.float32).double()
    b = dequantize_math(got.to(ref.dtype), scale, zp, axis, block, torch.float32).double()
    row.signal += float((a * a).sum())
    row.noise += float(((a - b) ** 2).sum())
