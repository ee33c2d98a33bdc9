"""Remove float-to-float casts that cannot change any value.

Three rewrites, repeated until none applies, each exact (the graph computes bit-identical results):

- a no-op cast (to the dtype its input already has) is replaced by its input;
- a chain cast(cast(x, B), C) where B holds every value of x's dtype A (float16/bfloat16 -> float32,
  float32 -> float64, FP8 -> any wider float) becomes cast(x, C), or x itself when C == A: the first
  cast is exact, so the pair rounds once, as the single cast does. A chain through a narrower B
  (x.to(bf16).to(fp32) of a float32 x) rounds, and is kept;
- casts of one tensor to one dtype are merged into the first (per-edge casts become per-tensor).

Casts left without users (or read only by torch.export's `_assert_tensor_metadata` checks) are then
erased. Stats count float casts before and after.
"""
from __future__ import annotations

import torch
from torch import fx

from ..graph import tensor_val
from .base import Pass, PassResult

aten = torch.ops.aten
_ASSERT = aten._assert_tensor_metadata.default
CAST_TARGETS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}
_FP8 = {torch.float8_e4m3fn, torch.float8_e5m2}
# narrow dtype -> the dtypes that represent each of its values exactly
_EXACT_IN = {
    torch.float16: {torch.float32, torch.float64},
    torch.bfloat16: {torch.float32, torch.float64},
    torch.float32: {torch.float64},
    **{f: {torch.float16, torch.bfloat16, torch.float32, torch.float64} for f in _FP8},
}


def is_float_cast(node: fx.Node) -> bool:
    """A cast whose only effect is a dtype change between floating dtypes."""
    if node.op != "call_function" or node.target not in CAST_TARGETS or not node.args:
        return False
    src, out = tensor_val(node.args[0]), tensor_val(node)
    if src is None or out is None or not (src.is_floating_point() and out.is_floating_point()):
        return False
    if node.target is aten.to.dtype:
        extra = list(node.args[2:4]) + [node.kwargs.get("non_blocking", False), node.kwargs.get("copy", False)]
        return not any(extra) and node.kwargs.get("memory_format") is None and len(node.args) <= 4
    allowed = {"dtype", "layout", "device"}
    return set(node.kwargs) <= allowed and src.device == out.device and len(node.args) == 1


def count_casts(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if is_float_cast(n))


def exact(narrow: torch.dtype, wide: torch.dtype) -> bool:
    """True when every value of `narrow` is a value of `wide`."""
    return narrow == wide or wide in _EXACT_IN.get(narrow, ())


def _dtypes(node: fx.Node) -> tuple[torch.dtype, torch.dtype]:
    return tensor_val(node.args[0]).dtype, tensor_val(node).dtype


class RemoveRedundantCasts(Pass):
    name = "remove_redundant_casts"

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        before = count_casts(gm)
        noop = chains = merged = 0
        changed = True
        while changed:
            changed = False
            for n in list(graph.nodes):
                if not is_float_cast(n) or n.graph is None:
                    continue
                src = n.args[0]
                a, c = _dtypes(n)
                if a == c:
                    n.replace_all_uses_with(src)
                    graph.erase_node(n)
                    noop += 1
                    changed = True
                elif isinstance(src, fx.Node) and is_float_cast(src) and exact(*_dtypes(src)):
                    origin = src.args[0]
                    if tensor_val(origin).dtype == c:
                        n.replace_all_uses_with(origin)
                        graph.erase_node(n)
                    else:
                        n.replace_input_with(src, origin)
                    if not src.users:
                        graph.erase_node(src)
                    chains += 1
                    changed = True
            first: dict[tuple, fx.Node] = {}
            for n in list(graph.nodes):
                if not is_float_cast(n):
                    continue
                key = (n.args[0], tensor_val(n).dtype)
                if key in first:        # `first` precedes n, and n precedes its users
                    n.replace_all_uses_with(first[key])
                    graph.erase_node(n)
                    merged += 1
                    changed = True
                else:
                    first[key] = n
            for n in reversed(list(graph.nodes)):
                if is_float_cast(n) and all(u.target is _ASSERT for u in n.users):
                    for u in list(n.users):     # torch.export's dtype check of a cast nobody reads
                        graph.erase_node(u)
                    graph.erase_node(n)
                    changed = True
        after = count_casts(gm)
        stats = {"casts_before": before, "casts_after": after, "removed_noop": noop,
                 "folded_chains": chains, "merged_duplicates": merged}
        return PassResult(gm, modified=after != before or bool(noop or chains), stats=stats)
