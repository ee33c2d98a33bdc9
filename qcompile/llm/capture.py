"""Capture a transformers causal LM as one step graph with its KV cache as explicit tensors.

`forward(input_ids, *cache) -> (logits, *new_cache)` (layout in cache.py), exported once with
dynamic batch, sequence and past lengths, so the same graph - and the same quantized weights -
runs the prefill (a prompt, empty past) and every decode step (one token, the past so far).

Why this shape rather than transformers' static-cache export path (`StaticCache` buffers mutated
in place, attention over the whole preallocated length every step): the cache stays a plain
value the graph reads and returns, so a pass can quantize it on write and dequantize it on read
without learning about buffer mutation, its dtype and scales are part of the graph's interface,
and a decode step attends over the tokens so far only. The model's own attention code runs
unchanged: a `Cache` whose layers hold the given past tensors records what each layer writes.
"""
from __future__ import annotations

import copy
import types

import torch
from torch import fx, nn

from ..capture import _explain_export_failure, _first_line, _strip_guards
from ..errors import CaptureError, InvalidInputsError, InvalidModelError
from .cache import KVCacheLayout, token_ids

DEFAULT_MAX_SEQ_LEN = 4096


def is_causal_lm(model: nn.Module) -> bool:
    """A transformers decoder-only model that generates text (LlamaForCausalLM, Qwen2ForCausalLM, ...)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    config = getattr(model, "config", None)
    return (isinstance(model, PreTrainedModel) and model.can_generate()
            and not getattr(config, "is_encoder_decoder", False))


def _step_cache(past: list[torch.Tensor]):
    """A transformers Cache whose layer i starts with past[2i] / past[2i + 1] (keys / values) and
    keeps what the layer writes; built per call, so export traces it like any Python object."""
    from transformers.cache_utils import Cache, DynamicLayer

    class StepLayer(DynamicLayer):
        def __init__(self, keys, values):
            super().__init__()
            self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True
            self.written = None

        def update(self, key_states, value_states, *args, **kwargs):
            self.written = (key_states, value_states)
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            return self.keys, self.values

        def get_seq_length(self):
            return self.keys.shape[-2]  # the symbolic past length (DynamicLayer's `numel() == 0` test would guard on it)

    return Cache(layers=[StepLayer(past[i], past[i + 1]) for i in range(0, len(past), 2)])


def step_forward(lm: nn.Module, input_ids: torch.Tensor, past: list[torch.Tensor]):
    """One step of `lm`: token ids and the past cache in, logits and the new tokens' keys/values out.
    Bound as the forward of the captured copy, so the graph's parameter and module names are the
    model's own (recipe patterns such as "lm_head" and exporters' name maps work unchanged)."""
    cache = _step_cache(past)
    start = past[0].shape[2]
    positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    out = type(lm).forward(lm, input_ids=input_ids, cache=cache, position_ids=positions, use_cache=True)
    written = []
    for i, layer in enumerate(cache.layers):
        if layer.written is None:
            raise CaptureError(f"decoder layer {i} of {type(lm).__name__} never wrote its KV cache through "
                               "transformers' Cache.update; qcompile captures caches that way only")
        written.extend(layer.written)
    return (out.logits, *written)


def _cache_geometry(lm: nn.Module, ids: torch.Tensor) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) read from what the model writes on a real call."""
    with torch.no_grad():
        out = lm(input_ids=ids[:1, :2], use_cache=True)
    kv = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if kv is None or not getattr(kv, "layers", None):
        raise CaptureError(f"{type(lm).__name__} returned no transformers Cache with use_cache=True; "
                           "qcompile captures decoder LLMs whose attention writes a Cache")
    silent = [i for i, layer in enumerate(kv.layers) if not getattr(layer, "is_initialized", False)]
    if silent:
        raise CaptureError(f"decoder layer {silent[0]} of {type(lm).__name__} never wrote its KV cache through "
                           f"transformers' Cache.update ({len(silent)} of {len(kv.layers)} layers did not); qcompile "
                           "captures caches that way only: use the model's stock attention, or exclude nothing and "
                           "capture it without a cache by wrapping its forward (use_cache=False)")
    keys = kv.layers[0].keys
    return len(kv.layers), keys.shape[1], keys.shape[3]


def capture_causal_lm(model: nn.Module, example_inputs, max_seq_len: int | None = None
                      ) -> tuple[fx.GraphModule, KVCacheLayout]:
    """Export an eval-mode copy of a transformers causal LM as a step graph; the model is left as it was."""
    if not is_causal_lm(model):
        raise InvalidModelError(f"{type(model).__name__} is not a transformers causal LM (a PreTrainedModel that "
                                "can generate and is not encoder-decoder)")
    ids = token_ids(example_inputs)
    limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_SEQ_LEN
    if getattr(model.config, "sliding_window", None):
        limit = min(limit, int(model.config.sliding_window))  # the step cache keeps every token: stay in the window
    max_seq_len = min(limit, DEFAULT_MAX_SEQ_LEN) if max_seq_len is None else int(max_seq_len)
    if not 2 <= max_seq_len <= limit:
        raise InvalidInputsError(f"max_seq_len={max_seq_len} is outside [2, {limit}] (the model's positions"
                                 f"{' and sliding window' if getattr(model.config, 'sliding_window', None) else ''})")
    lm = copy.deepcopy(model).eval()
    try:
        layers, kv_heads, head_dim = _cache_geometry(lm, ids)
    except CaptureError:
        raise
    except Exception as e:  # the example itself is wrong (token ids out of range, ...)
        raise InvalidInputsError(f"the model rejects the example token ids: {type(e).__name__}: {_first_line(e)}") from e
    layout = KVCacheLayout.float_cache(layers, kv_heads, head_dim, max_seq_len,
                                       dtype=next(lm.parameters()).dtype)
    # Export on sizes that are not 0 or 1 (torch.export specializes those) and then accept any.
    example_ids = ids[:1, :2].repeat(2, 2)
    example_past = [torch.randn(2, kv_heads, 3, head_dim, dtype=e.dtype) for e in layout.entries]
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    past = torch.export.Dim("past", min=0, max=max_seq_len - 1)
    dynamic_shapes = {"input_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past}] * len(example_past)}
    lm.forward = types.MethodType(step_forward, lm)  # the copy's own forward, not the user's model
    try:
        ep = torch.export.export(lm, (example_ids, example_past), dynamic_shapes=dynamic_shapes, strict=False)
    except CaptureError:
        raise
    except Exception as e:
        raise CaptureError("capturing the causal LM with its KV cache failed: " + _explain_export_failure(e)) from e
    gm = ep.module()
    _strip_guards(gm)
    _flatten_signature(gm, layout)
    return gm, layout


def _flatten_signature(gm: fx.GraphModule, layout: KVCacheLayout) -> None:
    """forward(input_ids, past_key_0, past_value_0, ...) -> (logits, key_0, value_0, ...): plain
    positional inputs and a flat output tuple, so a pass can add cache entries (scales) by adding
    placeholders and outputs, and drivers call it without pytree specs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1 + len(layout.entries), (len(placeholders), len(layout.entries))
    for node, name in zip(placeholders, ["input_ids"] + [e.name for e in layout.entries]):
        node.target = name
        node._rename(name)
    gm.graph._codegen = fx.graph.CodeGen()
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            delattr(gm, attr)
    # torch.export's pre-hook checks calls against the pytree spec just removed; the drivers
    # (cache.py, generate.py) check token ids and cache lengths themselves
    gm.validate_inputs = False
    gm.recompile()
