"""Quantization-aware training: STE and LSQ gradients, the simulated BatchNorm fold, convert, DDP."""
from __future__ import annotations

import copy
import subprocess
import sys
from collections import Counter

import pytest
import torch
from torch import nn

import qcompile as qc
from qcompile.fake_quant import FakeQuantize, WeightFakeQuantize, fake_quantize, lsq_grad_factor
from qcompile.passes.base import op_counts
from qcompile.passes.fold_bn_qat import BatchNormFoldState
from qcompile.testing.models import DigitsCNN, accuracy

aten = torch.ops.aten


class ConvBnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _trained_bn_net(seed=0) -> ConvBnNet:
    torch.manual_seed(seed)
    net = ConvBnNet()
    with torch.no_grad():  # non-trivial running statistics, as a pretrained model has
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.2, 0.2)
    return net.eval()


def _fake_quant_modules(m):
    return [x for x in m.modules() if isinstance(x, (FakeQuantize, WeightFakeQuantize))]


# --- STE -------------------------------------------------------------------------------------

def test_ste_gradient_inside_at_and_outside_the_range():
    # scale 0.1, int4 [-8, 7]: x/s rounds to 3 (inside), 7 and -8 (the boundaries: inside), 8 and -9 (outside)
    x = torch.tensor([0.34, 0.70, 0.74, -0.80, 0.76, -0.86, 5.0], requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.1), torch.tensor(0), 0, 0, -8, 7)
    y.backward(torch.arange(1.0, 8.0))
    assert y.tolist() == pytest.approx([0.3, 0.7, 0.7, -0.8, 0.7, -0.8, 0.7], abs=1e-7)
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0]


def test_fake_quant_forward_is_the_reference_quantize_dequantize():
    from qcompile.numerics import dequantize_math, quantize_math

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=gen)
    scale = torch.rand(6, 5, generator=gen) * 0.05 + 0.01
    zp = torch.randint(-3, 3, (6, 5), generator=gen, dtype=torch.int32)
    ref = dequantize_math(quantize_math(w, scale, zp, -1, 8, -8, 7, torch.int8), scale, zp, -1, 8, torch.float32)
    assert torch.equal(fake_quantize(w, scale, zp, -1, 8, -8, 7), ref)
    # a learned zero point is a float parameter holding an integer: the same codes, not an offset
    assert torch.equal(fake_quantize(w, scale, zp.float(), -1, 8, -8, 7), ref)


# --- LSQ -------------------------------------------------------------------------------------

def _relaxed(x, s, z, c, qmin, qmax):
    """The relaxed objective LSQ differentiates: round(v) replaced by v + c with c frozen."""
    return s * (torch.clamp(x / s + c + z, qmin, qmax) - z)


@pytest.mark.parametrize("axis_case", ["per_tensor", "per_channel"])
def test_lsq_gradients_match_finite_differences_of_the_relaxed_objective(axis_case):
    gen = torch.Generator().manual_seed(1)
    qmin, qmax = 0, 15
    x = (torch.randn(3, 50, generator=gen, dtype=torch.float64) * 0.6).float()
    upstream = torch.randn(3, 50, generator=gen)
    if axis_case == "per_tensor":
        s0, z0, axis = torch.tensor(0.07), torch.tensor(7.0), 0
    else:
        s0, z0, axis = torch.tensor([0.05, 0.07, 0.09]), torch.tensor([6.0, 7.0, 8.0]), 0

    def bshape(t):
        return t.reshape(-1, 1) if t.ndim == 1 else t

    xd = x.double()
    v0 = xd / bshape(s0.double())
    c = torch.round(v0) - v0
    # A code exactly on qmin/qmax sits on a kink of the relaxed objective (one-sided derivatives
    # differ); the STE test covers those points, here they carry no upstream gradient.
    code = torch.round(v0) + bshape(z0.double())
    upstream = upstream * ((code != qmin) & (code != qmax))
    assert ((code < qmin) | (code > qmax)).any() and ((code > qmin) & (code < qmax)).any()
    gd = upstream.double()
    s = s0.clone().requires_grad_(True)
    z = z0.clone().requires_grad_(True)
    fake_quantize(x, s, z, axis, 0, qmin, qmax).mul(upstream).sum().backward()
    h = 1e-6
    for which, analytic in (("s", s.grad), ("z", z.grad)):
        numeric = torch.zeros_like(s0, dtype=torch.float64)
        for i in range(s0.numel()):
            def objective(delta):
                sd, zd = s0.double().clone(), z0.double().clone()
                (sd if which == "s" else zd).view(-1)[i] += delta
                return (gd * _relaxed(xd, bshape(sd), bshape(zd), c, qmin, qmax)).sum()
            numeric.view(-1)[i] = (objective(h) - objective(-h)) / (2 * h)
        torch.testing.assert_close(analytic.double(), numeric, rtol=1e-4, atol=1e-4)


