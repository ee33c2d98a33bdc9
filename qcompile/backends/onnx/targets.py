"""Target profiles: where Q/DQ nodes go in the exported file, for the runtime that will read it.

- `ort-cpu` (default): the reference graph as it is: one Q/DQ pair per quantized tensor, shared by
  its consumers, and activation qparams of any kind. onnxruntime's QDQ transformers duplicate
  DequantizeLinear per consumer themselves and fuse the pairs into QLinearConv / QLinearMatMul /
  MatMulIntegerToFloat / QGemm (tests/test_onnx_fusion.py counts them in the optimized model);
  uint8 activations x int8 weights (U8S8) is its fast x86 path, so `w8a8` uses uint8 activations.
  One rewrite keeps those fusions: the bias of a quantized linear on a rank >= 3 input is stored as
  [1, N] rather than [N] (`bias_rows_for_qdq_fusion`). onnxruntime's MatMulAddFusion (a basic-level
  pass, before the QDQ fusions) otherwise turns MatMul + Add of a static-shape input into a
  Reshape/float Gemm/Reshape whose dequantized weight the QDQ Gemm rule only fuses when the output
  is quantized too: all-MiniLM-L6-v2 at batch 8 ran in 169 ms (FP32 Gemms on dequantized weights,
  slower than the FP32 file) instead of 66 ms with 36 MatMulIntegerToFloat. A [1, N] bias is not a
  Gemm bias for a reshaped input, so that pass leaves the MatMul to the QDQ fusion; the sum is the
  same broadcast add. Only static input shapes need it: MatMulAddFusion skips dynamic ones, and a
  [N] bias there keeps onnxruntime's BiasGelu and SkipLayerNormalization-with-bias fusions.
- `tensorrt`: TensorRT's explicit-quantization rules: symmetric int8 only (every zero point 0,
  no uint8, no per-token dynamic qparams), no output quantization after weighted ops (TensorRT
  decides where to requantize), and a dedicated Q/DQ pair per consumer, so that each consumer's
  fusion is decided on its own. `w8a8-tensorrt` is the recipe that meets these rules.
"""
from __future__ import annotations

import onnx_ir as ir
import torch
from torch import fx

from ...errors import ExportError
from ...graph import STATE
from ...targets import ONNX_TARGETS

qops = torch.ops.qcompile


def check_target(quantized: fx.GraphModule, target: str) -> None:
    """Refuse, with the fix, a reference graph that the target runtime cannot run as quantized."""
    if target not in ONNX_TARGETS:
        raise ExportError(f"unknown export target {target!r}; ONNX files are placed for: {', '.join(ONNX_TARGETS)}")
    if target != "tensorrt":
        return
    state = quantized.meta[STATE]
    if state.recipe.quantize_outputs:
        raise ExportError("target 'tensorrt' takes no output quantization after weighted ops; "
                          "use a recipe with quantize_outputs=False (e.g. 'w8a8-tensorrt')")
    for node in quantized.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == qops.choose_qparams_per_token.default:
            raise ExportError("target 'tensorrt' has no dynamic per-token quantization; use static "
                              "activations (recipe 'w8a8-tensorrt')")
        if node.target == qops.quantize.default:
            dtype = node.args[7]
            zp = node.args[2]
            zp_val = _constant(quantized, zp)
            if dtype != torch.int8 or zp_val is None or bool((zp_val != 0).any()):
                raise ExportError(f"target 'tensorrt' takes symmetric int8 activations (zero point 0); "
                                  f"{node.name} quantizes to {dtype} with zero point "
                                  f"{'non-constant' if zp_val is None else zp_val.flatten()[:4].tolist()}. "
                                  "Use the recipe 'w8a8-tensorrt'")


