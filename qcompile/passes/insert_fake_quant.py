"""Insert fake-quantization for QAT, from the same annotations and sharing groups as PTQ.

- one `FakeQuantize` per static sharing group, placed exactly where insert_observers places
  observers (it reuses that pass with a different module factory), named like observers so that
  `convert` turns each into the group's quantize/dequantize pair;
- a `WeightFakeQuantize` between every annotated weight and its op (after the BatchNorm fold of
  fold_bn_qat.py, when there is one);
- a `DynamicFakeQuantize` on every dynamic (per-token) input edge.

Histogram observers (percentile, MSE) cost a histogram per training step; QAT activations use a
moving-average min-max observer instead, as torch.ao's QAT does. `qc.calibrate` on the QAT module
before training gives that average its starting range (the "start from PTQ qparams" flow).
"""
from __future__ import annotations

import dataclasses

from torch import fx

from ..fake_quant import DynamicFakeQuantize, FakeQuantize, WeightFakeQuantize
from ..graph import ANNOTATION, FROM_PASS, get_param
from ..graph.annotation import get_arg, set_arg
from ..spec import QuantSpec
from .base import Pass, PassResult
from .fold_bn_qat import is_folded_weight
from .insert_observers import InsertObservers

WEIGHT_FQ_PREFIX = "qc_weight_fq_"
DYNAMIC_FQ_PREFIX = "qc_dynamic_fq_"


def qat_activation_spec(spec: QuantSpec) -> QuantSpec:
    if spec.observer in ("percentile", "mse"):
        return dataclasses.replace(spec, observer="moving_average")
    return spec


class InsertFakeQuant(Pass):
    name = "insert_fake_quant"

    def __init__(self, learn_scales: bool = False):
        self.learn_scales = learn_scales

    def call(self, gm: fx.GraphModule) -> PassResult:
        activations = InsertObservers(lambda spec: FakeQuantize(qat_activation_spec(spec), self.learn_scales))
        stats = dict(activations.call(gm).stats)
        weights = dynamic = 0
        for node in list(gm.graph.nodes):
            ann = node.meta.get(ANNOTATION)
            if ann is None:
                continue
            if ann.weight is not None:
                pos, spec = ann.weight
                w = get_arg(node, pos)
                source = w.args[0] if is_folded_weight(w) else w
                latent = get_param(gm, source)
                if is_folded_weight(w):
                    latent = gm.get_submodule(w.target)(latent)
                attr = f"{WEIGHT_FQ_PREFIX}{weights}"
                gm.add_submodule(attr, WeightFakeQuantize(spec, latent.detach(), self.learn_scales))
                set_arg(node, pos, self._call(gm, attr, w, node))
                weights += 1
            for pos, spec in ann.inputs.items():
                if getattr(spec, "dynamic", False):
                    attr = f"{DYNAMIC_FQ_PREFIX}{dynamic}"
                    gm.add_submodule(attr, DynamicFakeQuantize(spec))
                    set_arg(node, pos, self._call(gm, attr, get_arg(node, pos), node))
                    dynamic += 1
        stats.update({"weight fake-quant": weights, "dynamic fake-quant": dynamic})
        return PassResult(gm, modified=True, stats=stats)

    def _call(self, gm: fx.GraphModule, attr: str, arg: fx.Node, before: fx.Node) -> fx.Node:
        with gm.graph.inserting_before(before):
            node = gm.graph.call_module(attr, (arg,))
        node.meta.update({FROM_PASS: self.name, "val": arg.meta.get("val")})
        if "nn_module_stack" in before.meta:
            node.meta["nn_module_stack"] = before.meta["nn_module_stack"]
        return node
