"""A transformers tokenizer as GGUF metadata (`tokenizer.ggml.*`), the way llama.cpp reads it.

Byte-level BPE tokenizers (GPT-2 style: SmolLM2, GPT-2, Qwen, LLaMA 3) are `tokenizer.ggml.model =
"gpt2"`: the tokens by id, their types (special added tokens are CONTROL, other added tokens
USER_DEFINED, padding rows of a larger embedding UNUSED), the merges, and `tokenizer.ggml.pre`, the
name of llama.cpp's pre-tokenizer (its regex). The pre name is not recorded in a transformers
tokenizer: llama.cpp's converter recognizes known tokenizers by a hash of their output, which this
exporter does not carry. A byte-level pre-tokenizer with the GPT-2 regex alone is "gpt-2"; pass
`pre=` for another ("smollm", "llama-bpe", "qwen2", ... as in llama.cpp's llama-vocab.cpp).
SentencePiece tokenizers ("llama" model) are not written yet.
"""
from __future__ import annotations

import json

import gguf

from ...errors import GGUFExportError


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(f"tokenizer {type(tokenizer).__name__} has no `tokenizers` backend (a fast tokenizer): "
                              "load it with transformers.AutoTokenizer (use_fast=True)")
    return json.loads(backend.to_str())


def _default_pre(pre_tokenizer: dict | None) -> str:
    if pre_tokenizer and pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return "gpt-2"
    raise GGUFExportError(f"cannot tell which llama.cpp pre-tokenizer matches {json.dumps(pre_tokenizer)[:200]}: pass "
                          "export_gguf(..., pre='<name>') with the name llama.cpp uses for it (e.g. 'llama-bpe')")


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, pre: str | None = None) -> None:
    """Write `tokenizer` for a model whose embedding has `vocab_size` rows."""
    if tokenizer is None:
        raise GGUFExportError("export_gguf needs the model's tokenizer (tokenizer=...): llama.cpp refuses a file "
                              "without tokenizer.ggml.model and tokenizer.ggml.tokens")
    spec = _backend_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFExportError(f"only byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2') are written; this one is "
                              f"{model.get('type')!r} with decoder {(spec.get('decoder') or {}).get('type')!r} "
                              "(SentencePiece 'llama' tokenizers are not supported yet)")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has {len(vocab)} tokens (ids up to {max(vocab.values())}) but the model's "
                              f"embedding has {vocab_size} rows: pass the model's own tokenizer")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or _default_pre(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise GGUFExportError("the BPE tokenizer has no merges; llama.cpp cannot tokenize without them")
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    writer.add_add_bos_token(bool(bos is not None and len(probe) > len(plain) and probe[0] == bos))
    writer.add_add_eos_token(bool(eos is not None and len(probe) > len(plain) and probe[-1] == eos))
    writer.add_add_space_prefix(bool((spec.get("pre_tokenizer") or {}).get("add_prefix_space", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