def test_lsq_gradient_scale_multiplies_scale_and_zero_point_gradients():
    x = torch.randn(200, generator=torch.Generator().manual_seed(2))
    grads = []
    for factor in (1.0, lsq_grad_factor(x.numel(), 127)):
        s = torch.tensor(0.01, requires_grad=True)
        fake_quantize(x, s, torch.tensor(0), 0, 0, -128, 127, factor).sum().backward()
        grads.append(s.grad)
    assert lsq_grad_factor(200, 127) == pytest.approx(1 / (200 * 127) ** 0.5)
    torch.testing.assert_close(grads[1], grads[0] * lsq_grad_factor(200, 127))


# --- conv + BN fold simulation ---------------------------------------------------------------

def test_prepare_qat_simulates_the_fold_and_leaves_the_model_alone():
    net = _trained_bn_net()
    before = copy.deepcopy(net.state_dict())
    qat = qc.prepare_qat(net, (torch.randn(8, 2, 6, 6),), "w8a8")
    counts = op_counts(qat)
    assert counts["aten.batch_norm.default"] == 0
    assert sum(1 for n in qat.graph.nodes if n.op == "call_module" and n.target.startswith("qc_bnfold_")) == 2
    assert len([m for m in qat.modules() if isinstance(m, WeightFakeQuantize)]) == 2  # conv and fc
    assert qat.training and all(p.requires_grad for p in qat.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"prepare_qat changed the user's model: {k}"
    assert not net.training


def test_conv_bn_training_forward_matches_the_unfused_model_without_fake_quant():
    net = _trained_bn_net()
    x = torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    qat = qc.prepare_qat(net, (x,), "w8a8")
    for m in _fake_quant_modules(qat):
        m.fake_quant_enabled.fill_(False)
    eager = copy.deepcopy(net).train()
    torch.testing.assert_close(qat(x), eager(x), rtol=1e-5, atol=1e-5)
    state = next(m for m in qat.modules() if isinstance(m, BatchNormFoldState))
    torch.testing.assert_close(state.running_mean, eager.bn.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state.running_var, eager.bn.running_var, rtol=1e-6, atol=1e-6)


def test_conv_bn_training_forward_matches_the_float64_fold_formula():
    from qcompile.observers import weight_qparams

    net = _trained_bn_net()
    x = torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(4))
    qat = qc.prepare_qat(net, (x,), "w8a8")
    qc.calibrate(qat, [x], progress=False)  # activation ranges from x
    act_fq = qat.get_submodule("qc_observer_0")
    s_x, z_x = act_fq.calculate_qparams()
    got = qat(x)
    # The same computation written out: fake-quant x, fake-quant the folded weight with its own
    # per-channel qparams, conv, un-scale, add the conv bias, BatchNorm with batch statistics.
    bn = net.bn
    factor = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    w_fold = net.conv.weight.detach() * factor.reshape(-1, 1, 1, 1)
    s_w, z_w = weight_qparams(w_fold, qc.recipes["w8a8"].weight)
    xq = fake_quantize(x, s_x, z_x, 0, 0, 0, 255).double()
    wq = fake_quantize(w_fold, s_w, z_w, 0, 0, -128, 127).double()
    y = nn.functional.conv2d(xq, wq, padding=1) / factor.double().reshape(1, -1, 1, 1)
    y = y + net.conv.bias.detach().double().reshape(1, -1, 1, 1)
    mean, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), unbiased=False, keepdim=True)
    y = (y - mean) / torch.sqrt(var + bn.eps) * bn.weight.double().reshape(1, -1, 1, 1) + bn.bias.double().reshape(1, -1, 1, 1)
    y = torch.relu(y).flatten(1).float()
    s_h, z_h = qat.get_submodule("qc_observer_1").calculate_qparams()
    w_fc = net.fc.weight.detach()
    s_f, z_f = weight_qparams(w_fc, qc.recipes["w8a8"].weight)
    ref = nn.functional.linear(fake_quantize(y, s_h, z_h, 0, 0, 0, 255).double(),
                               fake_quantize(w_fc, s_f, z_f, 0, 0, -128, 127).double(), net.fc.bias.double())
    # float32 vs float64 conv sums may move a value of y across one activation rounding step
    # (s_h); allow a difference of one step times the largest |fc weight| row sum on 1% of outputs.
    err = (got.double() - ref).abs()
    step_bound = float(s_h) * float(w_fc.abs().sum(1).max())
    assert err.max() <= step_bound
    assert (err > 1e-4).float().mean() <= 0.01


