"""Write the reference QDQ graph as standard QDQ ONNX through `torch.onnx.export(dynamo=True)`.

No hand-written FX-to-ONNX converter: the quantized GraphModule is exported again by
`torch.export`, where qcompile's ops stay opaque custom ops (so the exporter cannot decompose
them into Mul/Round/Clip, pytorch/pytorch#127167), and `translations.translation_table` turns
each into `QuantizeLinear` / `DequantizeLinear`. Then a few small rewrites of the ONNX IR:

1. names: the ONNX value (and its producing node) of every qcompile op takes the name of the
   reference graph's FX node (`quantize_default_3`), so `verify` and a reader of the file can
   match the two; the FX name also goes into the node's `metadata_props["qcompile.fx_node"]`.
2. `fold_constant_casts`: `Cast(initializer)` becomes an initializer, so the int32 zero points of
   the reference graph are stored as int8/uint8 (the exporter's own folding stops at 8192 elements).
3. INT4 weights (opset 21): weights whose spec is int4 are held one code per int8 in the reference
   graph; here they become INT4 initializers (two codes per byte) with INT4 zero points, read by a
   blocked `DequantizeLinear`.

Opset: 20 unless something needs more (torch's default; `aten.gelu` becomes the `Gelu` op only
from 20, earlier opsets write it as Erf arithmetic); 21 when a scale is blocked (per group,
per token) or a weight is int4. Opsets below 18 are refused: the exporter's translations start
at 18 and it would run a lossy version conversion afterwards.
"""
from __future__ import annotations

import contextlib
import inspect as _inspect
import logging
import os
import warnings
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import fx

from ...capture import normalize_inputs
from ...errors import ExportError
from ...graph import STATE
from ...targets import ONNX_TARGETS
from .targets import bias_rows_for_qdq_fusion, check_target, dedicated_qdq_per_consumer, weight_dq_per_consumer
from .translations import BLOCKED_MIN_OPSET, TranslationError, translation_table

qops = torch.ops.qcompile
QDQ_OPS = (qops.quantize.default, qops.dequantize.default, qops.choose_qparams_per_token.default)
FX_NODE_KEY = "qcompile.fx_node"           # ONNX node metadata_props: the reference graph's FX node
_CUSTOM_KEY = "qcompile_fx_node"           # FX node.meta["custom"] key, carried by torch.export
DEFAULT_OPSET = 20
MIN_OPSET, MAX_OPSET = 18, 23


# --------------------------------------------------------------------------------------------------
# what the graph needs
# --------------------------------------------------------------------------------------------------

def _val(node) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_blocked(node: fx.Node) -> bool:
    x, scale = _val(node.args[0]), _val(node.args[1])
    if isinstance(scale, torch.Tensor) and isinstance(x, torch.Tensor):
        return scale.ndim == x.ndim and x.ndim > 1
    # choose_qparams_per_token scales are [..., 1]: blocked per token
    src = node.args[1]
    return isinstance(src, fx.Node) and src.op == "call_function" and src.args and \
        isinstance(src.args[0], fx.Node) and src.args[0].target == qops.choose_qparams_per_token.default


def int4_weights(quantized: fx.GraphModule) -> set[str]:
    """Attribute names of the integer weights whose spec is int4 (held one code per int8)."""
    state = quantized.meta.get(STATE)
    int4_consumers = set()
    for row in getattr(state, "qparams", []) or []:
        spec = row.get("spec")
        if row.get("kind") == "weight" and spec is not None and getattr(spec, "bits", 8) == 4:
            int4_consumers.update(member[1] for member in row.get("members", ()))
    names = set()
    for node in quantized.graph.nodes:
        if node.target == qops.dequantize.default and node.args[0].op == "get_attr":
            if any(user.name in int4_consumers for user in node.users):
                names.add(node.args[0].target)
    return names


def required_opset(quantized: fx.GraphModule) -> int:
    """The lowest opset that holds the graph: 21 for blocked scales or int4 weights, else 20."""
    blocked = any(n.target in (qops.quantize.default, qops.dequantize.default) and _is_blocked(n)
                  for n in quantized.graph.nodes)
    return BLOCKED_MIN_OPSET if blocked or int4_weights(quantized) else DEFAULT_OPSET


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------

