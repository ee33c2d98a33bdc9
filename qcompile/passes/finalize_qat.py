"""Turn a trained QAT graph back into the prepared-PTQ form that convert_qdq materializes.

- the simulated BatchNorm fold becomes a real one: the conv reads the folded weight and bias as
  constants (computed by the same float32 code the QAT forward used, so the eval-mode QAT model
  and the converted model see identical weights);
- weight and dynamic fake-quant calls are removed (convert_qdq quantizes the weight itself, with
  the learned qparams when LSQ learned them: `state.weight_qparams`);
- activation FakeQuantize modules stay: they expose the observer interface convert_qdq reads.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from ..fake_quant import WeightFakeQuantize
from ..graph import FROM_PASS, STATE
from .base import Pass, PassResult
from .fold_bn_qat import BN_FOLD_PREFIX, is_folded_batch_norm, is_folded_weight
from .insert_fake_quant import DYNAMIC_FQ_PREFIX, WEIGHT_FQ_PREFIX


class FinalizeQAT(Pass):
    name = "finalize_qat"

    def call(self, gm: fx.GraphModule) -> PassResult:
        state = gm.meta[STATE]
        folded = removed = learned = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            if node.target.startswith(WEIGHT_FQ_PREFIX):
                fq = gm.get_submodule(node.target)
                source = node.args[0]
                if fq.learn_scale:
                    w_node = source.args[0] if is_folded_weight(source) else source
                    state.weight_qparams[w_node.target] = fq.qparams(torch.empty(0))
                    learned += 1
                node.replace_all_uses_with(source)
                gm.graph.erase_node(node)
                removed += 1
            elif node.target.startswith(DYNAMIC_FQ_PREFIX):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                removed += 1
        for node in list(gm.graph.nodes):
            if is_folded_batch_norm(node):
                self._fold(gm, node)
                folded += 1
        gm.graph.eliminate_dead_code()
        for name, _ in list(gm.named_children()):
            if name.startswith((BN_FOLD_PREFIX, WEIGHT_FQ_PREFIX, DYNAMIC_FQ_PREFIX)):
                delattr(gm, name)
        return PassResult(gm, modified=bool(folded or removed),
                          stats={"batch_norm folded": folded, "fake-quant removed": removed, "learned weight qparams": learned})

    def _fold(self, gm: fx.GraphModule, post: fx.Node) -> None:
        producer = post.args[0]
        w_fold = producer.args[1]
        assert is_folded_weight(w_fold), f"{producer} does not read a folded weight"
        w_node = w_fold.args[0]
        st = gm.get_submodule(post.target).state
        with torch.no_grad():
            weight = gm.get_submodule(w_fold.target)(_resolve(gm, w_node.target)).detach().clone()
            bias = st.folded_bias().detach().clone()
        base = w_node.target.replace(".", "_")
        gm.register_parameter(base + "_bn_folded", nn.Parameter(weight, requires_grad=False))
        gm.register_parameter(base + "_bn_folded_bias", nn.Parameter(bias, requires_grad=False))
        with gm.graph.inserting_before(producer):
            new_w = gm.graph.get_attr(base + "_bn_folded")
            new_b = gm.graph.get_attr(base + "_bn_folded_bias")
        for n, val in ((new_w, weight), (new_b, bias)):
            n.meta.update({FROM_PASS: self.name, "val": val})
        state = gm.meta[STATE]
        if w_node.target in state.weight_qparams:  # learned on the folded weight: follow it
            state.weight_qparams[new_w.target] = state.weight_qparams.pop(w_node.target)
        args = list(producer.args)
        args[1], args[2] = new_w, new_b
        producer.args = tuple(args)
        post.replace_all_uses_with(producer)
        gm.graph.erase_node(post)
        gm.graph.erase_node(w_fold)


def _resolve(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
