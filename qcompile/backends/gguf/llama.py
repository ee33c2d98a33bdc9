"""llama.cpp's conventions for the LLaMA architecture: hyperparameters from a transformers config,
tensor names, and the Q/K row permutation its RoPE needs.

Traps that load silently and compute garbage, each handled here (measured: ../shared/gguf-notes.md):
- RoPE pairing: transformers rotates the two halves of each head (rotate_half), llama.cpp rotates
  adjacent pairs, so the rows of Q and K are permuted per head (K with the KV head count);
- `llama.rope.freq_base` defaults to 10000 and `attention.head_count_kv` to the head count: both are
  always written (SmolLM2 uses 1e5 and 3 KV heads for 9 query heads);
- `attention.key_length` / `value_length` when head_dim is not hidden / heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch

from ...errors import GGUFExportError

ARCH = gguf.MODEL_ARCH.LLAMA


@dataclass(frozen=True)
class LlamaHParams:
    n_layers: int
    hidden: int
    ffn: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    context: int
    vocab: int
    tied: bool
    attention_bias: bool
    mlp_bias: bool
    name: str


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in (None, "default"):
        raise GGUFExportError(f"RoPE scaling {rope_type!r} is not written by this exporter (only the default RoPE): "
                              "missing its llama.rope.scaling keys / rope_freqs tensor")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise GGUFExportError("the config has no rope_theta (config.rope_parameters['rope_theta']); llama.cpp would "
                              "silently use 10000")
    return float(theta)


def llama_hparams(config) -> LlamaHParams:
    """The hyperparameters llama.cpp needs, or GGUFExportError naming what is missing or not LLaMA."""
    if config is None:
        raise GGUFExportError("no model config: export_gguf reads the hyperparameters (layers, heads, RoPE base) "
                              "from the transformers config that qc.prepare keeps (state.model_config); pass "
                              "config=hf_model.config")
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise GGUFExportError(f"GGUF export covers the LLaMA architecture (config.model_type 'llama'); this model is "
                              f"{model_type!r}: missing its llama.cpp tensor names, hyperparameter keys and graph "
                              "conventions")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise GGUFExportError(f"llama.cpp's LLaMA graph uses SiLU gating; this config has hidden_act={act!r}")
    n_head = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // n_head)
    return LlamaHParams(
        n_layers=int(config.num_hidden_layers), hidden=hidden, ffn=int(config.intermediate_size), n_head=n_head,
        n_head_kv=int(getattr(config, "num_key_value_heads", None) or n_head), head_dim=head_dim,
        rope_theta=_rope_theta(config), rms_eps=float(config.rms_norm_eps),
        context=int(getattr(config, "max_position_embeddings", 2048)), vocab=int(config.vocab_size),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(config, "attention_bias", False)), mlp_bias=bool(getattr(config, "mlp_bias", False)),
        name=str(getattr(config, "_name_or_path", "") or "llama"))


def write_hparams(writer: gguf.GGUFWriter, hp: LlamaHParams) -> None:
    writer.add_context_length(hp.context)
    writer.add_embedding_length(hp.hidden)
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(hp.ffn)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_vocab_size(hp.vocab)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim * hp.n_head != hp.hidden:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)


def expected_tensors(hp: LlamaHParams) -> list[str]:
    """The GGUF tensors llama.cpp's LLaMA loader needs (output.weight only for untied embeddings)."""
    names = ["token_embd.weight", "output_norm.weight"] + ([] if hp.tied else ["output.weight"])
    for i in range(hp.n_layers):
        for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                  "ffn_down"):
            names.append(f"blk.{i}.{t}.weight")
        if hp.attention_bias:
            names += [f"blk.{i}.{t}.bias" for t in ("attn_q", "attn_k", "attn_v", "attn_output")]
        if hp.mlp_bias:
            names += [f"blk.{i}.{t}.bias" for t in ("ffn_gate", "ffn_up", "ffn_down")]
    return names


class NameMap:
    """transformers parameter names -> GGUF tensor names, whatever prefix a wrapper module adds
    ("hf.model.layers.3.self_attn.q_proj.weight" -> "blk.3.attn_q.weight")."""

    def __init__(self, n_layers: int):
        self._map = gguf.get_tensor_name_map(ARCH, n_layers)

    def __call__(self, key: str) -> str | None:
        parts = key.split(".")
        for start in range(len(parts) - 1):
            name = self._map.get_name(".".join(parts[start:]), try_suffixes=(".weight", ".bias"))
            if name is not None:
                return name
        return None


def rope_permutation(gguf_name: str, hp: LlamaHParams) -> int | None:
    """The number of heads whose rows are permuted for llama.cpp's RoPE (Q: heads, K: KV heads), or None."""
    if ".attn_q." in gguf_name:
        return hp.n_head
    if ".attn_k." in gguf_name:
        return hp.n_head_kv
    return None


def permute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head from (first half, second half) to interleaved pairs: row h*d + 2i + j takes
    row h*d + j*d/2 + i. Codes, per-row scales / zero points and biases move alike."""
    rows = t.shape[0]
    if rows % (2 * n_head):
        raise GGUFExportError(f"{rows} rows cannot be split into {n_head} heads of pairs for the RoPE permutation")
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
