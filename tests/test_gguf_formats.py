"""ggml's block formats as qcompile specs: RTN codes and scales bit for bit equal to the `gguf`
package's quantizers, the reference graph decoding exactly what a file holds, GPTQ / AWQ choosing
codes inside the formats, llama.cpp's activation quantization, and the refusals."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import qcompile as qc
from qcompile.backends.gguf.blocks import encode, ggml_type
from qcompile.errors import GGUFExportError, RecipeError
from qcompile.graph import STATE
from qcompile.numerics import dequantize_math, per_block_qparams_math, quantize_math, stored_qparams
from qcompile.observers import weight_qparams
from qcompile.spec import GGUF_ACTIVATION, GGUF_Q4_0, GGUF_Q4_1, GGUF_Q8_0, PerGroup, QuantSpec
from qcompile.testing.tolerances import seeded

pytestmark = pytest.mark.usefixtures("one_thread")
FORMATS = [(GGUF_Q8_0, T.Q8_0), (GGUF_Q4_0, T.Q4_0), (GGUF_Q4_1, T.Q4_1)]
IDS = ["Q8_0", "Q4_0", "Q4_1"]


def hard_weights(qtype: T) -> torch.Tensor:
    """Random rows plus the blocks where quantizers disagree: exact rounding ties (a block whose scale
    is 1, so x * (1 / d) lands on k + 0.5), an all-zero block, a constant block, and a block whose two
    largest magnitudes have opposite signs (Q4_0 takes the first one's sign)."""
    w = torch.randn(24, 128, generator=seeded("gguf-hard", qtype.name)) * 0.05
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5] * 4)
    if qtype == T.Q8_0:
        w[0, :32] = ties; w[0, 0] = 127.0              # amax 127: d = 1
    elif qtype == T.Q4_0:
        w[0, :32] = ties; w[0, 0] = -8.0               # signed max -8: d = 1
    else:
        w[0, :32] = ties.abs(); w[0, 0], w[0, 1] = 0.0, 15.0  # min 0, max 15: d = 1
    w[1, :32] = 0.0
    w[2, 32:64] = 0.3
    w[3, 64:96] *= 0.1
    w[3, 70], w[3, 80] = 0.9, -0.9
    w[4] *= 1e3                                        # large magnitudes: fp16 scales well inside range
    return w


def rtn(w: torch.Tensor, spec: QuantSpec):
    s, z = weight_qparams(w, spec)
    q = quantize_math(w, s, z, -1, spec.granularity.size, spec.qmin, spec.qmax, torch.int32, spec.rounding)
    return q, *stored_qparams(s, z, spec)


@pytest.mark.parametrize("spec,qtype", FORMATS, ids=IDS)
def test_ggml_order_rtn_bytes_equal_gguf_quantizers(spec, qtype):
    """fp16_first=False is ggml's own order (codes from the float32 scale): every byte of every block,
    scales and codes, equals gguf.quants.quantize, ties and degenerate blocks included."""
    w = hard_weights(qtype)
    ggml = dataclasses.replace(spec, fp16_first=False)
    q, s, z = rtn(w, ggml)
    ours = encode(q, s, z, qtype, "w")
    ref = gguf_quantize(w.numpy(), qtype)
    assert ours.shape == ref.shape
    assert int((ours != ref).sum()) == 0
    # the tie block is where half-to-even rounding would have differed: the test can see a wrong rounding
    nearest = dataclasses.replace(ggml, rounding="nearest")
    q_nearest = rtn(w, nearest)[0]
    assert int((q_nearest[0, :32] != q[0, :32]).sum()) >= 4
    # degenerate blocks: ggml stores scale 0 for an all-zero block, and Q4_1 a constant block as m alone
    assert float(s.reshape(24, -1)[1, 0]) == 0.0
    if qtype == T.Q4_1:
        assert float(s.reshape(24, -1)[2, 1]) == 0.0 and float(z.reshape(24, -1)[2, 1]) == float(torch.tensor(0.3).half())


@pytest.mark.parametrize("spec,qtype", FORMATS, ids=IDS)
def test_file_decodes_to_exactly_the_reference_weights(spec, qtype):
    """For the recipes' fp16-first specs the bytes differ from gguf's own (other, better codes), but the
    gguf package's decoder gives back the reference graph's dequantized weights bit for bit, and the
    error is no larger than ggml's order on random weights."""
    w = torch.randn(64, 256, generator=seeded("gguf-decode", qtype.name)) * 0.05
    q, s, z = rtn(w, spec)
    ref_weights = dequantize_math(q, s, z, -1, 32, torch.float32)
    decoded = torch.from_numpy(gguf_dequantize(encode(q, s, z, qtype, "w"), qtype).reshape(64, 256).copy())
    assert torch.equal(decoded, ref_weights)
    ggml_weights = torch.from_numpy(gguf_dequantize(gguf_quantize(w.numpy(), qtype), qtype).reshape(64, 256).copy())
    err_ours, err_ggml = (ref_weights - w).pow(2).sum(), (ggml_weights - w).pow(2).sum()
    assert err_ours <= err_ggml
    assert not torch.equal(ref_weights, ggml_weights)  # the two orders really do choose different codes


