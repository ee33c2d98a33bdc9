"""A transformers causal LM as a module that torch.export captures: token ids in, logits out."""
from __future__ import annotations

import torch
from torch import nn


class CausalLMLogits(nn.Module):
    """`forward(input_ids) -> logits` of `hf_model(input_ids=..., use_cache=False)`: no cache object in
    the outputs, so `qc.prepare(CausalLMLogits(model), (ids,), recipe)` captures the whole model, and
    `prepare` keeps `model.config` for exporters (the module is held as `.hf`)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits
