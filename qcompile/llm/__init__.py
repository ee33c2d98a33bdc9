"""Decoder LLMs: capture with an explicit KV cache, greedy generation, perplexity."""
from .cache import KVCacheLayout
from .capture import capture_causal_lm, is_causal_lm
from .evaluate import perplexity
from .generate import generate, prefill_logits

__all__ = ["KVCacheLayout", "capture_causal_lm", "is_causal_lm", "generate", "prefill_logits", "perplexity"]