def test_q4_0_nibble_order_is_ggml_not_onnx():
    """Byte j of a block holds element j (low nibble) and element j + 16 (high), each code + 8."""
    codes = torch.arange(32, dtype=torch.int32).reshape(1, 32) % 16 - 8
    blocks = encode(codes, torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32), T.Q4_0, "w")
    body = blocks[0, 2:]
    assert list(body) == [(j % 16) | (((j + 16) % 16) << 4) for j in range(16)]


def test_refusals_name_the_problem():
    w = torch.randn(4, 48)
    q, s, z = rtn(w, GGUF_Q8_0)
    with pytest.raises(GGUFExportError, match="whole blocks of 32"):
        encode(q, s, z, T.Q8_0, "ragged")
    w = torch.randn(4, 256)
    q4, s4, z4 = rtn(w, QuantSpec("int4", PerGroup(128)))               # w4a16: float32 scales
    with pytest.raises(GGUFExportError, match="not float16 values"):
        encode(q4, s4, z4, T.Q4_0, "w4a16 weight")
    assert ggml_type(QuantSpec("int4", PerGroup(128), scale_dtype="float16"), "w") == T.Q4_0  # 4 blocks per scale
    with pytest.raises(GGUFExportError, match="Q4_1 stores"):
        ggml_type(QuantSpec("uint4", PerGroup(32), symmetric=False), "w")
    with pytest.raises(GGUFExportError, match="no GGUF block type"):
        ggml_type(QuantSpec("int8", PerGroup(32), symmetric=False), "w")
    with pytest.raises(GGUFExportError, match="per 32 weights"):
        ggml_type(QuantSpec("int8", PerGroup(16), scale_dtype="float16"), "w")
    for bad in (dict(scale_rule="signed_amax", symmetric=False, dtype="uint4"),
                dict(zero_point_domain="float"), dict(scale_dtype="bfloat16"), dict(rounding="up"),
                dict(dynamic=True, granularity=PerGroup(32, axis=0))):
        with pytest.raises(RecipeError):
            QuantSpec(**{"dtype": "int4", "granularity": PerGroup(32), **bad})
    with pytest.raises(RecipeError, match="weights only"):
        qc.Recipe("r", weight=GGUF_Q4_0, activation=dataclasses.replace(GGUF_ACTIVATION, rounding="half_away"))


def test_activation_blocks_choose_codes_on_the_float32_scale():
    """llama.cpp's activation Q8_0: d = amax / 127, codes from the float32 d, d stored in float16. Codes
    chosen on the stored scale instead would differ on about 0.5% of elements."""
    x = torch.randn(4, 7, 96, generator=seeded("act")) * torch.linspace(0.1, 30, 96)
    code_s, stored, z = per_block_qparams_math(x, 32, -128, 127, fp16_scale=True, fp16_first=False)
    blocks = x.reshape(4, 7, 3, 32)
    d = blocks.abs().amax(-1) / 127
    assert torch.equal(code_s, d) and torch.equal(stored, d.half().float()) and not bool(z.any())
    q = quantize_math(x, code_s, z, -1, 32, -128, 127, torch.int32)
    expected = torch.round(blocks / d.unsqueeze(-1)).reshape(x.shape)
    assert torch.equal(q.float(), expected)
    on_stored = quantize_math(x, stored, z, -1, 32, -128, 127, torch.int32)
    assert (on_stored != q).float().mean() > 0.002


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(64, 96), torch.nn.Linear(96, 32)

    def forward(self, x):
        return self.fc2(torch.nn.functional.silu(self.fc1(x)))


