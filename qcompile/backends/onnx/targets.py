"""Target profiles: where Q/DQ nodes go in the exported file, for the runtime that will read it.

- `ort-cpu` (default): the reference graph as it is: one Q/DQ pair per quantized tensor, shared by
  its consumers, and activation qparams of any kind. onnxruntime's QDQ transformers duplicate
  DequantizeLinear per consumer themselves and fuse the pairs into QLinearConv / QLinearMatMul /
  MatMulIntegerToFloat / QGemm (tests/test_onnx_fusion.py counts them in the optimized model);
  uint8 activations x int8 weights (U8S8) is its fast x86 path, so `w8a8` uses uint8 activations.
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

TARGETS = ("ort-cpu", "tensorrt")
qops = torch.ops.qcompile


def check_target(quantized: fx.GraphModule, target: str) -> None:
    """Refuse, with the fix, a reference graph that the target runtime cannot run as quantized."""
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; known: {', '.join(TARGETS)}")
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
