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

import inspect as _inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import fx

from ...capture import normalize_inputs
from ...errors import InvalidInputsError
from ...numerics import _broadcast_param, dequantize_math
from .export import FX_NODE_KEY, ExportError

qops = torch.ops.qcompile
DEFAULT_THRESHOLD = 0.01   # a tensor diverges when more than 1% of its codes differ


def ort_session(model: "str | os.PathLike | bytes | onnx.ModelProto", threads: int = 2, providers=None,
                optimization_level=None):
    """An onnxruntime InferenceSession: `threads` intra-op threads that do not spin when idle (a
    spinning pool takes the cores from PyTorch running in the same process), the CPU provider
    unless `providers` are given."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if optimization_level is not None:
        options.graph_optimization_level = optimization_level
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = os.fspath(model)
    return ort.InferenceSession(model, options, providers=providers or ["CPUExecutionProvider"])


def flatten_batch(gm: fx.GraphModule, batch: Any, index: int = 0) -> list:
    """A batch (tensor, tuple or dict) as the flat list of placeholder values of `gm`."""
    args, kwargs = normalize_inputs(batch, what=f"batch {index}")
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        return list(args)
    try:
        return list(torch.fx._pytree.tree_flatten_spec((args, kwargs), spec))
    except Exception:
        pass
    try:  # positional where the capture had keywords, or the other way round
        given = _inspect.signature(gm.forward).bind(*args, **kwargs).arguments
        args_spec, kwargs_spec = spec.children()
        names = list(given)
        captured_args = tuple(given[n] for n in names[:args_spec.num_children])
        captured_kwargs = {k: given[k] for k in kwargs_spec.context}
        return list(torch.fx._pytree.tree_flatten_spec((captured_args, captured_kwargs), spec))
    except Exception as e:
        raise InvalidInputsError(f"batch {index} does not match the model's arguments: {e}. "
                                 "Give batches structured like the example inputs") from e


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
    numel: int = 0
    equal: int = 0
    off_by_one: int = 0
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

    @property
    def first_divergence(self) -> TensorReport | None:
        """The first tensor (topological order) whose codes differ on more than `threshold` of elements."""
        return next((t for t in self.tensors if 1.0 - t.equal_fraction > self.threshold), None)

    @property
    def min_equal_fraction(self) -> float:
        return min((t.equal_fraction for t in self.tensors), default=1.0)

    def __getitem__(self, name: str) -> TensorReport:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def __str__(self) -> str:
        head = ("tensor", "quantizes", "dtype", "granularity", "elements", "equal %", "off-by-1 %", "max diff", "SQNR dB")
        rows = [(t.name, t.source, t.dtype, t.granularity, str(t.numel), f"{100 * t.equal_fraction:.3f}",
                 f"{100 * t.off_by_one_fraction:.3f}", str(t.max_diff), _db(t.sqnr_db)) for t in self.tensors]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        lines = [f"qcompile verify: reference QDQ graph vs onnxruntime ({', '.join(self.providers) or 'CPU'}), "
                 f"{self.batches} batch(es), {len(self.tensors)} quantized tensors"]
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        lines.append("  ".join("-" * w for w in widths))
        first = self.first_divergence
        for t, r in zip(self.tensors, rows):
            mark = "  <- first divergence" if t is first else ""
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + mark)
        for o in self.outputs:
            lines.append(f"output {o.name}: max |ort - reference| = {o.max_abs_diff:.4g}, SQNR {_db(o.sqnr_db)} dB")
        if first is None:
            lines.append(f"no divergence: every tensor has codes equal on >= {100 * (1 - self.threshold):.2f}% "
                         "of elements (off-by-one codes come from rounding ties and float summation order)")
        else:
            lines.append(f"first divergence: {first.name} (quantizes {first.source}): "
                         f"{100 * (1 - first.equal_fraction):.2f}% of codes differ, max by {first.max_diff}")
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
    t = x.detach().float() / _broadcast_param(scale.float(), x, axis, block)
    return (t - torch.floor(t) - 0.5).abs()


def _granularity(node: fx.Node) -> str:
    scale, x = node.args[1], node.args[0]
    s_val = scale.meta.get("val") if isinstance(scale, fx.Node) else None
    x_val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(s_val, torch.Tensor) or s_val.ndim == 0:
        return "per tensor"
    if s_val.ndim == 1:
        return f"per channel (axis {node.args[3]})"
    if isinstance(x_val, torch.Tensor) and s_val.shape[-1] == 1 and node.args[4] == x_val.shape[-1]:
        return "per token"
    return f"blocked ({node.args[4]} along axis {node.args[3]})"


def _onnx_value_names(model: ir.Model, fx_names: list[str]) -> dict[str, ir.Value]:
    by_name, by_meta = {}, {}
    for node in model.graph:
        for out in node.outputs:
            by_name[out.name] = out
        tag = node.metadata_props.get(FX_NODE_KEY)
        if tag is not None and node.outputs:
            by_meta.setdefault(tag, []).append(node.outputs[0])
    found = {}
    for name in fx_names:
        if name in by_name:
            found[name] = by_name[name]
        elif len(by_meta.get(name, ())) == 1:
            found[name] = by_meta[name][0]
    return found


def verify(quantized: fx.GraphModule, onnx_path: "str | os.PathLike | onnx.ModelProto", batches: Iterable, *,
           threshold: float = DEFAULT_THRESHOLD, providers=None, threads: int = 2,
           optimization_level=None) -> VerifyReport:
    """Compare onnxruntime with the reference graph on `batches`, quantized tensor by quantized tensor.

    `optimization_level` (an `onnxruntime.GraphOptimizationLevel`) defaults to onnxruntime's own
    default, ORT_ENABLE_ALL, which fuses Q/DQ into integer kernels: that is what a deployment runs.
    ORT_DISABLE_ALL runs the QDQ graph op for op in float, the closest to the reference graph.
    """
    q_nodes = [n for n in quantized.graph.nodes if n.op == "call_function" and n.target == qops.quantize.default]
    proto = onnx_path if isinstance(onnx_path, onnx.ModelProto) else onnx.load(os.fspath(onnx_path))
    model = ir.serde.deserialize_model(proto)
    values = _onnx_value_names(model, [n.name for n in q_nodes])
    missing = [n.name for n in q_nodes if n.name not in values]
    if missing:
        raise ExportError(f"the ONNX model has no tensor for the quantize nodes {missing[:5]}"
                          f"{' ...' if len(missing) > 5 else ''}; verify needs a file written by qc.export_onnx "
                          "from this quantized module")
    n_outputs = len(model.graph.outputs)
    output_names = [v.name for v in model.graph.outputs]
    for n in q_nodes:
        if not values[n.name].is_graph_output():
            model.graph.outputs.append(values[n.name])
    probe_names = [v.name for v in model.graph.outputs]
    session = ort_session(ir.serde.serialize_model(model), threads=threads, providers=providers,
                          optimization_level=optimization_level)

    tensors = {n.name: TensorReport(n.name, n.args[0].name, str(n.args[7]).replace("torch.", ""), _granularity(n))
               for n in q_nodes}
    outputs = [OutputReport(name) for name in output_names]
    count = 0
    for i, batch in enumerate(batches):
        recorder = _Recorder(quantized, set(tensors))
        flat = flatten_batch(quantized, batch, i)
        with torch.no_grad():
            ref_out = recorder.run(*flat)
        ort_out = session.run(probe_names, ort_feeds(session, quantized, batch, i))
        ort_by_name = dict(zip(probe_names, ort_out))
        for n in q_nodes:
            codes, scale, zp, axis, block = recorder.seen[n.name]
            got = torch.from_numpy(np.asarray(ort_by_name[values[n.name].name]))
            _accumulate(tensors[n.name], codes, got, scale, zp, axis, block)
        ref_flat = [t for t in torch.utils._pytree.tree_leaves(ref_out) if isinstance(t, torch.Tensor)]
        for o, ref, got in zip(outputs, ref_flat, ort_out[:n_outputs]):
            ref = ref.detach().double()
            got = torch.from_numpy(np.asarray(got)).double().reshape(ref.shape)
            o.max_abs_diff = max(o.max_abs_diff, float((ref - got).abs().max()) if ref.numel() else 0.0)
            o.signal += float((ref * ref).sum())
            o.noise += float(((ref - got) ** 2).sum())
        count += 1
    if count == 0:
        raise InvalidInputsError("verify got no batches; pass a non-empty iterable of inputs")
    return VerifyReport([tensors[n.name] for n in q_nodes], outputs, count, threshold,
                        list(session.get_providers()))


def _accumulate(row: TensorReport, ref: torch.Tensor, got: torch.Tensor, scale, zp, axis, block) -> None:
    if got.shape != ref.shape:
        got = got.reshape(ref.shape)
    diff = (ref.to(torch.int32) - got.to(torch.int32)).abs()
    row.numel += ref.numel()
    row.equal += int((diff == 0).sum())
    row.off_by_one += int((diff == 1).sum())
    row.max_diff = max(row.max_diff, int(diff.max()) if diff.numel() else 0)
    a = dequantize_math(ref, scale, zp, axis, block, torch.float32).double()
    b = dequantize_math(got.to(ref.dtype), scale, zp, axis, block, torch.float32).double()
    row.signal += float((a * a).sum())
    row.noise += float(((a - b) ** 2).sum())
