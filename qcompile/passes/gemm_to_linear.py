"""Rewrite a GEMM on a parameter weight into `aten.linear`, with the same float result.

    addmm(b, x, W)      ==>  linear(x, W.t(), b)     (GPT-2's Conv1D: W is [in, out])
    mm(x, W)            ==>  linear(x, W.t())
    matmul(x, W)        ==>  linear(x, W.t())        (x of any rank, W 2-D)

with W (and b) parameters: the op families and every backend quantize `linear` weights, so these
stayed float without a word (GPT-2 had 1 of 9 weights quantized). The new weight is the transposed
*view* W.t(): `aten.linear` computes `addmm(b, x, weight.t())` / `matmul(x, weight.t())`, which is
then the very same call on the very same strides as before, so the float graph is bit-identical.
Skipped (reason in the stats): an addmm with beta/alpha other than 1, a bias that is not a 1-D
parameter, a weight that is not a 2-D parameter.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import fx

from ..graph import get_param, is_op, tensor_val
from .base import Pass, PassResult

aten = torch.ops.aten
GEMMS = {aten.addmm.default, aten.mm.default, aten.matmul.default}


def _is_param(node, ndim: int) -> bool:
    val = tensor_val(node)
    return isinstance(node, fx.Node) and node.op == "get_attr" and val is not None and val.ndim == ndim


class GemmToLinear(Pass):
    name = "gemm_to_linear"

    def call(self, gm: fx.GraphModule) -> PassResult:
        rewritten, skipped = 0, Counter()
        transposed: dict[str, str] = {}   # weight target -> its transposed view's attribute
        for node in list(gm.graph.nodes):
            if not is_op(node, GEMMS):
                continue
            parts = self.match(node)
            if isinstance(parts, str):
                skipped[parts] += 1
                continue
            if parts is None:
                continue
            x, w, b = parts
            if w.target not in transposed:
                name = self._free_name(gm, w.target.replace(".", "_") + "_linear")
                weight = get_param(gm, w)
                gm.register_parameter(name, torch.nn.Parameter(weight.detach().t(), requires_grad=False))
                transposed[w.target] = name
            with gm.graph.inserting_before(node):
                wt = gm.graph.get_attr(transposed[w.target])
                wt.meta["val"] = tensor_val(w).t()
                new = gm.graph.call_function(aten.linear.default, (x, wt, b) if b is not None else (x, wt))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            rewritten += 1
        if rewritten:
            gm.graph.eliminate_dead_code()
        return PassResult(gm, modified=rewritten > 0,
                          stats={"rewritten": rewritten, **{f"skipped: {k}": v for k, v in skipped.items()}})

    @staticmethod
    def match(node: fx.Node):
        """(x, W, bias or None); a reason string when it is a parameter GEMM that cannot be
        rewritten; None when the weight is not a parameter (an activation x activation product)."""
        if node.target is aten.addmm.default:
            b, x, w = node.args[:3]
            if not _is_param(w, 2):
                return None
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                return "addmm with beta or alpha other than 1"
            if not _is_param(b, 1):
                return "addmm bias is not a 1-D parameter"
            return x, w, b
        x, w = node.args[:2]
        if not _is_param(w, 2) or _is_param(x, 2):
            return None
        xv = tensor_val(x)
        if xv is None or xv.ndim < 2 or (node.target is aten.mm.default and xv.ndim != 2):
            return "input is not a matrix"
        return x, w, None

    @staticmethod
    def _free_name(gm, base: str) -> str:
        name, i = base, 0
        while hasattr(gm, name):
            i += 1
            name = f"{base}_{i}"
        return name
