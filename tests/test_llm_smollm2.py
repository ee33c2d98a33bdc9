"""SmolLM2-135M-Instruct, the real decoder LLM (qcompile.testing.llm): w8a16 weights and an INT8
KV cache through prepare -> calibrate -> convert -> lower, generating and scored by perplexity.

Asserted: perplexity of the quantized model (weights and cache) within 1% of FP32 on 4 chunks of
held-out text (measured: see the README's LLM table), greedy generation that still knows the
capital of France, and the lowered (deployed) module agreeing with the reference graph's argmax
(teacher-forced)."""
from __future__ import annotations

import pytest
import torch

import qcompile as qc
from qcompile.llm import fold_weight_dequantize, generate, perplexity, prefill_logits

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from qcompile.testing.llm import load_smollm2, token_chunks

    try:
        model, tok = load_smollm2()
    except RuntimeError as e:
        pytest.skip(str(e))
    return model, tok, token_chunks(tok, "calibration", 128, 8), token_chunks(tok, "evaluation", 256, 4)


@pytest.fixture(scope="module")
def quantized(smollm2):
    model, _, calibration, _ = smollm2
    prepared = qc.prepare(model, calibration[:1], "w8a16", kv_cache="int8")
    qc.calibrate(prepared, list(calibration.split(4)), progress=False)
    return qc.convert(prepared)


def test_w8a16_with_int8_kv_cache_keeps_perplexity_within_one_percent(smollm2, quantized):
    model, _, _, evaluation = smollm2
    fp32 = perplexity(model, evaluation)
    ours = perplexity(fold_weight_dequantize(quantized), evaluation)
    print(f"SmolLM2 perplexity: FP32 {fp32:.3f}, w8a16 + int8 KV {ours:.3f} ({100 * (ours / fp32 - 1):+.2f}%)")
    assert ours / fp32 - 1 < 0.01
    assert ("KV cache: int8 PerChannel(axis=1) (static); 30 layers x 3 KV heads x 64; 384 bytes per token and layer "
            "(11520 for all 30 layers; float32: 1536)") in qc.inspect(quantized)


def test_generation_with_the_quantized_cache_and_the_lowered_module(smollm2, quantized):
    _, tok, _, evaluation = smollm2
    assert "Paris" in generate(quantized, "The capital of France is", 8, tokenizer=tok)
    lowered = qc.lower(quantized, backend="torch")
    reference = fold_weight_dequantize(quantized)
    # the lowered weight-only linears compute in BF16 (qc.lower's default), so greedy continuations part
    # at the first near-tie (on the first evaluation prompt: at its second new token); teacher-forced, the
    # two pick the same next token almost everywhere
    with torch.no_grad():
        ref = prefill_logits(reference, evaluation)
        low = prefill_logits(lowered, evaluation)
    top1 = float((ref.argmax(-1) == low.argmax(-1)).float().mean())
    print(f"lowered vs reference graph: top-1 agreement {top1:.4f} over {ref.shape[0]} x {ref.shape[1]} tokens")
    assert top1 >= 0.95
