"""GGUF export for llama.cpp: block formats (blocks.py), the LLaMA conventions (llama.py), the tokenizer
(tokenizer.py), the writer (export.py), and llama.cpp itself run in a child process (runtime.py).
The `gguf` package is imported on first use: qcompile itself does not need it."""
from __future__ import annotations

import os
import pathlib

from ...errors import GGUFExportError


def export_gguf(model, path: "str | os.PathLike", *, tokenizer, config=None, float_type: str = "f32",
                pre: str | None = None, name: str | None = None) -> pathlib.Path:
    """Write `model` as a GGUF file for llama.cpp at `path` and return the path.

    - `model`: what `qc.convert` returns, quantized with a gguf-* recipe (gguf-q8_0, gguf-q4_0,
      gguf-q4_1 and their -weight-only forms, with or without GPTQ / AWQ): of the LLaMA model itself
      (its KV-cache step graph; the cache left float: llama.cpp picks its cache type at run time) or
      of a wrapper module whose forward returns the logits; or a float transformers LLaMA model (an nn.Module);
      or what `qc.quantize_sequential` returns (written stage by stage, never the whole model in memory). Each quantized weight's codes and scales are written as they are
      (no re-quantization), so llama.cpp decodes exactly the reference graph's weights.
    - `tokenizer`: the model's transformers tokenizer (byte-level BPE); `pre`: llama.cpp's pre-tokenizer
      name when it is not GPT-2's regex (e.g. "smollm", "llama-bpe").
    - `config`: the transformers config; by default the one `qc.prepare` kept (`state.model_config`),
      or `model.config`.
    - `float_type`: "f32" (exact) or "f16" for 2-D weights left in float; 1-D tensors stay F32.
    - `name`: `general.name` (default: the config's model name).

    The file is written under a temporary name and renamed. What cannot be written exactly (another
    architecture, a weight format no GGUF type holds, ops a PTQ pass inserted that llama.cpp's graph
    lacks) raises `GGUFExportError` naming it."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GGUFExportError("GGUF export needs the gguf package: pip install gguf==0.19.0") from None
    from ...sequential.result import QuantizedCheckpoint

    if isinstance(model, QuantizedCheckpoint):   # a sequential run's folder: streamed, one stage at a time
        return model.export_gguf(path, tokenizer=tokenizer, config=config, float_type=float_type, pre=pre, name=name)
    from .export import write_gguf

    return write_gguf(model, path, tokenizer=tokenizer, config=config, float_type=float_type, pre=pre, name=name)


__all__ = ["export_gguf"]
