"""Annotate the attention pattern (graph/attention.py) with the recipe's AttentionSpec.

For each matched attention: Q and K^T on the Q x K^T matmul's input edges, P and V on the P x V
matmul's; the scale, the masks and the softmax stay float (the kernels apply them exactly in
float between the two integer matmuls). Per head (`PerChannel(1)`) applies to rank-4
[batch, heads, seq, dim] operands; on other ranks a per-head spec falls back to per tensor (the
stats count these). An attention that does not match the pattern (custom score or mask
arithmetic, a softmax over another dim, ...) is left float and its reason is stored on its P x V
matmul (`meta[ATTENTION_SKIPPED]`) and in `QState.attention`, where `qc.inspect` and the lowering
reports read it. `annotate` then leaves the annotated matmuls alone.
"""
from __future__ import annotations

import dataclasses

from torch import fx

from ..graph import ANNOTATION, STATE, get_param, module_name, tensor_val
from ..graph.annotation import QAnnotation
from ..graph.attention import find_attention
from ..spec import AttentionSpec, PerChannel, PerTensor, QuantSpec, Recipe
from .base import Pass, PassResult

ATTENTION_SKIPPED = "qcompile_attention_skipped"   # node.meta on a P x V matmul left float: why


def _for_rank(spec: QuantSpec, node: fx.Node) -> QuantSpec:
    val = tensor_val(node)
    if isinstance(spec.granularity, PerChannel) and (val is None or val.dim() != 4 or spec.granularity.axis != 1):
        return dataclasses.replace(spec, granularity=PerTensor())
    return spec


class AnnotateAttention(Pass):
    name = "annotate_attention"

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def call(self, gm: fx.GraphModule) -> PassResult:
        stats: dict = {}
        rows = []
        for m in find_attention(gm.graph, constants=lambda n: get_param(gm, n)):
            recipe = self.recipe.recipe_for(module_name(m.pv))
            spec: AttentionSpec | None = recipe.attention if recipe is not None else None
            reason = m.reason
            if reason is None and spec is None:
                reason = "excluded by the recipe" if recipe is None else "the recipe for this module has no attention spec"
            if reason is None and any(ANNOTATION in n.meta for n in (m.qk, m.pv)):
                reason = "its matmuls are already annotated"
            if reason is not None:
                m.pv.meta[ATTENTION_SKIPPED] = reason
                stats["left float"] = stats.get("left float", 0) + 1
                rows.append(dict(pv=m.pv.name, qk=m.qk.name if m.qk is not None else None, quantized=False,
                                 reason=reason))
                continue
            specs = {k: _for_rank(getattr(spec, k), node) for k, node in
                     (("query", m.query), ("key", m.key_t), ("probs", m.probs), ("value", m.value))}
            fell_back = sum(specs[k] != getattr(spec, k) for k in specs)
            if fell_back:
                stats["per-head spec on a rank != 4 operand: per tensor"] = \
                    stats.get("per-head spec on a rank != 4 operand: per tensor", 0) + fell_back
            m.qk.meta[ANNOTATION] = QAnnotation(inputs={0: specs["query"], 1: specs["key"]},
                                                module=module_name(m.qk), reason="attention Q x K^T")
            m.pv.meta[ANNOTATION] = QAnnotation(inputs={0: specs["probs"], 1: specs["value"]},
                                                module=module_name(m.pv), reason="attention P x V")
            stats["quantized"] = stats.get("quantized", 0) + 1
            rows.append(dict(pv=m.pv.name, qk=m.qk.name, quantized=True, reason=None,
                             scale=m.scale, masks=[n.name for n in m.masks]))
        state = gm.meta.get(STATE)
        if state is not None:
            state.attention["patterns"] = rows
        return PassResult(gm, modified=bool(stats.get("quantized")), stats=stats)
