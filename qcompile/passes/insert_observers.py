"""Insert one observer module per static sharing group.

An observed output replaces every use of the node; an observed input edge gets its own call of
the group's observer (several calls of one module pool their statistics, which is what sharing
means). Dynamic groups get no observer: their qparams are computed per batch at run time.
A value-preserving op (reshape, max-pool, ...) of a tensor already observed by its group is not
observed again: its values are already on that grid.
"""
from __future__ import annotations

from torch import fx

from ..graph import FROM_PASS, GROUP, RESHAPE, STATE, is_op
from ..graph.annotation import get_arg, set_arg
from ..observers import make_observer
from .base import Pass, PassResult

OBSERVER_PREFIX = "qc_observer_"


def observer_call(gm: fx.GraphModule, group_id: int, arg: fx.Node, before: fx.Node, pass_name: str) -> fx.Node:
    with gm.graph.inserting_before(before):
        node = gm.graph.call_module(f"{OBSERVER_PREFIX}{group_id}", (arg,))
    node.meta.update({GROUP: group_id, FROM_PASS: pass_name, "val": arg.meta.get("val")})
    if "nn_module_stack" in before.meta:
        node.meta["nn_module_stack"] = before.meta["nn_module_stack"]
    return node


def _on_group_grid(node, group_id: int) -> bool:
    while is_op(node, RESHAPE):
        node = node.args[0]
    return node.op == "call_module" and node.meta.get(GROUP) == group_id


class InsertObservers(Pass):
    name = "insert_observers"

    def __init__(self, make_module=make_observer):
        self.make_module = make_module  # QuantSpec -> module: an observer, or a FakeQuantize for QAT

    def call(self, gm: fx.GraphModule) -> PassResult:
        state = gm.meta[STATE]
        nodes = {n.name: n for n in gm.graph.nodes}
        inserted = 0
        for group in state.groups:
            if group.spec.dynamic:
                continue
            attr = f"{OBSERVER_PREFIX}{group.id}"
            gm.add_submodule(attr, self.make_module(group.spec))
            state.observers[group.id] = attr
            for ref in group.members:
                if ref[0] != "out":
                    continue
                node = nodes[ref[1]]
                if is_op(node, RESHAPE) and _on_group_grid(node, group.id):
                    continue
                obs = observer_call(gm, group.id, node, node.next, self.name)
                node.replace_all_uses_with(obs, delete_user_cb=lambda user: user is not obs)
                inserted += 1
            edge_observer: dict[str, fx.Node] = {}  # producer name -> its observer call for this group
            for ref in group.members:
                if ref[0] != "in":
                    continue
                consumer, pos = nodes[ref[1]], ref[2]
                arg = get_arg(consumer, pos)
                if _on_group_grid(arg, group.id):
                    continue  # already quantized with this group's qparams
                if arg.name not in edge_observer:
                    # members come in graph order: before the first consumer dominates the others
                    edge_observer[arg.name] = observer_call(gm, group.id, arg, consumer, self.name)
                    inserted += 1
                set_arg(consumer, pos, edge_observer[arg.name])
        return PassResult(gm, modified=inserted > 0, stats={"observer calls": inserted,
                                                           "observers": len(state.observers)})
