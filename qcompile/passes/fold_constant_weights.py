"""Fold a weight that the graph computes from parameters alone into a parameter.

    conv1d(x, _weight_norm(v, g, 2), b)     ==>     conv1d(x, W, b),  W = _weight_norm(v, g, 2) computed once

A weight-normalized conv (wav2vec2's positional conv, `nn.utils.parametrizations.weight_norm`)
reaches the conv as an expression of two parameters, so the annotation rules, which quantize a
parameter operand, kept it float without a word. The expression depends on no input, so its value
is the same on every call: evaluating it here with the same ops gives the same tensor, and the
conv becomes a plain weighted op. The original parameters stay for any other reader.
"""
from __future__ import annotations

import torch
from torch import fx

from ..graph import WEIGHTED, get_param, is_op
from ..graph.weights import _constant_source
from .base import Pass, PassResult

WEIGHT_ARG = 1


def evaluate_constant(gm: fx.GraphModule, node: fx.Node, cache: dict) -> torch.Tensor:
    """The value of a node computed from get_attr nodes only."""
    if node in cache:
        return cache[node]
    if node.op == "get_attr":
        value = get_param(gm, node)
    else:
        load = lambda a: evaluate_constant(gm, a, cache) if isinstance(a, fx.Node) else a  # noqa: E731
        args = torch.fx.node.map_aggregate(node.args, load)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, load)
        value = node.target(*args, **kwargs)
    cache[node] = value
    return value


class FoldConstantWeights(Pass):
    name = "fold_constant_weights"

    def call(self, gm: fx.GraphModule) -> PassResult:
        folded, cache = 0, {}
        with torch.no_grad():
            for node in list(gm.graph.nodes):
                if not is_op(node, WEIGHTED) or len(node.args) <= WEIGHT_ARG:
                    continue
                w = node.args[WEIGHT_ARG]
                if not isinstance(w, fx.Node) or w.op != "call_function" or _constant_source(w) is None:
                    continue
                value = evaluate_constant(gm, w, cache).detach().clone()
                name = self._free_name(gm, node.name + "_weight")
                gm.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
                with gm.graph.inserting_before(node):
                    attr = gm.graph.get_attr(name)
                attr.meta["val"] = w.meta.get("val")
                node.replace_input_with(w, attr)
                folded += 1
        if folded:
            gm.graph.eliminate_dead_code()
        return PassResult(gm, modified=folded > 0, stats={"folded": folded})

    @staticmethod
    def _free_name(gm, base: str) -> str:
        name, i = base, 0
        while hasattr(gm, name):
            i += 1
            name = f"{base}_{i}"
        return name
