"""Group the tensors that must share qparams, with a union-find over TensorRefs.

Two tensors share when an annotation says so (SharedSpec: cat inputs and output, a reshape's
output and input). An input edge joins its producer's output, or another edge reading the same
producer, when both ask for the same spec: a tensor is quantized once however many consumers it
has (a TensorRT-style dedicated Q/DQ per consumer is an export profile's business, not this one's).
Each group gets one concrete QuantSpec; the result is stored as `QState.groups`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from networkx.utils import UnionFind
from torch import fx

from ..errors import RecipeError
from ..graph import ANNOTATION, STATE
from ..graph.annotation import get_arg
from ..spec import QuantSpec, SharedSpec
from .base import Pass, PassResult


@dataclass
class Group:
    id: int
    spec: QuantSpec
    members: list = field(default_factory=list)  # TensorRefs, in graph order


class ShareQParams(Pass):
    name = "share_qparams"

    def call(self, gm: fx.GraphModule) -> PassResult:
        uf = UnionFind()
        spec_of_root: dict = {}   # union-find root -> the set's concrete QuantSpec
        order: list[tuple] = []
        output_ref_of: dict[str, tuple] = {}  # name of a node whose output is annotated -> its ref
        edge_ref_of: dict[tuple, tuple] = {}  # (producer name, spec) -> first input edge reading it

        def spec_of(ref):
            return spec_of_root.get(uf[ref])

        def union(a, b):
            sa, sb = spec_of(a), spec_of(b)
            if sa is not None and sb is not None and sa != sb:
                raise RecipeError(f"tensors {a} and {b} must share qparams but ask for different specs")
            uf.union(a, b)
            spec_of_root[uf[a]] = sa or sb

        def add(ref, spec):
            uf[ref]  # registers the element
            order.append(ref)
            if isinstance(spec, SharedSpec):
                union(ref, spec.with_)
            else:
                union(ref, ref) if spec_of(ref) else spec_of_root.__setitem__(uf[ref], spec)

        for node in gm.graph.nodes:
            ann = node.meta.get(ANNOTATION)
            if ann is None:
                continue
            if ann.output is not None:  # registered first, so inputs shared with it resolve
                out_ref = ("out", ann.output_node or node.name)
                add(out_ref, ann.output)
            for pos, spec in ann.inputs.items():
                ref = ("in", node.name, pos)
                add(ref, spec)
                producer = get_arg(node, pos)
                producer_ref = output_ref_of.get(getattr(producer, "name", None))
                # One quantization of a tensor serves every consumer that wants the same spec.
                if producer_ref is not None and spec_of(producer_ref) == spec_of(ref):
                    union(ref, producer_ref)
                elif isinstance(producer, fx.Node) and isinstance(spec, QuantSpec):
                    first = edge_ref_of.setdefault((producer.name, spec), ref)
                    if first is not ref and spec_of(first) == spec_of(ref):
                        union(ref, first)
            if ann.output is not None:
                output_ref_of[out_ref[1]] = out_ref

        groups: list[Group] = []
        by_root: dict = {}
        for ref in order:
            root = uf[ref]
            if root not in by_root:
                by_root[root] = len(groups)
                groups.append(Group(len(groups), spec=spec_of_root[root]))
            groups[by_root[root]].members.append(ref)
        gm.meta[STATE].groups = groups
        return PassResult(gm, modified=False, stats={"groups": len(groups), "tensors": len(order)})
