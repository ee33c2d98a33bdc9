"""Give the other readers of a weighted op's parameter their own attribute (same tensor, no copy).

    %w = get_attr[lm_head.weight]            %w = get_attr[lm_head.weight]
    embedding(%w, ids)              ==>      %w2 = get_attr[lm_head.weight_for_embedding]  (the same tensor)
    linear(h, %w)                            embedding(%w2, ids);  linear(h, %w)

A tied LM head (SmolLM2, TinyLlama-style models with tie_word_embeddings) is one parameter read by
the embedding lookup and by lm_head's linear. The PTQ algorithms rewrite the weight of the linear
they quantize (GPTQ stores the dequantized weight, AWQ / SmoothQuant rescale it) by replacing the
attribute the linear reads; when the embedding read the same attribute it looked up rows of the
quantized lm_head instead of the model's embedding (SmolLM2 with GPTQ: rows off by up to 0.33).
After this pass the float graph is identical (both attributes hold the very same Parameter); a
later rewrite of one attribute leaves the other reader with the original tensor.
Only readers that are not themselves weighted ops are moved: weights shared between linears
(ALBERT's repeated layers) stay one attribute, quantized once. A recipe that quantizes embedding
tables (the GGUF recipes) keeps the tie: there the table is one set of codes read by the lookup and
by the LM head, which is what a tied GGUF file stores and llama.cpp computes.
"""
from __future__ import annotations

from torch import fx

from ..graph import EMBEDDING, WEIGHTED, get_param, is_op
from ..spec import Recipe
from .base import Pass, PassResult

WEIGHT_ARG = 1


def _reads_as_weight(user: fx.Node, attr: fx.Node) -> bool:
    return is_op(user, WEIGHTED) and len(user.args) > WEIGHT_ARG and user.args[WEIGHT_ARG] is attr


class UntieWeights(Pass):
    name = "untie_weights"

    def __init__(self, recipe: Recipe | None = None):
        self.keeps_quantized_tables = recipe is not None and recipe.weight is not None and "embedding" in recipe.ops

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.keeps_quantized_tables and any(is_op(n, EMBEDDING) for n in gm.graph.nodes):
            return PassResult(gm, modified=False, stats={"readers_moved": 0, "kept": "the recipe quantizes tables"})
        moved = 0
        for node in list(gm.graph.nodes):
            if node.op != "get_attr" or not any(_reads_as_weight(u, node) for u in node.users):
                continue
            others = [u for u in node.users if not _reads_as_weight(u, node)]
            if not others:
                continue
            owner_path, _, attr = node.target.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            name = self._free_name(owner, f"{attr}_for_{others[0].name}")
            value = get_param(gm, node)
            if attr in owner._parameters:
                owner.register_parameter(name, owner._parameters[attr])
            else:
                owner.register_buffer(name, value, persistent=attr not in owner._non_persistent_buffers_set)
            with gm.graph.inserting_after(node):
                twin = gm.graph.get_attr(f"{owner_path}.{name}" if owner_path else name)
            twin.meta.update(node.meta)
            for user in others:
                user.replace_input_with(node, twin)
            moved += len(others)
        return PassResult(gm, modified=moved > 0, stats={"readers_moved": moved})

    @staticmethod
    def _free_name(owner, base: str) -> str:
        name, i = base, 0
        while hasattr(owner, name):
            i += 1
            name = f"{base}_{i}"
        return name