def test_frozen_bn_training_forward_is_the_folded_conv_and_eval_equals_convert():
    net = _trained_bn_net()
    x = torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(5))
    qat = qc.prepare_qat(net, (x,), "w8a8")
    qc.calibrate(qat, [x], progress=False)
    qc.freeze_bn(qat)
    train_out = qat(x)                      # training mode, BN frozen: running statistics
    eval_out = qat.eval()(x)
    assert torch.equal(train_out, eval_out)
    converted = qc.convert(qat)
    # The converted conv adds its folded bias inside conv2d; the QAT module adds it after: equal
    # up to float32 summation order, far below one output step.
    torch.testing.assert_close(converted(x), eval_out, rtol=0, atol=1e-5)


def test_convert_of_qat_gives_the_same_reference_graph_as_ptq():
    model = DigitsCNN(8).eval()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    prepared = qc.prepare(model, (x,), "w8a8")
    qc.calibrate(prepared, [x], progress=False)
    ptq = qc.convert(prepared)
    qat = qc.prepare_qat(model, (x,), "w8a8")
    qc.calibrate(qat, [x], progress=False)
    converted = qc.convert(qat)
    assert op_counts(converted) == op_counts(ptq)
    assert op_counts(converted)["qcompile.quantize"] == 7  # the add and the cat are quantized too
    assert not _fake_quant_modules(converted)
    assert converted.meta["qcompile"].stage == "quantized"


# --- training --------------------------------------------------------------------------------