@pytest.mark.parametrize("recipe,qtype", [("gguf-q4_0-weight-only", T.Q4_0), ("gguf-q4_1-weight-only", T.Q4_1),
                                          ("gguf-q8_0-weight-only", T.Q8_0)], ids=["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_gptq_and_awq_choose_codes_inside_the_block_formats(recipe, qtype, algorithm):
    """The unchanged passes on a GGUF spec: codes in the type's range, float16 scales, the file decoding
    to the reference weights, and a lower layer error than round-to-nearest on the calibration data."""
    gen = seeded("gguf-algo", recipe, algorithm)
    mix = torch.eye(64) + 0.3 * torch.randn(64, 64, generator=gen)
    batches = [torch.randn(32, 64, generator=gen) * torch.linspace(0.2, 3, 64) @ mix for _ in range(4)]
    model = MLP().eval()
    torch.manual_seed(0)
    prepared = qc.prepare(model, batches[0], recipe, algorithms=[algorithm])
    qc.calibrate(prepared, batches, progress=False)
    quantized = qc.convert(prepared)
    for name in ("fc1", "fc2"):
        q = getattr(quantized, f"qc_w_{name}_weight")
        s = getattr(quantized, f"qc_w_{name}_weight_scale")
        z = getattr(quantized, f"qc_w_{name}_weight_zero_point")
        blocks = encode(q, s, z, qtype, name)          # refuses anything the type does not hold exactly
        ref = dequantize_math(q, s, z, -1, 32, torch.float32)
        decoded = torch.from_numpy(gguf_dequantize(blocks, qtype).reshape(ref.shape).copy())
        assert torch.equal(decoded, ref)
    report = prepared.meta[STATE].algorithm_reports[algorithm]
    err = "gptq_error" if algorithm == "gptq" else "awq_error"
    assert all(r[err] <= r["rtn_error"] for r in report.values())
    assert sum(r[err] < r["rtn_error"] for r in report.values()) >= 1


def test_tied_embedding_is_quantized_once_and_read_quantized_by_both():
    """An embedding table tied to the LM head (SmolLM2): one set of codes, one dequantize read by the
    lookup and by the output projection, so the reference graph is what a tied GGUF file computes."""
    from qcompile.testing.llm import tiny_llama

    class LM(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.hf = m

        def forward(self, ids):
            return self.hf(input_ids=ids, use_cache=False).logits

    model = tiny_llama(0, tie_word_embeddings=True)
    ids = torch.randint(0, 256, (1, 16), generator=seeded("tied"))
    prepared = qc.prepare(LM(model), (ids,), "gguf-q4_0")
    quantized = qc.convert(qc.calibrate(prepared, [ids], progress=False))
    dq = [n for n in quantized.graph.nodes if n.target == torch.ops.qcompile.dequantize.default
          and n.args[0].op == "get_attr" and n.args[0].target == "qc_w_hf_lm_head_weight"]
    assert len(dq) == 1
    users = {u.target for u in dq[0].users}
    assert users == {torch.ops.aten.embedding.default, torch.ops.aten.linear.default}
    assert not any(n.op == "get_attr" and n.target.endswith("embed_tokens.weight") for n in quantized.graph.nodes)
    table_spec = next(r["spec"] for r in quantized.meta[STATE].qparams if r["tensor"] == "hf.lm_head.weight")
    assert table_spec == GGUF_Q8_0      # the 4-bit recipe keeps the embedding / output in Q8_0
    table = dequantize_math(quantized.qc_w_hf_lm_head_weight, quantized.qc_w_hf_lm_head_weight_scale,
                            quantized.qc_w_hf_lm_head_weight_zero_point, -1, 32, torch.float32)
    seen = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.target == torch.ops.aten.embedding.default:
                seen["rows"] = out
            return out

    with torch.no_grad():
        Record(quantized).run(ids)
    assert torch.equal(seen["rows"][0], table[ids[0]])
    assert not torch.equal(seen["rows"][0], model.model.embed_tokens.weight[ids[0]])


@pytest.mark.parametrize("fold_only", [False, True])
def test_awq_folds_into_llama_norms_and_up_proj(fold_only):
    """On LLaMA, AWQ's 1/s goes into the RMSNorm weights (q/k/v, gate/up) and into up_proj's rows (down_proj
    reads silu(gate) * up); only o_proj's input (attention output, GQA) needs a multiply, which fold_only
    drops instead. The tied LM head is left alone. The float function of the graph does not change."""
    from collections import Counter

    from qcompile.llm.logits import CausalLMLogits
    from qcompile.testing.llm import tiny_llama

    model = tiny_llama(0, tie_word_embeddings=True)
    ids = torch.randint(0, 256, (4, 32), generator=seeded("awq-llama"))
    prepared = qc.prepare(CausalLMLogits(model), (ids[:1],), "gguf-q4_0-weight-only",
                          algorithms=[{"name": "awq", "fold_only": fold_only, "clip": False}])
    with torch.no_grad():
        before = prepared(ids[:1])
    qc.calibrate(prepared, [ids[i:i + 1] for i in range(4)], progress=False)
    report = prepared.meta[STATE].algorithm_reports
    where = Counter((k.split(".")[-2], v["input_divided_in"]) for k, v in report["awq"].items())
    expected_o = ("o_proj", "none") if fold_only else ("o_proj", "mul")
    for key in (("q_proj", "rms_norm"), ("v_proj", "rms_norm"), ("up_proj", "rms_norm"), ("down_proj", "linear"), expected_o):
        assert where[key] == 2, where
    assert any("tied" in s for s in report["awq_skipped"])
    muls = [n for n in prepared.graph.nodes if n.op == "get_attr" and n.target.startswith("qc_awq_inv_scale")]
    assert len(muls) == (0 if fold_only else 2)
    with torch.no_grad():
        after = prepared(ids[:1])
    assert torch.allclose(after, before, atol=1e-4 * float(before.abs().max()))