def _constant(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def _dequantized_constant(value) -> bool:
    """Whether `value` is DequantizeLinear of an initializer, possibly transposed (a linear's weight)."""
    node = value.producer() if value is not None else None
    if node is not None and node.op_type == "Transpose":
        node = node.inputs[0].producer()
    return (node is not None and node.op_type == "DequantizeLinear" and node.inputs[0] is not None
            and node.inputs[0].const_value is not None)


def bias_rows_for_qdq_fusion(model: ir.Model) -> int:
    """Store as [1, N] the [N] bias added to a MatMul of a dequantized activation (rank >= 3) by a
    dequantized constant weight, so that onnxruntime fuses it into MatMulIntegerToFloat instead of
    a float Gemm (see the module docstring). Returns the number of biases rewritten."""
    graph = model.graph
    rewritten = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain != "":
            continue
        a, b = node.inputs[0], node.inputs[1]
        if a is None or a.producer() is None or a.producer().op_type != "DequantizeLinear":
            continue
        if a.shape is None or len(a.shape) < 3 or not _dequantized_constant(b):
            continue
        if not all(isinstance(d, int) for d in a.shape):
            continue  # MatMulAddFusion skips dynamic shapes; a [N] bias keeps BiasGelu / SkipLayerNorm fusions
        uses = list(node.outputs[0].uses())
        if len(uses) != 1 or uses[0][0].op_type != "Add":
            continue
        add, index = uses[0]
        bias = add.inputs[1 - index]
        if bias is None or bias.const_value is None or bias.shape is None or len(bias.shape) != 1:
            continue
        array = bias.const_value.numpy().reshape(1, -1)
        name = f"{bias.name}_row"
        while name in graph.initializers:
            name += "_"
        row = ir.Value(name=name, type=bias.type, shape=ir.Shape(array.shape), const_value=ir.tensor(array))
        graph.register_initializer(row)
        add.replace_input_with(1 - index, row)
        if not list(bias.uses()) and bias.name in graph.initializers:
            graph.initializers.pop(bias.name)
        rewritten += 1
    return rewritten


def dedicated_qdq_per_consumer(model: ir.Model) -> int:
    """Give every consumer of a quantized activation its own QuantizeLinear -> DequantizeLinear
    pair (TensorRT's placement). Weight DequantizeLinear nodes read initializers and are left as
    they are. Returns the number of pairs added."""
    graph = model.graph
    added = 0
    for q in list(graph):
        if q.op_type != "QuantizeLinear" or q.domain != "":
            continue
        pairs = []  # (dq, consumer, input index)
        for dq, _ in list(q.outputs[0].uses()):
            if dq.op_type != "DequantizeLinear":
                continue
            for consumer, index in list(dq.outputs[0].uses()):
                pairs.append((dq, consumer, index))
        for n, (dq, consumer, index) in enumerate(pairs[1:], start=1):
            new_q = ir.Node("", "QuantizeLinear", list(q.inputs), attributes=[a for a in q.attributes.values()],
                            name=f"{q.name}_consumer{n}")
            new_dq = ir.Node("", "DequantizeLinear", [new_q.outputs[0], *dq.inputs[1:]],
                             attributes=[a for a in dq.attributes.values()], name=f"{dq.name}_consumer{n}")
            new_q.outputs[0].name = f"{q.outputs[0].name}_consumer{n}"
            new_dq.outputs[0].name = f"{dq.outputs[0].name}_consumer{n}"
            for src, dst in ((q, new_q), (dq, new_dq)):
                dst.outputs[0].type, dst.outputs[0].shape = src.outputs[0].type, src.outputs[0].shape
                dst.metadata_props.update(src.metadata_props)
            graph.insert_before(consumer, [new_q, new_dq])
            consumer.replace_input_with(index, new_dq.outputs[0])
            added += 1
    return added


def _clone(graph: ir.Graph, node: ir.Node, inputs: list, suffix: str, before: ir.Node) -> ir.Node:
    new = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                  name=f"{node.name}{suffix}")
    new.outputs[0].name = f"{node.outputs[0].name}{suffix}"
    new.outputs[0].type, new.outputs[0].shape = node.outputs[0].type, node.outputs[0].shape
    new.metadata_props.update(node.metadata_props)
    graph.insert_before(before, [new])
    return new


def weight_dq_per_consumer(model: ir.Model) -> int:
    """Give every consumer of a dequantized constant weight its own DequantizeLinear (and its own
    Transpose, when the weight is transposed for a MatMul). A weight shared by several ops (ALBERT's
    one layer applied 12 times) otherwise reaches them through one DequantizeLinear -> Transpose, which
    the exporter's common-subexpression elimination merges, and onnxruntime's QDQ fusions, which need a
    node unit of their own, fused 1 of ALBERT's 13 linears; TensorRT wants the same. Returns the number
    of consumers given their own copy."""
    graph = model.graph
    added = 0
    for dq in list(graph):
        if dq.op_type != "DequantizeLinear" or dq.domain != "" or dq.inputs[0] is None or dq.inputs[0].const_value is None:
            continue
        uses = list(dq.outputs[0].uses())
        chain = [dq]
        if len(uses) == 1 and uses[0][0].op_type == "Transpose" and len(list(uses[0][0].outputs[0].uses())) > 1:
            chain.append(uses[0][0])
            uses = list(uses[0][0].outputs[0].uses())
        for n, (consumer, index) in enumerate(uses[1:], start=1):
            value = dq.inputs[0]
            copy = None
            for node in chain:
                copy = _clone(graph, node, [value, *node.inputs[1:]], f"_consumer{n}", consumer)
                value = copy.outputs[0]
            consumer.replace_input_with(index, value)
            added += 1
    return added

