"""Decoder LLMs on a tiny random LLaMA (GQA): the step capture, the KV-cache pass, generation.

Numbers asserted: decode steps against the matching slices of a full prefill (float: float32
rounding; quantized cache: codes and logits), the cache codes and scales against the quantization
of the float graph's own keys/values, cache bytes per token, and generation against the argmax of
a prefill of the generated text.
"""
from __future__ import annotations

import pytest
import torch

import qcompile as qc
from qcompile.fp8 import fp8_round
from qcompile.llm import capture_causal_lm, fold_weight_dequantize, generate, perplexity, prefill_logits
from qcompile.testing.llm import tiny_llama

VOCAB, LAYERS, KV_HEADS, HEAD_DIM = 256, 2, 2, 16
KV_ONLY = qc.Recipe("kv-only", ops=())   # weights and activations float: the cache alone is quantized


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def calibration():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (3, 24), generator=g) for _ in range(3)]


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(2))


def _quantized(model, calibration, recipe, kv):
    prepared = qc.prepare(model, calibration[0], recipe, kv_cache=kv)
    qc.calibrate(prepared, calibration, progress=False)
    return qc.convert(prepared)


def _decode_steps(gm, ids, prefix, layout=None):
    """Prefill ids[:, :prefix], then one token per step; logits [batch, seq - prefix, vocab] and the
    cache entries of every token, in the layout's order."""
    layout = layout or gm.meta["qcompile"].cache
    out = gm(ids[:, :prefix], *layout.empty(ids.shape[0]))
    cache, logits = list(out[1:]), []
    for t in range(prefix, ids.shape[1]):
        out = gm(ids[:, t:t + 1], *cache)
        logits.append(out[0][:, 0])
        cache = [torch.cat([c, new], dim=2) for c, new in zip(cache, out[1:])]
    return torch.stack(logits, dim=1), cache


