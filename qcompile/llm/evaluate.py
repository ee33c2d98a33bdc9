"""Language-model evaluation: perplexity of a model (or any callable returning logits) on token chunks."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor


def _logits(model: Callable, ids: Tensor) -> Tensor:
    if getattr(getattr(model, "meta", {}).get("qcompile"), "cache", None) is not None:
        from .generate import prefill_logits  # a captured causal-LM step: its cache starts empty

        return prefill_logits(model, ids)
    out = model(ids)
    if isinstance(out, (tuple, list)):  # a captured graph returns (logits, cache...)
        out = out[0]
    return getattr(out, "logits", out)  # a transformers ModelOutput


@torch.no_grad()
def perplexity(model: Callable, chunks: Tensor, batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood) of every token of `chunks` [n, seq] after its first, each
    chunk read on its own from its first token (no context carried between chunks).

    `model` maps [batch, seq] token ids to [batch, seq, vocab] logits: a transformers causal LM,
    a module qcompile captured, or a plain function. The NLL is summed in float64."""
    if chunks.ndim != 2 or chunks.shape[1] < 2:
        raise ValueError(f"chunks must be [n, seq] token ids with seq >= 2, got shape {tuple(chunks.shape)}")
    total, count = 0.0, 0
    for start in range(0, chunks.shape[0], batch_size):
        ids = chunks[start:start + batch_size]
        logits = _logits(model, ids)[:, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def fold_weight_dequantize(gm):
    """A copy of a quantized module whose weight dequantizations (dequantize ops that read only stored
    tensors) ran once, their float results stored in their place: the reference graph's numbers,
    without dequantizing every weight at every step. For evaluation (perplexity, long generations)
    where memory is not the point; deployment lowers the graph instead (`qc.lower`)."""
    import copy

    from torch import fx

    folded = copy.deepcopy(gm)
    graph = folded.graph
    dequantize_ops = {torch.ops.qcompile.dequantize.default}
    if hasattr(torch.ops.qcompile, "dequantize_nf4"):
        dequantize_ops.add(torch.ops.qcompile.dequantize_nf4.default)
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in dequantize_ops:
            continue
        inputs = [a for a in node.args if isinstance(a, fx.Node)]
        if not inputs or any(a.op != "get_attr" for a in inputs):
            continue
        args = [getattr_path(folded, a.target) if isinstance(a, fx.Node) else a for a in node.args]
        name = f"qc_folded_{count}"
        folded.register_buffer(name, node.target(*args))
        with graph.inserting_before(node):
            constant = graph.get_attr(name)
        constant.meta = dict(node.meta)
        node.replace_all_uses_with(constant)
        graph.erase_node(node)
        count += 1
    graph.eliminate_dead_code()
    for name in [n for n, _ in folded.named_buffers() if n.startswith("qc_w_")]:
        if not any(n.op == "get_attr" and n.target == name for n in graph.nodes):
            delattr(folded, name)
    folded.recompile()
    return folded


def getattr_path(module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module
