"""Fold an eval-mode BatchNorm into the conv1d / conv2d / linear that feeds it.

    W' = W * gamma / sqrt(var + eps)      (scaled along the output-channel axis 0)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta

Skipped, with the reason counted in the stats, when folding would change the model's results:
a BN in training mode, a weight used elsewhere, a producer with other users, or a linear on a
>2-D input (BatchNorm1d then normalizes dim 1, not the linear's output features; torchao #4116).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import fx

from ..graph import CONV, LINEAR, get_param, is_op, set_param, tensor_val
from .base import Pass, PassResult

aten = torch.ops.aten
BATCH_NORM = {aten.batch_norm.default}


def fold_bn_params(weight, bias, mean, var, gamma, beta, eps):
    """The folded (weight, bias), computed in float64 and returned in the weight's dtype."""
    inv_std = torch.rsqrt(var.double() + eps)
    g = gamma.double() if gamma is not None else torch.ones_like(inv_std)
    beta = beta.double() if beta is not None else torch.zeros_like(inv_std)
    b = bias.double() if bias is not None else torch.zeros_like(inv_std)
    factor = g * inv_std
    w = weight.double() * factor.reshape(-1, *([1] * (weight.ndim - 1)))
    return w.to(weight.dtype), ((b - mean.double()) * factor + beta).to(weight.dtype)


class FoldBatchNorm(Pass):
    name = "fold_bn"

    def call(self, gm: fx.GraphModule) -> PassResult:
        pairs, skipped = self.candidates(gm)
        for producer, bn in pairs:
            self._fold(gm, producer, bn)
        folded = len(pairs)
        if folded:
            gm.graph.eliminate_dead_code()
        return PassResult(gm, modified=folded > 0, stats={"folded": folded, **{f"skipped: {k}": v for k, v in skipped.items()}})

    def candidates(self, gm: fx.GraphModule) -> tuple[list[tuple[fx.Node, fx.Node]], Counter]:
        """(conv/linear, batch_norm) pairs that can fold, and why the others cannot (reason -> count).
        Shared with fold_bn_qat, which simulates the same folds in training."""
        pairs, skipped = [], Counter()
        for bn in gm.graph.nodes:
            if not is_op(bn, BATCH_NORM):
                continue
            producer = bn.args[0]
            if not isinstance(producer, fx.Node) or not is_op(producer, CONV | LINEAR):
                continue
            reason = self.why_not(gm, producer, bn)
            if reason:
                skipped[reason] += 1
            else:
                pairs.append((producer, bn))
        return pairs, skipped

    def why_not(self, gm: fx.GraphModule, producer: fx.Node, bn: fx.Node) -> str | None:
        training = bn.args[5] if len(bn.args) > 5 else bn.kwargs.get("training", False)
        if training:
            return "batch_norm in training mode"
        if len(producer.users) > 1:
            return "producer has other users"
        for param in producer.args[1:3]:
            if isinstance(param, fx.Node) and (param.op != "get_attr" or self._shared(gm, param)):
                return "weight shared or not a constant"
        for param in bn.args[1:5]:
            if param is not None and (not isinstance(param, fx.Node) or param.op != "get_attr"):
                return "batch_norm statistics are not constants"
        val = tensor_val(producer)
        if is_op(producer, LINEAR) and (val is None or val.ndim != 2):
            return "linear on >2-D input"
        return None

    @staticmethod
    def _shared(gm: fx.GraphModule, param: fx.Node) -> bool:
        """Used by another node, directly or through another get_attr of the same tensor."""
        if len(param.users) > 1:
            return True
        tensor = get_param(gm, param)
        return any(n is not param and n.op == "get_attr" and get_param(gm, n) is tensor
                   for n in gm.graph.nodes)

    def _fold(self, gm: fx.GraphModule, producer: fx.Node, bn: fx.Node) -> None:
        weight_node = producer.args[1]
        bias_node = producer.args[2] if len(producer.args) > 2 else None
        gamma, beta, mean, var = (get_param(gm, a) if a is not None else None for a in bn.args[1:5])
        eps = bn.args[7]
        weight = get_param(gm, weight_node)
        bias = get_param(gm, bias_node) if bias_node is not None else None
        w, b = fold_bn_params(weight, bias, mean, var, gamma, beta, eps)
        set_param(gm, weight_node, w)
        if bias_node is None:
            bias_target = weight_node.target.rpartition(".")[0] + ("." if "." in weight_node.target else "") + "folded_bias"
            owner, _, attr = bias_target.rpartition(".")
            (gm.get_submodule(owner) if owner else gm).register_parameter(attr, torch.nn.Parameter(b))
            with gm.graph.inserting_before(producer):
                bias_node = gm.graph.get_attr(bias_target)
            args = list(producer.args)
            args += [None] * (3 - len(args))
            args[2] = bias_node
            producer.args = tuple(args)
        else:
            set_param(gm, bias_node, b)
        bn.replace_all_uses_with(producer)
        gm.graph.erase_node(bn)
