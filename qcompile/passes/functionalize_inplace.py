"""Rewrite in-place ops of the captured graph into their functional forms where that is exact.

torch.export keeps a model's in-place ops (timm's `x += shortcut` is `aten.add_.Tensor`, its
activations `hardswish_`, `hardtanh_`, `silu_`, `relu_`). The op families, the annotation rules
and every backend pattern speak of functional ops, and a later in-place op mutates a tensor that
an earlier reader (an observer, `qc.compare`'s recorder) already holds. So

    y = op_(a, *rest)     ==>     y' = op(a, *rest); every later use of a (and every use of y) reads y'

when the result is provably the same: `a` is computed in the graph (not an input, parameter or
buffer, whose mutation the caller sees), and no view of `a` taken before the op is read after it
(that view would see the write). When `a` is itself a view (GhostNet's `cat(...)[:, :c] += x`), the
write also reaches its base and the base's other views: it is rewritten only if the base is computed
in the graph and none of them is read after the write. Anything else stays in place, counted under
its reason in the stats.
"""
from __future__ import annotations

import operator
from collections import Counter

import torch
from torch import fx

from .base import Pass, PassResult


def _schema(target):
    return getattr(target, "_schema", None)


def _aliases_input(node: fx.Node) -> bool:
    """Whether the node's output may share storage with an input (views, reshape, in-place ops)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and _aliases_input(node.args[0])
    schema = _schema(node.target)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def functional_variant(target):
    """`aten.add_.Tensor` -> `aten.add.Tensor`, when `target` is an in-place ATen op that writes its
    first argument only and the functional overload takes the same arguments; else None."""
    schema = _schema(target)
    if schema is None or not schema.name.startswith("aten::") or not schema.name.endswith("_"):
        return None
    args = schema.arguments
    if not args or args[0].alias_info is None or not args[0].alias_info.is_write:
        return None
    if any(a.alias_info is not None and a.alias_info.is_write for a in args[1:]):
        return None
    packet = getattr(torch.ops.aten, schema.name[len("aten::"):-1], None)
    overload = getattr(packet, schema.overload_name or "default", None) if packet is not None else None
    f_schema = _schema(overload)
    if f_schema is None or [a.name for a in f_schema.arguments] != [a.name for a in args]:
        return None
    return overload


class FunctionalizeInplace(Pass):
    name = "functionalize_inplace"

    def call(self, gm: fx.GraphModule) -> PassResult:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        rewritten, kept = Counter(), Counter()
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            functional = functional_variant(node.target)
            if functional is None:
                continue
            why = self.why_not(node, order)
            op = str(node.target._overloadpacket).replace("aten::", "aten.")
            if why is not None:
                kept[f"kept in place ({why}): {op}"] += 1
                continue
            a = node.args[0]
            later = [u for u in a.users if u is not node and order[u] > order[node]]
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(functional, node.args, node.kwargs)
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            for user in later:
                user.replace_input_with(a, new)
            gm.graph.erase_node(node)
            order[new] = order[node]
            rewritten[op] += 1
        return PassResult(gm, modified=bool(rewritten), stats={**dict(rewritten), **dict(kept)})

    @staticmethod
    def why_not(node: fx.Node, order: dict) -> str | None:
        a = node.args[0]
        if not isinstance(a, fx.Node) or a.op != "call_function":
            return "writes a graph input, parameter or buffer"
        here = order[node]
        if _aliases_input(a):
            return _why_not_through_view(node, a, order)
        # a view of `a` taken before the write and read after it would see the write
        frontier = [u for u in a.users if u is not node and order[u] < here and _aliases_input(u)]
        seen = set()
        while frontier:
            view = frontier.pop()
            if view in seen:
                continue
            seen.add(view)
            for user in view.users:
                if order[user] > here:
                    return "a view of the tensor is read after the write"
                if _aliases_input(user):
                    frontier.append(user)
        return None


def _why_not_through_view(node: fx.Node, a: fx.Node, order: dict) -> str | None:
    """A write into a view `a` of a tensor computed in the graph (GhostNet's `x = cat(...)[:, :c];
    x += shortcut`) reaches the base and every other view of it; it is still exactly the functional
    op when none of those is read after the write: only `a` itself is, and its later readers are
    given the functional result."""
    base = a
    while _aliases_input(base):
        parent = base.args[0] if base.args else None
        if not isinstance(parent, fx.Node):
            return "writes a view of another tensor"
        base = parent
    if base.op != "call_function":
        return "writes a view of a graph input, parameter or buffer"
    here = order[node]
    aliases, frontier = set(), [base]
    while frontier:
        t = frontier.pop()
        if t in aliases:
            continue
        aliases.add(t)
        # views taken before the write alias it; anything taken after reads it (checked below),
        # except from `a`, whose later readers get the functional result
        frontier.extend(u for u in t.users if u is not node and order[u] < here and _aliases_input(u))
    for t in aliases:
        if t is a:
            continue
        if any(order[u] > here for u in t.users if u is not node):
            return "writes a view of another tensor that is read after the write"
    return None
