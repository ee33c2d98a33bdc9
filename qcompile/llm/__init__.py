"""Decoder LLMs: evaluation (perplexity); capture with a KV cache and generation come next."""
from .evaluate import perplexity

__all__ = ["perplexity"]
