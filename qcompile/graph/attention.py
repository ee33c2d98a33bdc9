"""Attention in the captured graph: the score matmul QK^T, and the model inputs that mask it.

An attention mask is found by its role, not its name: a [batch, seq] input whose values flow,
through casts, broadcasts, indexing and elementwise ops (never through a linear, a matmul or an
embedding), into an op that combines them with attention scores (an add, where or masked_fill
next to the QK^T product, or scaled_dot_product_attention's attn_mask). transformers' BERT,
LLaMA and friends build their masks that way from `attention_mask`. Boolean inputs are left out:
PyTorch's own convention for them (nn.MultiheadAttention's key_padding_mask) marks padding with
True, the opposite of transformers' 1 for a real token.
"""
from __future__ import annotations

import torch
from torch import fx

from .nodes import MATMUL, RESHAPE, WEIGHTED, is_op, reaches

aten = torch.ops.aten
# What lies between the QK^T product and the op that applies the mask: the 1/sqrt(d) scaling,
# a head reshape, a copy.
_SCORE_PATH = RESHAPE | {aten.mul.Tensor, aten.div.Tensor, aten.clone.default, aten.contiguous.default}
_APPLIES_MASK = {aten.add.Tensor, aten.sub.Tensor, aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor}
_SDPA = {aten.scaled_dot_product_attention.default}
# Ops a mask does not flow through on its way to the scores: they mix it with weights or only read its shape.
_NOT_MASK_PATH = WEIGHTED | MATMUL | {aten.embedding.default, aten.sym_size.int, aten._assert_tensor_metadata.default}


def is_attention_scores(node) -> bool:
    """Whether `node` is, through a scaling or reshapes, a matmul of two activations (QK^T)."""
    while isinstance(node, fx.Node) and is_op(node, _SCORE_PATH):
        node = node.args[0]
    return isinstance(node, fx.Node) and is_op(node, MATMUL) and all(
        isinstance(a, fx.Node) and a.op != "get_attr" for a in node.args[:2])


def _applies_to_scores(user: fx.Node, producer: fx.Node) -> bool:
    if is_op(user, _SDPA):
        mask = user.args[3] if len(user.args) > 3 else user.kwargs.get("attn_mask")
        return mask is producer
    if is_op(user, _APPLIES_MASK):
        return any(a is not producer and is_attention_scores(a) for a in user.args if isinstance(a, fx.Node))
    return False


def _mask_path(node: fx.Node) -> bool:
    return node.op == "call_function" and not is_op(node, _NOT_MASK_PATH)


def attention_mask_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """The placeholders that are [batch, seq] integer or float masks applied to attention scores."""
    found = []
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if not isinstance(val, torch.Tensor) or val.ndim != 2 or val.dtype == torch.bool or val.is_complex():
            continue
        if reaches(node, _mask_path, _applies_to_scores):
            found.append(node)
    return found
