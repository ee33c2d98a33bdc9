"""Rewrite `aten.scaled_dot_product_attention` into the explicit attention of graph/attention.py.

A fused SDPA hides Q x K^T, the softmax and P x V inside one op, so neither the annotation nor a
backend can put quantized tensors between them. This pass spells it out with the math SDPA
defines (torch.nn.functional.scaled_dot_product_attention's reference implementation):

    K, V   = repeat_interleave(K / V, heads / kv_heads, dim=-3)        enable_gqa=True only
    scores = matmul(Q, transpose(K, -2, -1)) * scale                   scale = 1/sqrt(head dim) by default
    scores = scores + mask                                             float mask; a bool mask as where(m, 0, -inf);
                                                                       is_causal as a constant -inf upper triangle
    out    = matmul(softmax(scores, -1), V)

It runs in `prepare` only when the recipe quantizes attention (a float model keeps its fused
kernel). It leaves an SDPA as it is, with the reason in its stats, when the math would not be the
same op: dropout_p > 0, or is_causal with a sequence length that is not static. The rewritten
float graph agrees with the fused op to float32 rounding (tests/test_attention.py).
"""
from __future__ import annotations

import math

import torch
from torch import fx

from ..graph import FROM_PASS, tensor_val
from .base import Pass, PassResult

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = (None, None, None, None, 0.0, False, None, False)


def _sdpa_args(node: fx.Node) -> dict:
    out = dict(zip(_ARGS, _DEFAULTS))
    out.update(zip(_ARGS, node.args))
    out.update(node.kwargs)
    return out


def _meta_val(target, args, kwargs):
    """The fake output of `target` on the fake values of its node arguments (for meta['val'])."""
    vals = fx.node.map_arg((args, kwargs), lambda n: n.meta.get("val"))
    modes = [v.fake_mode for v in torch.utils._pytree.tree_leaves(vals) if hasattr(v, "fake_mode")]
    if not modes:
        return None
    with modes[0]:
        return target(*vals[0], **vals[1])


class DecomposeSDPA(Pass):
    name = "decompose_sdpa"

    def call(self, gm: fx.GraphModule) -> PassResult:
        stats: dict = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not SDPA:
                continue
            why = self._why_not(node)
            if why:
                stats[f"kept: {why}"] = stats.get(f"kept: {why}", 0) + 1
                continue
            self._decompose(gm, node)
            stats["decomposed"] = stats.get("decomposed", 0) + 1
        gm.graph.eliminate_dead_code()
        return PassResult(gm, modified=bool(stats.get("decomposed")), stats=stats)

    @staticmethod
    def _why_not(node: fx.Node) -> str | None:
        a = _sdpa_args(node)
        if a["dropout_p"] not in (0, 0.0):
            return f"dropout_p={a['dropout_p']} (training-mode dropout)"
        q, k = tensor_val(a["query"]), tensor_val(a["key"])
        if q is None or k is None or q.dim() < 2:
            return "query/key without recorded shapes"
        if a["is_causal"] and not all(isinstance(d, int) for d in (q.shape[-2], k.shape[-2])):
            return "is_causal with a dynamic sequence length"
        if a["enable_gqa"] and q.dim() >= 3 and isinstance(q.shape[-3], int) and isinstance(k.shape[-3], int) \
                and q.shape[-3] % k.shape[-3]:
            return f"enable_gqa with {q.shape[-3]} query heads not a multiple of {k.shape[-3]} kv heads"
        m = tensor_val(a["attn_mask"])
        if a["attn_mask"] is not None and m is None:
            return "attn_mask without a recorded value"
        return None

    def _decompose(self, gm: fx.GraphModule, node: fx.Node) -> None:
        g = gm.graph
        a = _sdpa_args(node)
        q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
        qv, kv = tensor_val(q), tensor_val(k)
        scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(qv.shape[-1])

        def call(target, *args, **kwargs):
            n = g.call_function(target, args, kwargs)
            n.meta["val"] = _meta_val(target, args, kwargs)
            n.meta[FROM_PASS] = self.name
            for key in ("nn_module_stack", "stack_trace"):
                if key in node.meta:
                    n.meta[key] = node.meta[key]
            return n

        with g.inserting_before(node):
            if a["enable_gqa"] and qv.dim() >= 3 and qv.shape[-3] != kv.shape[-3]:
                reps = qv.shape[-3] // kv.shape[-3]
                k = call(aten.repeat_interleave.self_int, k, reps, -3)
                v = call(aten.repeat_interleave.self_int, v, reps, -3)
            s = call(aten.matmul.default, q, call(aten.transpose.int, k, -2, -1))
            s = call(aten.mul.Tensor, s, float(scale))
            if mask is not None:
                if tensor_val(mask).dtype == torch.bool:
                    zero = self._constant(gm, g, "qc_sdpa_zero", torch.zeros((), dtype=qv.dtype))
                    mask = call(aten.where.ScalarOther, mask, zero, float("-inf"))
                s = call(aten.add.Tensor, s, mask)
            if a["is_causal"]:
                L, S = qv.shape[-2], kv.shape[-2]
                causal = torch.zeros(L, S, dtype=qv.dtype).masked_fill(
                    ~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
                s = call(aten.add.Tensor, s, self._constant(gm, g, f"qc_sdpa_causal_{L}x{S}", causal))
            p = call(aten.softmax.int, s, -1)
            out = call(aten.matmul.default, p, v)
        node.replace_all_uses_with(out)
        g.erase_node(node)

    def _constant(self, gm: fx.GraphModule, g: fx.Graph, name: str, value: torch.Tensor) -> fx.Node:
        if not hasattr(gm, name):
            gm.register_buffer(name, value)
        n = g.get_attr(name)
        fake = next((n_.meta["val"] for n_ in g.nodes if isinstance(n_.meta.get("val"), torch.Tensor)
                     and getattr(n_.meta["val"], "fake_mode", None) is not None), None)
        n.meta["val"] = fake.fake_mode.from_tensor(value) if fake is not None else value
        n.meta[FROM_PASS] = self.name
        return n
