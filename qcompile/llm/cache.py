"""The KV cache as explicit graph inputs and outputs: its layout, and the tensors a driver holds.

A captured causal-LM step is `forward(input_ids, *cache) -> (logits, *new_cache)`: for every
decoder layer, the cache entries (past keys, past values; the dynamic quantized cache adds their
scales) come in as graph inputs holding the `past` tokens, and the same entries of the `seq` new
tokens come out, in the same order. The graph never stores anything: the driver (generate.py)
keeps one buffer per entry and passes the filled prefix, so a step costs no copy of the cache.
Prefill is the same graph with an empty past (0 tokens).

The layout starts as float entries at capture; passes/kv_cache.py rewrites it when it quantizes
the cache (codes in int8 / float8, per-token scales as extra entries).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import InvalidInputsError


@dataclass(frozen=True)
class CacheEntry:
    """One cache tensor of one layer: [batch, kv_heads, tokens, last_dim] of `dtype`."""

    name: str              # the graph input's name, e.g. "past_key_3"
    layer: int
    role: str              # "key", "value", "key_scale", "value_scale"
    dtype: torch.dtype
    last_dim: int          # head_dim for keys/values, 1 for per-token scales


@dataclass
class KVCacheLayout:
    layers: int
    kv_heads: int
    head_dim: int
    max_seq_len: int               # the longest sequence (prompt + generated) the capture accepts
    entries: list[CacheEntry] = field(default_factory=list)
    spec: object = None            # the QuantSpec of a quantized cache (passes/kv_cache.py), None: float

    @staticmethod
    def float_cache(layers: int, kv_heads: int, head_dim: int, max_seq_len: int, dtype=torch.float32):
        entries = []
        for i in range(layers):
            entries.append(CacheEntry(f"past_key_{i}", i, "key", dtype, head_dim))
            entries.append(CacheEntry(f"past_value_{i}", i, "value", dtype, head_dim))
        return KVCacheLayout(layers, kv_heads, head_dim, max_seq_len, entries)

    def replace(self, **changes) -> "KVCacheLayout":
        return dataclasses.replace(self, **changes)

    def empty(self, batch: int, tokens: int = 0) -> list[Tensor]:
        """One zero tensor per entry for `tokens` tokens: the past of a prefill when tokens is 0,
        or the buffers a driver fills (tokens = max length)."""
        return [torch.zeros(batch, self.kv_heads, tokens, e.last_dim, dtype=e.dtype) for e in self.entries]

    def bytes_per_token(self) -> dict:
        """Cache bytes one token costs in each layer (keys + values + their scales), and in all layers."""
        per_layer = sum(self.kv_heads * e.last_dim * _itemsize(e.dtype) for e in self.entries if e.layer == 0)
        return {"per_layer": per_layer, "all_layers": per_layer * self.layers}

    def prefill_inputs(self, batch) -> tuple:
        """The step graph's arguments for a batch of token ids (a [batch, seq] tensor, a tuple holding
        one, or a dict with `input_ids` and an optional all-ones `attention_mask`): ids + an empty past."""
        ids = token_ids(batch)
        return (ids, *self.empty(ids.shape[0]))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def token_ids(batch) -> Tensor:
    """The [batch, seq] int64 token ids of a user batch; padded batches are rejected (the captured
    step has no attention-mask input: every row attends to all of its own tokens)."""
    mask = None
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise InvalidInputsError(f"a causal-LM batch given as a dict needs 'input_ids'; got keys {sorted(batch)}")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        extra = set(batch) - {"input_ids", "attention_mask"}
        if extra:
            raise InvalidInputsError(f"a causal-LM batch takes input_ids (and an all-ones attention_mask); "
                                     f"drop {sorted(extra)}")
    elif isinstance(batch, (tuple, list)) and len(batch) == 1:
        ids = batch[0]
    else:
        ids = batch
    if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
        what = f"shape {tuple(ids.shape)} {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
        raise InvalidInputsError(f"a causal-LM batch is a [batch, seq] tensor of token ids, got {what}")
    if mask is not None and not bool((mask == 1).all()):
        raise InvalidInputsError("this batch is padded (its attention_mask has zeros); the captured step attends to "
                                 "every token of a row. Give rows of equal length without padding, e.g. "
                                 "qcompile.testing.llm.token_chunks, or one prompt per batch")
    return ids.long()
