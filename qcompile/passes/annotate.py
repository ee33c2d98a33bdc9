"""Annotate, from a recipe, which tensors of which nodes to quantize and how.

Rules, per op family the recipe lists (modules it excludes stay float):
- linear / conv1d / conv2d: weight spec on the weight, activation spec on the input. With
  `quantize_outputs` (for its op family), the output too, taken after a following activation that
  the recipe's `fused_activations` names (the runtime fuses it), else right at the op.
- embedding (only when the recipe lists it): weight spec on the table, nothing on the integer ids.
- matmul / bmm: activation spec on both inputs.
- add / mul: inputs and output, but only inside a quantized region: both inputs come from a
  conv/linear/add/cat (possibly through activations and reshapes) and the output reaches a conv or
  linear input or the model's output (through activations, pools, reshapes, adds, muls, cats). This keeps float the
  transformer residual stream (post-LN: after LayerNorm; pre-LN: add after add, read only by
  LayerNorms) and the attention-mask add, whose -inf-like values would ruin a per-tensor scale.
- cat: output spec, inputs share it (same region rule).
- max pools and reshape-like ops: output shares the input's qparams, when the input is quantized;
  average pools: their output gets its own qparams (see graph/nodes.py for why).
"""
from __future__ import annotations

import torch
from torch import fx

from ..graph import (
    ACTIVATIONS, ADD, ANNOTATION, AVG_POOL, CAT, CONV, EMBEDDING, LINEAR, MATMUL, MUL, SHARE_WITH_INPUT, WEIGHTED,
    activation_name, is_op, module_name, reaches, tensor_val,
)
from ..graph.weights import weight_coverage
from ..graph.annotation import QAnnotation
from ..spec import PerGroup, Recipe, SharedSpec
from .base import Pass, PassResult
from .fold_bn_qat import is_folded_batch_norm, is_folded_weight

REGION_PRODUCERS = WEIGHTED | ADD | CAT
# a slice selects values of a region tensor (GhostNet: the first channels of a concat)
SLICES = {torch.ops.aten.slice.Tensor}


def _is_float_tensor(arg) -> bool:
    val = tensor_val(arg)
    return val is not None and val.is_floating_point()


def _in_quantized_region(arg) -> bool:
    """Produced by conv/linear/add/cat, looking through fused activations, reshapes and the
    BatchNorm that QAT folds into its conv (fold_bn_qat.py)."""
    while isinstance(arg, fx.Node) and (is_op(arg, ACTIVATIONS | SHARE_WITH_INPUT | SLICES) or is_folded_batch_norm(arg)):
        arg = arg.args[0]
    return isinstance(arg, fx.Node) and is_op(arg, REGION_PRODUCERS)


def _feeds_weighted_op(node: fx.Node) -> bool:
    """Whether the node's output is, through ops that keep it in the integer region (activations,
    pools, reshapes, adds, muls, cats), the input of a conv or linear or a model output: a CNN's
    residual add is, a pre-LN transformer's residual add (read by LayerNorms and the next add) is not."""
    # an integer region may also end at the model's output
    return reaches(node, ACTIVATIONS | SHARE_WITH_INPUT | ADD | MUL | CAT,
                   lambda user, producer: (is_op(user, WEIGHTED) and user.args[0] is producer) or user.op == "output")


class Annotate(Pass):
    name = "annotate"

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def call(self, gm: fx.GraphModule) -> PassResult:
        counts: dict[str, int] = {}
        quantized_outputs: set[str] = set()  # names of nodes whose output is observed
        for node in gm.graph.nodes:
            if node.op != "call_function" or ANNOTATION in node.meta:   # annotate_attention's matmuls
                continue
            recipe = self.recipe.recipe_for(module_name(node))
            if recipe is None:
                continue
            ann = self._annotate(node, recipe, quantized_outputs)
            if ann is None:
                continue
            ann.module = module_name(node)
            node.meta[ANNOTATION] = ann
            if ann.output is not None:
                quantized_outputs.add(ann.output_node or node.name)
            counts[ann.reason] = counts.get(ann.reason, 0) + 1
        annotated = bool(counts)
        # weights left float, and why (an embedding table, an op outside the families, an exclusion)
        for tensor, op, why in weight_coverage(gm).float_rows:
            key = f"float weight: {op} ({why})"
            counts[key] = counts.get(key, 0) + 1
        return PassResult(gm, modified=annotated, stats=counts)

    def _annotate(self, node: fx.Node, r: Recipe, quantized_outputs: set[str]) -> QAnnotation | None:
        act = r.activation
        static_act = act is not None and not act.dynamic
        if is_op(node, WEIGHTED) and (("linear" in r.ops and is_op(node, LINEAR)) or ("conv" in r.ops and is_op(node, CONV))):
            weight = node.args[1]
            if r.weight is None or not isinstance(weight, fx.Node) or not (weight.op == "get_attr" or is_folded_weight(weight)):
                return None
            if isinstance(r.weight.granularity, PerGroup) and is_op(node, CONV):
                return None  # group-wise scales run along K of a GEMM; conv weights have no such K here
            ann = QAnnotation(weight=(1, r.weight), reason=node.target.__name__.split(".")[0])
            if act is not None and _is_float_tensor(node.args[0]):
                ann.inputs[0] = act
            if r.quantizes_output_of("linear" if is_op(node, LINEAR) else "conv") and static_act:
                tail = node
                for fused in (is_folded_batch_norm, lambda n: activation_name(n) in r.fused_activations):
                    users = list(tail.users)
                    if len(users) == 1 and fused(users[0]):
                        tail = users[0]
                if tail is not node:
                    ann.output_node = tail.name
                ann.output = act
            return ann
        if is_op(node, EMBEDDING) and "embedding" in r.ops:
            table = node.args[0]
            if r.weight is None or not isinstance(table, fx.Node) or table.op != "get_attr":
                return None
            return QAnnotation(weight=(0, r.weight), reason="embedding")
        if act is None:
            return None
        if is_op(node, MATMUL) and "matmul" in r.ops:
            if all(_is_float_tensor(a) for a in node.args[:2]):
                return QAnnotation(inputs={0: act, 1: act}, reason="matmul")
            return None
        if not static_act:
            return None
        if (is_op(node, ADD) and "add" in r.ops) or (is_op(node, MUL) and "mul" in r.ops):
            a, b = node.args[:2]
            if (_is_float_tensor(a) and _is_float_tensor(b) and _in_quantized_region(a) and _in_quantized_region(b)
                    and _feeds_weighted_op(node)):
                return QAnnotation(inputs={0: act, 1: act}, output=act, reason="add" if is_op(node, ADD) else "mul")
            return None
        if is_op(node, CAT) and "cat" in r.ops:
            parts = node.args[0]
            if all(_is_float_tensor(p) and _in_quantized_region(p) for p in parts) and _feeds_weighted_op(node):
                shared = SharedSpec(("out", node.name))
                return QAnnotation(inputs={(0, j): shared for j in range(len(parts))}, output=act, reason="cat")
            return None
        if is_op(node, AVG_POOL) and "pool" in r.ops:
            src = node.args[0]
            if isinstance(src, fx.Node) and src.name in quantized_outputs:
                return QAnnotation(inputs={0: act}, output=act, reason="average pool")
        if is_op(node, SHARE_WITH_INPUT) and ({"pool", "reshape"} & set(r.ops)):
            src = node.args[0]
            if isinstance(src, fx.Node) and src.name in quantized_outputs:
                return QAnnotation(inputs={0: act}, output=SharedSpec(("in", node.name, 0)), reason="shared with input")
        return None
