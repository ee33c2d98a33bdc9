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