def test_step_graph_decodes_like_a_full_prefill_and_like_transformers(model, tokens):
    gm, layout = capture_causal_lm(model, tokens[:1, :4])
    assert [e.name for e in layout.entries] == ["past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    assert (layout.layers, layout.kv_heads, layout.head_dim) == (LAYERS, KV_HEADS, HEAD_DIM)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["input_ids"] + [e.name for e in layout.entries]
    with torch.no_grad():
        reference = model(tokens, use_cache=False).logits
        prefill = gm(tokens, *layout.empty(2))
        decoded, cache = _decode_steps(gm, tokens, 5, layout)
    scale = reference.abs().max()
    assert (prefill[0] - reference).abs().max() <= 1e-6 * scale          # same float ops, same order
    assert (decoded - reference[:, 5:]).abs().max() <= 1e-5 * scale      # GEMMs of 1 row vs 13 round apart
    assert all(c.shape == (2, KV_HEADS, 13, HEAD_DIM) for c in cache)
    # one-token prompt, batch 1: sizes torch.export would specialize were captured as dynamic
    with torch.no_grad():
        one = gm(tokens[:1, :1], *layout.empty(1))[0]
    assert (one[0, 0] - reference[0, 0]).abs().max() <= 1e-6 * scale


def _float_cache(model, ids):
    """The keys and values the float model writes for `ids`, per cache entry."""
    gm, layout = capture_causal_lm(model, ids[:1, :4])
    with torch.no_grad():
        return list(gm(ids, *layout.empty(ids.shape[0]))[1:])


def _written(q, tokens):
    """What each layer of the quantized graph writes before it is quantized (the input of each
    quantize whose codes the graph returns), in the order of the cache entries."""
    output = next(n for n in q.graph.nodes if n.op == "output")
    code_nodes = [n for n in output.args[0][1:] if n.target == torch.ops.qcompile.quantize.default]
    seen = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n in code_nodes:
                seen[n] = self.env[n.args[0]]
            return result

    with torch.no_grad():
        Recorder(q).run(tokens, *q.meta["qcompile"].cache.empty(tokens.shape[0]))
    return [seen[n] for n in code_nodes]


def _assert_written(entry, written, float_written):
    """Layer 0 writes exactly what the float model writes; deeper layers attend over the quantized
    cache of the layers before them, so they write slightly different keys/values."""
    if entry.layer == 0:
        assert torch.equal(written, float_written), entry.name
    else:
        assert (written - float_written).abs().max() <= 0.05 * float_written.abs().max(), entry.name


def test_static_int8_cache_codes_and_scales_match_the_quantized_float_cache(model, calibration, tokens):
    q = _quantized(model, calibration, KV_ONLY, "int8")
    layout = q.meta["qcompile"].cache
    assert {e.dtype for e in layout.entries} == {torch.int8}
    # calibration runs the float cache: the scales come from the float model's keys/values
    calibrated = [torch.cat(t, 0) for t in zip(*(_float_cache(model, b) for b in calibration))]
    with torch.no_grad():
        codes = q(tokens, *layout.empty(2))[1:]
    for entry, seen, written, float_written, got in zip(layout.entries, calibrated, _written(q, tokens),
                                                        _float_cache(model, tokens), codes):
        amax = seen.double().abs().amax(dim=(0, 2, 3))                  # per KV head over the calibration text
        scale = q.get_buffer(f"qc_kv_{entry.name}_scale")
        assert torch.allclose(scale.double(), amax / 127, rtol=1e-6, atol=0)
        _assert_written(entry, written, float_written)
        ref = torch.clamp(torch.round(written / scale.reshape(1, -1, 1, 1)), -127, 127).to(torch.int8)
        assert torch.equal(got, ref), entry.name


def test_dynamic_int8_cache_stores_a_scale_per_token_and_head(model, calibration, tokens):
    q = _quantized(model, calibration, KV_ONLY, "int8-dynamic")
    layout = q.meta["qcompile"].cache
    names = [e.name for e in layout.entries]
    assert names[:4] == ["past_key_0", "past_key_0_scale", "past_value_0", "past_value_0_scale"]
    placeholders = [n.name for n in q.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["input_ids"] + names
    with torch.no_grad():
        out = q(tokens, *layout.empty(2))[1:]
    entries = [e for e in layout.entries if not e.name.endswith("_scale")]
    for entry, written, float_written, codes, scale in zip(entries, _written(q, tokens), _float_cache(model, tokens),
                                                           out[0::2], out[1::2]):
        _assert_written(entry, written, float_written)
        amax = written.abs().amax(dim=-1, keepdim=True)
        assert scale.shape == (2, KV_HEADS, 13, 1)
        assert torch.equal(scale, torch.clamp(amax / 127, min=torch.finfo(torch.float32).eps))
        assert torch.equal(codes, torch.round(written / scale).to(torch.int8)), entry.name


def test_fp8_cache_codes_are_the_e4m3_rounding_of_the_scaled_float_cache(model, calibration, tokens):
    q = _quantized(model, calibration, KV_ONLY, "fp8")
    layout = q.meta["qcompile"].cache
    assert {e.dtype for e in layout.entries} == {torch.float8_e4m3fn}
    with torch.no_grad():
        codes = q(tokens, *layout.empty(2))[1:]
    for entry, written, float_written, got in zip(layout.entries, _written(q, tokens),
                                                  _float_cache(model, tokens), codes):
        _assert_written(entry, written, float_written)
        scale = q.get_buffer(f"qc_kv_{entry.name}_scale").reshape(1, -1, 1, 1)
        assert torch.equal(got.float(), fp8_round(written / scale)), entry.name   # fp8.py's rounding, bit for bit


@pytest.mark.parametrize("recipe, kv", [("w8a8", "int8"), ("w8a16", "int8-dynamic"), ("w4a16", "fp8")])
def test_quantized_decode_step_matches_the_prefill_slice(model, calibration, tokens, recipe, kv):
    q = _quantized(model, calibration, recipe, kv)
    layout = q.meta["qcompile"].cache
    with torch.no_grad():
        full = q(tokens, *layout.empty(2))
        decoded, cache = _decode_steps(q, tokens, 6)
    # A one-row GEMM and a 13-row GEMM round differently in the last float bit; a cache code moves
    # only where that lands on a rounding tie: at most one step, on a tiny fraction of the codes.
    for whole, stepwise in zip(full[1:], cache):
        diff = (whole.float() - stepwise.float()).abs()
        if whole.dtype == torch.float32:  # the per-token scales of the dynamic cache
            assert diff.max() <= 1e-6 * whole.abs().max()
            continue
        step = 1.0 if whole.dtype == torch.int8 else 0.125 * whole.float().abs().max()  # fp8: 3 mantissa bits
        assert diff.max() <= step
        assert (diff > 0).float().mean() <= 0.01
    logits = full[0][:, 6:]
    assert (decoded - logits).abs().max() <= 1e-3 * logits.abs().max()
    assert torch.equal(decoded.argmax(-1), logits.argmax(-1))


@pytest.mark.parametrize("kv", [None, "int8", "int8-dynamic", "fp8"])
def test_generate_continues_like_a_prefill_of_its_own_output(model, calibration, kv):
    q = _quantized(model, calibration, "w8a16", kv)
    prompt = calibration[0][:1, :7]
    new = generate(q, prompt, max_new_tokens=12)
    assert new.shape == (1, 12)
    logits = prefill_logits(q, torch.cat([prompt, new[:, :-1]], dim=1))
    assert torch.equal(logits[:, 6:].argmax(-1), new)


def test_generate_stops_at_the_stop_token_and_pads_with_it(model, calibration):
    q = _quantized(model, calibration, "w8a16", "int8")
    prompt = calibration[0][:2, :5]
    free = generate(q, prompt, max_new_tokens=10)
    stop = int(free[0, 3])
    stopped = generate(q, prompt, max_new_tokens=10, eos_token_id=[stop])
    # where each row produced it first (10: never)
    first = [int((row == stop).nonzero()[0]) if (row == stop).any() else 10 for row in free]
    assert stopped.shape[1] == min(10, max(first) + 1)
    for row, at in enumerate(first):
        assert torch.equal(stopped[row, :at + 1], free[row, :at + 1])
        assert (stopped[row, at:] == stop).all()


def test_kv_cache_bytes_per_token_reported_by_inspect(model, calibration):
    fp32 = 2 * KV_HEADS * HEAD_DIM * 4
    expected = {"int8": 2 * KV_HEADS * HEAD_DIM, "int8-dynamic": 2 * KV_HEADS * (HEAD_DIM + 4),
                "fp8": 2 * KV_HEADS * HEAD_DIM, None: fp32}
    for kv, per_layer in expected.items():
        q = _quantized(model, calibration, "w8a16", kv)
        layout = q.meta["qcompile"].cache
        assert layout.bytes_per_token() == {"per_layer": per_layer, "all_layers": per_layer * LAYERS}
        assert f"{per_layer} bytes per token and layer ({per_layer * LAYERS} for all {LAYERS} layers; " \
               f"float32: {fp32})" in qc.inspect(q)


def test_int8_cache_keeps_perplexity_and_the_model_is_left_alone(model, calibration, tokens):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    float_ppl = perplexity(model, tokens)
    q = _quantized(model, calibration, KV_ONLY, "int8")
    # random weights: an almost uniform next-token distribution, so the cache error barely moves it
    assert abs(perplexity(q, tokens) / float_ppl - 1) < 2e-3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_llm_inputs_get_errors_that_say_what_to_do(model, calibration):
    q = _quantized(model, calibration, "w8a16", "int8")
    with pytest.raises(qc.InvalidInputsError, match="longer than the 256 tokens the model was captured for"):
        generate(q, torch.zeros(1, 250, dtype=torch.long), max_new_tokens=10)
    padded = {"input_ids": calibration[0], "attention_mask": torch.ones_like(calibration[0]).index_fill(1, torch.tensor([0]), 0)}
    with pytest.raises(qc.InvalidInputsError, match="padded"):
        generate(q, padded, max_new_tokens=2)
    with pytest.raises(qc.RecipeError, match="unknown KV cache 'int4'"):
        qc.prepare(model, calibration[0], "w8a16", kv_cache="int4")
    with pytest.raises(qc.RecipeError, match="apply to transformers causal LMs"):
        qc.prepare(torch.nn.Linear(4, 4), torch.randn(2, 4), "w8a16", kv_cache="int8")
    prepared = qc.prepare(model, calibration[0], qc.Recipe("kv-only", ops=()), kv_cache="int8")
    with pytest.raises(qc.ConvertError, match="KV cache takes its scales from|needs calibration"):
        qc.convert(prepared)
    with pytest.raises(qc.InvalidInputsError, match="max_seq_len=100000 is outside"):
        qc.prepare(model, calibration[0], "w8a16", max_seq_len=100000)


def test_a_model_whose_attention_bypasses_the_cache_gets_a_capture_error(model, tokens):
    import copy

    broken = copy.deepcopy(model)
    attention = broken.model.layers[1].self_attn
    forward = attention.forward
    attention.forward = lambda *args, cache=None, **kwargs: forward(*args, cache=None, **kwargs)  # ignores the cache
    with pytest.raises(qc.CaptureError, match="decoder layer 1 of LlamaForCausalLM never wrote its KV cache "
                                              r"through transformers' Cache.update \(1 of 2 layers"):
        capture_causal_lm(broken, tokens[:1, :4])


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16", "nf4"])
def test_folded_weight_dequantizations_give_the_reference_graphs_numbers(model, calibration, tokens, recipe):
    q = _quantized(model, calibration, recipe, "int8")
    folded = fold_weight_dequantize(q)
    weight_ops = {torch.ops.qcompile.dequantize.default, torch.ops.qcompile.dequantize_nf4.default}

    def weight_dequantizes(gm):
        return sum(1 for n in gm.graph.nodes if n.target in weight_ops and n.args[0].op == "get_attr"
                   and n.args[0].target.startswith("qc_w_"))

    assert weight_dequantizes(q) == 2 * 7 + 1 and weight_dequantizes(folded) == 0   # 7 linears a layer + lm_head
    assert torch.equal(prefill_logits(folded, tokens), prefill_logits(q, tokens))


def test_w4a16_keeps_a_language_models_output_projection_at_8_bits_per_channel(model, calibration):
    """The shipped w4a16 gives `*lm_head` w8a16's codes (as the LLM toolkits keep the head high):
    int8 codes with one scale per output row, equal to w8a16's own; every other linear keeps
    4-bit groups. A model without an lm_head module is not an error (the pattern is shipped)."""
    q4 = _quantized(model, calibration, "w4a16", None)
    q8 = _quantized(model, calibration, "w8a16", None)
    head, head_scale = q4.get_buffer("qc_w_lm_head_weight"), q4.get_buffer("qc_w_lm_head_weight_scale")
    assert head_scale.numel() == VOCAB and int(head.abs().max()) > 8   # per channel; beyond int4's range
    assert torch.equal(head, q8.get_buffer("qc_w_lm_head_weight"))
    assert torch.equal(head_scale, q8.get_buffer("qc_w_lm_head_weight_scale"))
    down = q4.get_buffer("qc_w_model_layers_0_mlp_down_proj_weight")
    assert int(down.min()) >= -8 and int(down.max()) <= 7                  # int4 codes below it
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
    prepared = qc.prepare(mlp, torch.randn(2, 16), "w4a16")                # no lm_head: no error
    assert prepared.meta["qcompile"].recipe.overrides == (("*lm_head", "w8a16"),)
