"""Greedy generation with a captured (prepared, converted or lowered) causal-LM step graph.

A small loop rather than transformers' `generate`: the step graph takes its cache as explicit
tensors in the layout the KV-cache pass chose (int8 or fp8 codes, per-token scales), which no
transformers Cache class holds. The loop keeps one buffer per cache entry, sized for the whole
generation, and passes each step the filled prefix (a view, no copy); each step's new entries
are written after it.
"""
from __future__ import annotations

import torch
from torch import Tensor, fx
from tqdm.auto import tqdm

from ..errors import InvalidInputsError, InvalidModelError
from ..graph import STATE
from .cache import KVCacheLayout, token_ids


def step_layout(model) -> KVCacheLayout:
    """The KV-cache layout of a module qcompile captured from a causal LM."""
    state = getattr(model, "meta", {}).get(STATE) if isinstance(model, fx.GraphModule) else None
    if state is None or state.cache is None:
        raise InvalidModelError(f"this takes a causal LM prepared by qc.prepare (or converted / lowered from one); "
                                f"got {type(model).__name__}{' without a KV cache' if state is not None else ''}")
    return state.cache


def prefill_logits(model: fx.GraphModule, ids: Tensor) -> Tensor:
    """[batch, seq, vocab] logits of token ids read from the first token (an empty cache)."""
    layout = step_layout(model)
    _check_length(layout, ids.shape[1], 0)
    with torch.no_grad():
        return model(*layout.prefill_inputs(ids))[0]


def _check_length(layout: KVCacheLayout, prompt: int, new: int) -> None:
    if prompt + new > layout.max_seq_len:
        raise InvalidInputsError(f"a prompt of {prompt} tokens plus {new} new tokens is longer than the "
                                 f"{layout.max_seq_len} tokens the model was captured for; shorten the prompt or "
                                 f"max_new_tokens, or prepare with a larger max_seq_len=")


def _stop_ids(eos_token_id, tokenizer) -> set[int]:
    ids = eos_token_id
    if ids is None and tokenizer is not None:
        ids = getattr(tokenizer, "eos_token_id", None)
    if ids is None:
        return set()
    return {int(i) for i in (ids if isinstance(ids, (list, tuple, set)) else [ids])}


@torch.no_grad()
def generate(model: fx.GraphModule, prompt, max_new_tokens: int = 64, *, tokenizer=None, eos_token_id=None,
             progress: bool | None = None):
    """Greedy decoding: the prompt is read in one step (prefill), then one token per step.

    `prompt`: a [batch, seq] tensor of token ids (rows of equal length, no padding), or a string
    when `tokenizer` is given. Generation stops at `max_new_tokens` or when every row has produced
    a stop token (`eos_token_id`: an id or a list of ids; default the tokenizer's EOS); a row that
    stopped is filled with its stop token. Returns the new token ids [batch, <= max_new_tokens], or
    the decoded text when the prompt was a string. `progress`: a progress bar (default: on for
    256 tokens or more)."""
    layout = step_layout(model)
    as_text = isinstance(prompt, str)
    if as_text:
        if tokenizer is None:
            raise InvalidInputsError("a text prompt needs tokenizer=; or pass token ids")
        prompt = tokenizer(prompt, return_tensors="pt").input_ids
    ids = token_ids(prompt)
    if max_new_tokens < 1:
        raise InvalidInputsError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    batch, length = ids.shape
    _check_length(layout, length, max_new_tokens)
    stops = _stop_ids(eos_token_id, tokenizer)
    buffers = layout.empty(batch, length + max_new_tokens)
    out = model(ids, *layout.empty(batch))
    filled = 0
    new_tokens, done = [], torch.zeros(batch, dtype=torch.bool)
    bar = tqdm(total=max_new_tokens, desc="generating", unit="tok",
               disable=not (progress if progress is not None else max_new_tokens >= 256))
    try:
        while True:
            logits, written = out[0], out[1:]
            tokens = written[0].shape[2]
            for buf, new in zip(buffers, written):
                buf[:, :, filled:filled + tokens] = new
            filled += tokens
            token = logits[:, -1].argmax(-1)
            if new_tokens:
                token = torch.where(done, new_tokens[-1], token)
            new_tokens.append(token)
            bar.update(1)
            done |= torch.tensor([int(t) in stops for t in token])
            if len(new_tokens) == max_new_tokens or bool(done.all()):
                break
            out = model(token[:, None], *(buf[:, :, :filled] for buf in buffers))
    finally:
        bar.close()
    result = torch.stack(new_tokens, dim=1)
    if as_text:
        return tokenizer.decode(result[0], skip_special_tokens=True)
    return result
