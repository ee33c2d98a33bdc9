"""Small seeded attention blocks for tests: the attention forms real models use.

`AttentionBlock(dim, heads, kv_heads, form=...)`: q/k/v projections, attention, output projection;
`forward(x [B, S, dim], mask [B, S] of 0/1)`:

- "eager": HF BERT's eager attention: matmul(q, k^T) * scale + additive mask (finfo.min on padded
  keys, [B, 1, 1, S]) -> softmax -> matmul(p, v); with kv_heads < heads, K and V are repeated per
  query head as LLaMA's `repeat_kv` does (expand + reshape): grouped-query attention.
- "sdpa": torch.nn.functional.scaled_dot_product_attention with a boolean key mask (and
  `enable_gqa=True` for kv_heads < heads).
- "custom": the scores are masked multiplicatively, scores * m + (1 - m) * -1e4 (older BERT ports):
  not the additive pattern, so quantized attention leaves it float and says why.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FORMS = ("eager", "sdpa", "custom")


class AttentionBlock(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2, kv_heads: int | None = None, form: str = "eager", seed: int = 0):
        super().__init__()
        assert form in FORMS, form
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = dim // heads
        self.form = form
        g = torch.Generator().manual_seed(seed)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, self.kv_heads * self.head_dim)
        self.v = nn.Linear(dim, self.kv_heads * self.head_dim)
        self.o = nn.Linear(dim, dim)
        with torch.no_grad():
            for lin in (self.q, self.k, self.v, self.o):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / dim ** 0.5)
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
        self.eval()

    def _heads(self, x, n):
        b, s, _ = x.shape
        return x.view(b, s, n, self.head_dim).transpose(1, 2)

    def _repeat_kv(self, x):
        """LLaMA's repeat_kv: [B, kv, S, D] -> [B, heads, S, D]."""
        b, kv, s, d = x.shape
        n = self.heads // kv
        if n == 1:
            return x
        return x[:, :, None].expand(b, kv, n, s, d).reshape(b, kv * n, s, d)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = self._heads(self.q(x), self.heads), self._heads(self.k(x), self.kv_heads), self._heads(self.v(x), self.kv_heads)
        if self.form == "sdpa":
            keep = mask[:, None, None, :].bool()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=self.kv_heads != self.heads)
        else:
            k, v = self._repeat_kv(k), self._repeat_kv(v)
            scores = torch.matmul(q, k.transpose(-2, -1)) * self.head_dim ** -0.5
            m = mask[:, None, None, :].to(x.dtype)
            if self.form == "eager":
                scores = scores + (1.0 - m) * torch.finfo(x.dtype).min
            else:
                scores = scores * m + (1.0 - m) * -1e4
            out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


def attention_inputs(batch: int, seq: int, dim: int = 32, seed: int = 0, n: int = 1, pad: bool = True):
    """`n` batches of (x, mask): x ~ N(0, 1); with `pad`, row i of a batch keeps its first
    seq - i % 3 * (seq // 4) tokens (padded keys at the end), the first row none padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch, seq, dim, generator=g)
        mask = torch.ones(batch, seq, dtype=torch.int64)
        if pad:
            for i in range(batch):
                keep = seq - (i % 3) * (seq // 4)
                mask[i, keep:] = 0
        out.append((x, mask))
    return out