def test_learned_scales_train_and_reach_the_converted_graph():
    net = _trained_bn_net()
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(16, 2, 6, 6, generator=gen), torch.randint(0, 5, (16,), generator=gen)
    qat = qc.prepare_qat(net, (x,), "w4a8", learn_scales=True)
    fc_fq = [m for m in qat.modules() if isinstance(m, WeightFakeQuantize)][-1]
    start = fc_fq.scale.detach().clone()
    opt = torch.optim.SGD(qat.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(qat(x), y).backward()
        opt.step()
    assert not torch.equal(fc_fq.scale.detach(), start), "LSQ scales must move"
    converted = qc.convert(qat)
    rows = {r["tensor"]: r for r in converted.meta["qcompile"].qparams}
    torch.testing.assert_close(rows["fc.weight"]["scale"], fc_fq.scale.detach().abs())


def test_qat_trains_under_autocast():
    net = _trained_bn_net()
    x = torch.randn(8, 2, 6, 6)
    qat = qc.prepare_qat(net, (x,), "w8a8")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = qat(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    grads = [p.grad for p in qat.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_qat_recovers_two_bit_weights_on_digits(digits):
    """Per-tensor 2-bit weights: round-to-nearest PTQ collapses to chance; two epochs of LSQ QAT bring back most of the accuracy."""
    torch.manual_seed(0)
    model, (x_train, y_train, x_test, y_test) = digits
    recipe = qc.recipes["w8a8"].replace(name="w2a8", weight=qc.QuantSpec("int2", qc.PerTensor()))
    prepared = qc.prepare(model, (x_train[:128],), recipe)
    qc.calibrate(prepared, [x_train[i:i + 128] for i in range(0, 512, 128)], progress=False)
    ptq = accuracy(qc.convert(prepared), x_test, y_test)
    qat = qc.prepare_qat(model, (x_train[:32],), recipe, learn_scales=True)
    qc.calibrate(qat, [x_train[i:i + 32] for i in range(0, 256, 32)], progress=False)
    opt = torch.optim.Adam(qat.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(2):
        if epoch == 1:
            qc.freeze_bn(qat)
        for idx in torch.randperm(len(x_train), generator=gen).split(32):
            if len(idx) == 32:
                opt.zero_grad()
                nn.functional.cross_entropy(qat(x_train[idx]), y_train[idx]).backward()
                opt.step()
    qat.eval()
    test_batches = [(x_test[i:i + 32], y_test[i:i + 32]) for i in range(0, len(x_test) - 31, 32)]
    qat_eval = sum(int((qat(xb).argmax(1) == yb).sum()) for xb, yb in test_batches)
    converted = qc.convert(qat)
    conv_acc = sum(int((converted(xb).argmax(1) == yb).sum()) for xb, yb in test_batches)
    assert conv_acc == qat_eval, "the converted model must score exactly what the QAT model scores in eval"
    n = sum(len(yb) for _, yb in test_batches)
    # Measured: PTQ 10.2%, QAT 78.7% after two epochs (95.4% after four in examples/qat_digits.py).
    assert ptq < 30.0
    assert 100.0 * conv_acc / n > ptq + 50.0


# --- errors ----------------------------------------------------------------------------------

def test_convert_refuses_a_qat_module_that_never_saw_data():
    qat = qc.prepare_qat(_trained_bn_net(), (torch.randn(8, 2, 6, 6),), "w8a8")
    with pytest.raises(qc.ConvertError, match="never saw data"):
        qc.convert(qat)


def test_prepare_qat_rejects_ptq_algorithms():
    with pytest.raises(qc.RecipeError, match="do not apply to QAT"):
        qc.prepare_qat(_trained_bn_net(), (torch.randn(8, 2, 6, 6),),
                       qc.recipes["w8a8"].replace(algorithms=["smoothquant"]))


def test_freeze_observers_stops_range_updates():
    qat = qc.prepare_qat(_trained_bn_net(), (torch.randn(8, 2, 6, 6),), "w8a8")
    qat(torch.randn(8, 2, 6, 6))
    qc.freeze_observers(qat)
    fq = qat.get_submodule("qc_observer_0")
    before = fq.calculate_qparams()
    qat(torch.randn(8, 2, 6, 6) * 10)
    after = fq.calculate_qparams()
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    qc.freeze_observers(qat, False)
    qat(torch.randn(8, 2, 6, 6) * 10)
    assert not torch.equal(before[0], fq.calculate_qparams()[0])


# --- distributed -----------------------------------------------------------------------------

def test_ddp_two_processes_convert_to_identical_qparams(tmp_path):
    out = tmp_path / "qparams"
    port = 29500 + (hash(str(tmp_path)) % 400)
    proc = subprocess.run([sys.executable, "-m", "qcompile.testing.ddp_qat", str(out), str(port)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [torch.load(f"{out}.rank{r}") for r in (0, 1)]
    rows0, rows1 = ranks[0]["qparams"], ranks[1]["qparams"]
    assert [r[0] for r in rows0] == [r[0] for r in rows1] and len(rows0) == 4
    for (name, s0, z0), (_, s1, z1) in zip(rows0, rows1):
        assert torch.equal(s0, s1) and torch.equal(z0, z1), f"ranks disagree on {name}"
    # Rank 1's inputs are 3x larger: the input range both ranks chose covers them, not rank 0's alone.
    name, s, z = rows0[0]
    assert name == "group 0"
    assert float((255 - z) * s) > 1.5 * ranks[0]["local_last_batch_max"]
