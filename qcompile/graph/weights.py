"""Which weights of a graph are quantized, and why the others stay float.

A weight is a constant operand (a parameter, or a tensor computed from parameters only, such as a
weight-normalized conv kernel) of rank >= 2 of a GEMM-like op: linear, conv, addmm/mm/matmul/bmm,
einsum, or an embedding lookup. It is quantized when the op reads it through a `dequantize` (a
converted graph) or its annotation quantizes it (a prepared graph). Everything else is listed with
the reason, so a model whose "cosine 1.0" comes from float weights says so (`qc.inspect`, the
annotate pass's stats, the zoo table).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from .meta import ANNOTATION
from .nodes import CONV, LINEAR, is_op, module_name

aten = torch.ops.aten
qops = torch.ops.qcompile

EMBEDDING = {aten.embedding.default}
# GEMM-like ops whose constant operands are weights, and the argument positions they may sit at.
GEMM_OPERANDS = {
    **{op: (1,) for op in LINEAR | CONV},
    aten.conv_transpose1d.default: (1,), aten.conv_transpose2d.input: (1,),
    aten.addmm.default: (1, 2), aten.mm.default: (0, 1), aten.matmul.default: (0, 1), aten.bmm.default: (0, 1),
    aten.baddbmm.default: (1, 2),
}


@dataclass
class WeightUse:
    tensor: str        # the get_attr target (or the computed node's name)
    op: str            # the consuming op, e.g. "aten.addmm"
    node: str          # the consuming node
    module: str
    quantized: bool
    reason: str = ""   # why it stays float
    lookup: bool = False   # an embedding table (read, not multiplied)


@dataclass
class WeightCoverage:
    uses: list = field(default_factory=list)

    @property
    def quantized(self) -> int:
        return sum(u.quantized for u in self.uses if not u.lookup)

    @property
    def total(self) -> int:
        return sum(not u.lookup for u in self.uses)

    @property
    def float_rows(self) -> list[tuple[str, str, str]]:
        return [(u.tensor, u.op, u.reason) for u in self.uses if not u.quantized]

    def __str__(self) -> str:
        lines = [f"GEMM/conv weights quantized: {self.quantized}/{self.total}"
                 + (f" (+{len(self.uses) - self.total} embedding tables)" if len(self.uses) > self.total else "")]
        lines += [f"  float  {t}  ({op}): {why}" for t, op, why in self.float_rows]
        return "\n".join(lines)


def _op_name(target) -> str:
    return str(getattr(target, "_overloadpacket", target)).replace("aten::", "aten.")


def _constant_source(node) -> str | None:
    """The weight a constant operand stands for: a get_attr target, or the name of a node computed
    from get_attr nodes only. None when the operand depends on a graph input (an activation)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return node.target
    if node.op != "call_function":
        return None
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" or n.op == "call_module":
            return None
        stack.extend(a for a in n.all_input_nodes)
    return node.name


def _is_dequantized(node) -> bool:
    from ..algorithms import nf4  # noqa: F401  (registers qcompile::dequantize_nf4)

    return isinstance(node, fx.Node) and is_op(node, {qops.dequantize.default, qops.dequantize_nf4.default})


def _rank(node) -> int:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.ndim if isinstance(val, torch.Tensor) else 0


def _float_reason(node: fx.Node, pos: int, operand: fx.Node, recipe) -> str:
    if operand.op != "get_attr" and not _is_dequantized(operand):
        return "the weight is computed in the graph (not a plain parameter), e.g. weight norm"
    if is_op(node, LINEAR | CONV):
        sub = recipe.recipe_for(module_name(node)) if recipe is not None else None
        if recipe is not None and sub is None:
            return "module excluded by the recipe"
        if sub is not None and sub.weight is None:
            return "the recipe quantizes no weights here"
        family = "linear" if is_op(node, LINEAR) else "conv"
        if sub is not None and family not in sub.ops:
            return f"the recipe's op families leave out {family}"
        if sub is not None and is_op(node, CONV) and type(sub.weight.granularity).__name__ == "PerGroup":
            return "per-group weight scales run along a GEMM's K; conv weights keep float here"
        return "not annotated"
    return f"{_op_name(node.target)} is not an op family qcompile quantizes"


def weight_coverage(gm: fx.GraphModule) -> WeightCoverage:
    """Every weight use of `gm` (prepared or converted), quantized or not and why."""
    from .meta import STATE

    state = gm.meta.get(STATE)
    recipe = getattr(state, "recipe", None) if state is not None and not getattr(state, "precision", False) else None
    cov = WeightCoverage()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if is_op(node, EMBEDDING):
            src = _constant_source(node.args[0])
            if src is not None:
                cov.uses.append(WeightUse(src, "aten.embedding", node.name, module_name(node), False,
                                          "embedding lookup: a table read, not a GEMM", lookup=True))
            continue
        positions = GEMM_OPERANDS.get(node.target)
        if positions is None:
            continue
        ann = node.meta.get(ANNOTATION)
        for pos in positions:
            operand = node.args[pos] if pos < len(node.args) else None
            if not isinstance(operand, fx.Node) or _rank(operand) < 2:
                continue
            if _is_dequantized(operand):
                src = _constant_source(operand.args[0])
                if src is not None:
                    cov.uses.append(WeightUse(src, _op_name(node.target), node.name, module_name(node), True))
                continue
            src = _constant_source(operand)
            if src is None:
                continue   # an activation operand (attention's matmuls)
            annotated = ann is not None and ann.weight is not None and ann.weight[0] == pos
            cov.uses.append(WeightUse(src, _op_name(node.target), node.name, module_name(node), annotated,
                                      "" if annotated else _float_reason(node, pos, operand, recipe)))
    return cov