def _hint(d) -> int:
    if isinstance(d, int):
        return d
    hint = getattr(getattr(d, "node", None), "hint", None)
    if hint is None:
        raise ExportError("a placeholder has a symbolic size without a hint; pass example_inputs to export_onnx")
    return int(hint)


def example_inputs_from_meta(quantized: fx.GraphModule) -> tuple[tuple, dict]:
    """(args, kwargs) built from the placeholders' meta["val"] (the shapes and dtypes captured):
    zeros for floating inputs, ones for integer inputs (token ids, attention masks). Only the shapes
    and dtypes matter to the exporter."""
    flat = []
    for node in quantized.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            shape = [_hint(d) for d in val.shape]
            make = torch.zeros if val.is_floating_point() else torch.ones
            flat.append(make(shape, dtype=val.dtype))
        elif isinstance(val, (int, float, bool)) or val is None:
            flat.append(val)
        else:
            raise ExportError(f"cannot make an example for input {node.name!r} ({type(val).__name__}); "
                              "pass example_inputs to export_onnx")
    spec = getattr(quantized, "_in_spec", None)
    if spec is None:
        return tuple(flat), {}
    args, kwargs = torch.utils._pytree.tree_unflatten(flat, spec)
    return tuple(args), dict(kwargs)


def dynamic_shapes_from_meta(quantized: fx.GraphModule):
    """The dims captured as symbolic (prepare(..., dynamic_shapes=...)) as torch.export dynamic
    shapes, keyed by argument name; None when the capture was static."""
    specs, dynamic = [], False
    for node in quantized.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        dims = {i: torch.export.Dim.DYNAMIC for i, d in enumerate(getattr(val, "shape", ()))
                if not isinstance(d, int)}
        dynamic |= bool(dims)
        specs.append(dims or None)
    spec = getattr(quantized, "_in_spec", None)
    if not dynamic or spec is None:
        return None
    args, kwargs = torch.utils._pytree.tree_unflatten(specs, spec)
    names = list(_inspect.signature(quantized.forward).parameters)
    if len(names) < len(args):
        return None
    return {**dict(zip(names, args)), **kwargs}


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _tagged(quantized: fx.GraphModule):
    """Tag qcompile op nodes with their FX name in meta["custom"], which torch.export carries to the
    nodes it re-traces (and the ONNX exporter to `ir_node.meta["node"]`); untag afterwards."""
    tagged = []
    for node in quantized.graph.nodes:
        if node.target in QDQ_OPS:
            custom = node.meta.setdefault("custom", {})
            custom[_CUSTOM_KEY] = node.name
            tagged.append(node)
    try:
        yield
    finally:
        for node in tagged:
            node.meta["custom"].pop(_CUSTOM_KEY, None)
            if not node.meta["custom"]:
                del node.meta["custom"]


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress lines, warns that torchvision is missing, and its constant folder
    logs shape evaluations it gives up on (harmless); keep the user's console clean. Errors still raise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript.optimizer._constant_folding")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as devnull, \
                contextlib.redirect_stdout(devnull):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(quantized: fx.GraphModule, path: "str | os.PathLike | None", example_inputs: Any = None, *,
                opset: int | None = None, dynamic_shapes=None, target: str | None = None) -> onnx.ModelProto:
    """Export the reference QDQ graph `quantized` (what `qc.convert` returns) to QDQ ONNX at `path`.

    - `example_inputs`: as for `prepare` (a tensor, a tuple, a dict). When None they are made from
      the shapes and dtypes the graph was captured with (placeholder meta["val"]).
    - `opset`: None picks the lowest that holds the graph (`required_opset`); a lower one is refused.
    - `target`: the Q/DQ placement profile, "ort-cpu" or "tensorrt" (see targets.py); None takes
      the one given to `prepare(target=...)`, else "ort-cpu".
    - `dynamic_shapes`: None (default) keeps the dims that `prepare` captured as dynamic
      (`dynamic_shapes_from_meta`: the batch, by default); False writes every dim static, at the
      shapes of `example_inputs` (or of the capture); else a spec as for `torch.export.export`.
      A static capture bakes its sizes into reshapes: prepare with `dynamic_shapes=` to export
      dims that prepare did not capture as dynamic.

    The model is checked with `onnx.checker.check_model(full_check=True)`, saved to `path` (unless
    None) and returned.
    """
    state = getattr(quantized, "meta", {}).get(STATE) if isinstance(quantized, fx.GraphModule) else None
    if state is None or state.stage != "quantized":
        raise ExportError("export_onnx takes the module qc.convert returned (the reference QDQ graph); "
                          f"got {type(quantized).__name__}" + (f" at stage {state.stage!r}" if state else ""))
    # a torch-cpu module exported anyway gets the default placement
    target = target or (state.target if state.target in ONNX_TARGETS else None) or "ort-cpu"
    if state.precision:  # bf16/fp16 casts need nothing new; FP8 casts need opset 21's float8 types
        needed = BLOCKED_MIN_OPSET if state.recipe.fp8 else DEFAULT_OPSET
    else:
        check_target(quantized, target)
        needed = required_opset(quantized)
    if opset is None:
        opset = needed
    elif not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is outside what this exporter writes ({MIN_OPSET}..{MAX_OPSET})")
    elif opset < needed:
        raise ExportError(f"this graph needs ONNX opset >= {needed} (blocked scales or int4 weights: "
                          f"QuantizeLinear/DequantizeLinear block_size and INT4 tensors); got opset={opset}")
    if dynamic_shapes is False:
        dynamic_shapes = None
    elif dynamic_shapes is None:
        dynamic_shapes = dynamic_shapes_from_meta(quantized)
    if example_inputs is None:
        args, kwargs = example_inputs_from_meta(quantized)
    else:
        args, kwargs = normalize_inputs(example_inputs)

    try:
        with _tagged(quantized), _quiet_exporter():
            program = torch.onnx.export(
                quantized, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                custom_translation_table=translation_table(opset), dynamic_shapes=dynamic_shapes,
                optimize=True, verbose=False)
    except Exception as e:
        cause = e
        while cause.__cause__ is not None and not isinstance(cause, TranslationError):
            cause = cause.__cause__
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        hint = ""
        sdpa = [n.name for n in quantized.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
        if sdpa:
            # measured on T5: torch.export dropped a `.contiguous()` after SDPA (its fake output was
            # already laid out that way); the exporter's decomposition of SDPA is laid out otherwise,
            # and the following view fails. Eager attention has no SDPA node and exports.
            hint = (f" Hint: the graph holds {len(sdpa)} scaled_dot_product_attention node(s) (e.g. {sdpa[0]}), "
                    "which the dynamo exporter fails on for some models; load the model with eager attention "
                    "(transformers: from_pretrained(..., attn_implementation='eager'), or "
                    "config._attn_implementation = 'eager') and prepare again.")
        elif dynamic_shapes is not None and any(w in str(e).lower() for w in ("constraint", "specializ", "dynamic")):
            hint = (" Hint: dims that were static when qc.prepare captured the model cannot be made dynamic "
                    "here; pass dynamic_shapes= to qc.prepare and convert again.")
        raise ExportError(f"torch.onnx.export failed: {type(cause).__name__}: {first}.{hint}") from e

    model = program.model
    rename_to_fx_names(model)
    for node in model.graph:  # they point into the GraphModule's generated code, not the user's
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)
    fold_constant_casts(model)
    if opset >= BLOCKED_MIN_OPSET:
        to_int4(model, int4_weights(quantized))
    weight_dq_per_consumer(model)
    if target == "tensorrt":
        dedicated_qdq_per_consumer(model)
    else:
        bias_rows_for_qdq_fusion(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    proto = ir.serde.serialize_model(model)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:  # a bug in qcompile, not in the user's model
        raise ExportError(f"the exported model fails onnx.checker: {str(e).splitlines()[0]}") from e
    if path is not None:
        onnx.save_model(proto, os.fspath(path))
    return proto


# --------------------------------------------------------------------------------------------------
# ONNX IR rewrites
# --------------------------------------------------------------------------------------------------

def _fx_name(node: ir.Node) -> str | None:
    fx_node = node.meta.get("node")
    custom = getattr(fx_node, "meta", {}).get("custom") or {}
    return custom.get(_CUSTOM_KEY)


def rename_to_fx_names(model: ir.Model) -> int:
    """Give the ONNX value of each qcompile op the reference FX node's name. Returns the count."""
    taken = {v.name for v in model.graph.inputs} | {v.name for v in model.graph.outputs} | set(model.graph.initializers)
    for node in model.graph:
        taken.update(out.name for out in node.outputs if out.name)
    renamed = 0
    for node in model.graph:
        fx_name = _fx_name(node)
        if fx_name is None:
            continue
        node.metadata_props[FX_NODE_KEY] = fx_name
        source = node.meta["node"].name          # the exporter names the op's output after its FX node
        for i, out in enumerate(node.outputs):
            if out.name == source or out.name == f"{source}__{i}":
                new = fx_name if out.name == source else f"{fx_name}__{i}"
                if new in taken or out.is_graph_output():
                    continue
                taken.add(new)
                out.name = new
                node.name = f"node_{fx_name}"
                renamed += 1
    return renamed


def fold_constant_casts(model: ir.Model) -> int:
    """Replace every `Cast` of an initializer by a new initializer of the target dtype."""
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type != "Cast" or node.domain != "" or len(node.inputs) != 1:
            continue
        src = node.inputs[0]
        if src is None or src.const_value is None or src.is_graph_input():
            continue
        to = ir.DataType(node.attributes["to"].as_int())
        array = src.const_value.numpy()
        if to.is_floating_point() or array.dtype.kind == "f":
            continue  # only integer zero points: float casts round, keep them visible
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        value = ir.Value(name=_fresh(graph, f"{src.name}_{to.name.lower()}"), type=ir.TensorType(to),
                         shape=ir.Shape(array.shape), const_value=ir.tensor(array.astype(to.numpy()), dtype=to))
        graph.register_initializer(value)
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        folded += 1
    _drop_unused_initializers(graph)
    return folded


def to_int4(model: ir.Model, names: set[str]) -> int:
    """Store the int4 weights `names` (int8 initializers holding codes in [-8, 7]) as INT4, with INT4
    zero points, in every DequantizeLinear that reads them."""
    graph = model.graph
    converted = 0
    for name in names:
        value = graph.initializers.get(name)
        if value is None:
            continue
        codes = value.const_value.numpy()
        if codes.min(initial=0) < -8 or codes.max(initial=0) > 7:
            raise ExportError(f"weight {name} is marked int4 but holds codes outside [-8, 7]")
        uses = list(value.uses())
        graph.initializers.pop(name)
        # the INT4 weight keeps the reference graph's attribute name
        new = ir.Value(name=name, type=ir.TensorType(ir.DataType.INT4), shape=ir.Shape(codes.shape),
                       const_value=ir.tensor(codes, dtype=ir.DataType.INT4))
        graph.register_initializer(new)
        for user, index in uses:
            if user.op_type != "DequantizeLinear" or index != 0:
                raise ExportError(f"int4 weight {name} feeds {user.op_type}, not DequantizeLinear")
            user.replace_input_with(0, new)
            if len(user.inputs) > 2 and user.inputs[2] is not None:
                zp = user.inputs[2]
                if zp.const_value is None:
                    raise ExportError(f"int4 weight {name} has a zero point that is not a constant")
                zp_codes = zp.const_value.numpy().astype(np.int8)
                zp_new = ir.Value(name=_fresh(graph, f"{name}_zero_point"), type=ir.TensorType(ir.DataType.INT4),
                                  shape=ir.Shape(zp_codes.shape),
                                  const_value=ir.tensor(zp_codes, dtype=ir.DataType.INT4))
                graph.register_initializer(zp_new)
                user.replace_input_with(2, zp_new)
            converted += 1
    _drop_unused_initializers(graph)
    return converted


def _fresh(graph: ir.Graph, base: str) -> str:
    names = set(graph.initializers) | {out.name for node in graph for out in node.outputs}
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    return name


def _drop_unused_initializers(graph: ir.Graph) -> None:
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            graph.initializers.pop(name)
