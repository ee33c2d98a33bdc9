"""Mixed-precision training helpers: dynamic loss scaling and FP32 master weights.

FP16 keeps 11 significant bits: one rounding has relative error <= U16 = 2**-11 (half an ulp is
2**-11 relative for values in [1, 2) scaled up to the top of a binade, so 2**-11 bounds all).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qcompile.amp import DynamicLossScaler, LossScalerError, MasterWeights, MasterWeightsError
from qcompile.errors import QCompileError
from qcompile.testing.tolerances import seeded

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest
U16 = 2.0 ** -11          # float16 unit roundoff
FP16_TINY = 2.0 ** -24    # smallest float16 subnormal


def _tiny_loss_setup():
    """A linear layer with FP16 weights and inputs, and a loss whose gradients are ~1e-9: below
    half of FP16's smallest subnormal, so they round to zero unless the loss is scaled."""
    g = seeded("tiny-loss")
    model = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.rand(4, 8, generator=g) + 0.5)
    x = (torch.rand(4, 8, generator=g) + 1.0) * 1e-3        # normal FP16 values in [1e-3, 2e-3]
    factor = 1e-6
    return model, x.half(), factor


def _reference_grad(model, x16, factor):
    """d/dW of factor * sum(x W^T) in float64: factor * sum over the batch of x."""
    return (factor * x16.double().sum(0)).expand(model.weight.shape[0], -1)


def test_fp16_gradients_underflow_without_scaling():
    model, x, factor = _tiny_loss_setup()
    m16 = nn.Linear(8, 4, bias=False).half()
    m16.weight.data.copy_(model.weight.data.half())
    (m16(x).float().sum() * factor).backward()   # the loss in float32, as usual
    ref = _reference_grad(model, x, factor)
    assert ref.abs().min() > 0 and ref.abs().max() < FP16_TINY / 2   # the true gradients are nonzero
    assert torch.count_nonzero(m16.weight.grad) == 0                 # ... and FP16 loses every one


def test_loss_scaler_with_master_weights_recovers_fp32_gradients():
    model, x, factor = _tiny_loss_setup()
    mw = MasterWeights(model, torch.optim.SGD, dtype=torch.float16, lr=0.0)
    scaler = DynamicLossScaler(init_scale=2.0 ** 16)
    scaler.scale(mw.model(x).float().sum() * factor).backward()
    scaler.unscale_(mw)
    got = mw.masters[0].grad
    assert got.dtype == torch.float32 and mw.model.weight.grad is None
    ref = _reference_grad(model, x, factor)
    # two FP16 roundings in the scaled backward (S * factor, then the batch sum of the weight
    # gradient) and float32 unscaling: within 3 FP16 roundoffs of the float64 gradient
    rel = ((got.double() - ref).abs() / ref.abs()).max().item()
    print(f"max relative error of the unscaled gradient: {rel:.2e} (U16 = {U16:.2e})")
    assert rel <= 3 * U16, rel
    scaler.step(mw)
    scaler.update()
    assert scaler.history[-1].skipped is False


def test_unscaling_fp16_gradients_in_place_is_one_rounding():
    """Without masters the scaler still accepts FP16 gradients (GradScaler refuses them)."""
    model, x, factor = _tiny_loss_setup()
    m16 = nn.Linear(8, 4, bias=False).half()
    m16.weight.data.copy_(model.weight.data.half())
    opt = torch.optim.SGD(m16.parameters(), lr=0.0)
    scaler = DynamicLossScaler(init_scale=2.0 ** 12)
    scaler.scale(m16(x).float().sum() * 1e-3).backward()
    scaled = m16.weight.grad.float().clone()
    assert torch.isfinite(scaled).all() and scaled.min() > 0
    scaler.unscale_(opt)
    assert torch.equal(m16.weight.grad, (scaled / 2.0 ** 12).half())
    torch_scaler = torch.amp.GradScaler("cpu")
    torch_scaler.scale(torch.ones(()))       # GradScaler creates its state on the first scale()
    m16.weight.grad = scaled.half()
    with pytest.raises(ValueError, match="FP16"):
        torch_scaler.unscale_(opt)


def test_overflow_steps_are_skipped_and_scale_backs_off_then_grows():
    model = nn.Linear(4, 1, bias=False)
    mw = MasterWeights(model, torch.optim.SGD, dtype=torch.float16, lr=0.1)
    scaler = DynamicLossScaler(init_scale=2.0 ** 10, growth_interval=3)
    x_ok = torch.full((2, 4), 0.5).half()
    x_big = torch.full((2, 4), 60000.0).half()     # grad = S * 2 * 60000 overflows FP16 at S = 2**10
    scales, skipped = [], []
    for x in [x_ok, x_big, x_ok, x_ok, x_ok, x_ok, x_big]:
        before = mw.masters[0].detach().clone()
        mw.zero_grad()
        scaler.scale(mw.model(x).float().sum()).backward()
        scaler.step(mw)
        scaler.update()
        scales.append(scaler.get_scale())
        skipped.append(torch.equal(before, mw.masters[0]))
    assert skipped == [False, True, False, False, False, False, True]
    # backoff 0.5 on each overflow; growth x2 after 3 finite steps in a row
    assert scales == [2.0 ** 10, 2.0 ** 9, 2.0 ** 9, 2.0 ** 9, 2.0 ** 10, 2.0 ** 10, 2.0 ** 9]
    assert scaler.skipped_steps == 2
    assert torch.equal(mw.model.weight, mw.masters[0].detach().half())


def test_same_decisions_as_torch_grad_scaler():
    """On float32 parameters both scalers must produce the same scales and the same weights."""
    g = seeded("gradscaler")
    grads = [torch.randn(3, generator=g) for _ in range(12)]
    for i in (2, 3, 9):
        grads[i][1] = float("inf") if i != 3 else float("nan")

    def run(scaler):
        p = nn.Parameter(torch.ones(3))
        opt = torch.optim.SGD([p], lr=0.1)
        scales = []
        for grad in grads:
            opt.zero_grad()
            p.grad = scaler.scale(grad)
            scaler.step(opt)
            scaler.update()
            scales.append(float(scaler.get_scale()))
        return p.detach(), scales

    ours = run(DynamicLossScaler(init_scale=2.0 ** 8, growth_interval=2))
    theirs = run(torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=2))
    assert ours[1] == theirs[1]
    assert torch.equal(ours[0], theirs[0])


def test_master_weights_compose_with_torch_grad_scaler():
    model = nn.Linear(4, 2)
    mw = MasterWeights(model, torch.optim.SGD, dtype=torch.float16, lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    x = torch.randn(8, 4, generator=seeded("compose")).half()
    scaler.scale(mw.model(x).float().pow(2).mean()).backward()
    grads = [m.grad.clone() / 2.0 ** 12 for m in mw.masters]
    before = [m.detach().clone() for m in mw.masters]
    scaler.step(mw)
    scaler.update()
    for b, gr, m, p in zip(before, grads, mw.masters, mw.model.parameters()):
        torch.testing.assert_close(m.detach(), b - 0.5 * gr, rtol=0, atol=4 * 2.0 ** -24)  # float32 roundoff of O(1) values
        assert torch.equal(p.detach(), m.detach().half())


def test_small_updates_vanish_in_fp16_but_accumulate_with_masters():
    """1000 SGD steps of 1e-4 each: below half an FP16 ulp at 1.0 (2**-11 = 4.9e-4)."""
    steps, lr = 1000, 1e-4
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    x = torch.ones(1, 1)

    direct = nn.Linear(1, 1, bias=False).half()
    direct.weight.data.fill_(1.0)
    opt = torch.optim.SGD(direct.parameters(), lr=lr)
    mw = MasterWeights(model, torch.optim.SGD, dtype=torch.float16, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        direct(x.half()).sum().backward()        # d/dw = 1
        opt.step()
        mw.zero_grad()
        mw.model(x.half()).sum().backward()
        mw.step()
    expected = 1.0 - steps * lr                  # 0.9
    assert direct.weight.item() == 1.0           # every update was rounded away
    assert abs(mw.masters[0].item() - expected) <= steps * 2.0 ** -24   # one float32 rounding per step
    assert mw.model.weight.dtype == torch.float16
    assert mw.model.weight.item() == torch.tensor(mw.masters[0].item()).half().item()
    assert model.weight.item() == 1.0            # the user's model is untouched


def test_gradient_accumulation_sums_in_fp32():
    model = nn.Linear(1, 1, bias=False)
    mw = MasterWeights(model, torch.optim.SGD, dtype=torch.float16, lr=1.0)
    x = torch.ones(1, 1).half()
    for _ in range(3):
        (mw.model(x).sum() * (1 + 2.0 ** -13)).backward()
    # each micro-batch gradient rounds to 1.0 in FP16, summed in float32: exactly 3
    assert mw.masters[0].grad.item() == 3.0


def test_bf16_master_weights_and_keep_fp32_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    mw = MasterWeights(model, torch.optim.SGD, dtype=torch.bfloat16, keep_fp32=(nn.LayerNorm,), lr=0.1)
    assert mw.model[0].weight.dtype == torch.bfloat16 and mw.model[1].weight.dtype == torch.float32
    assert len(mw.masters) == 4 and all(m.dtype == torch.float32 for m in mw.masters)
    assert model[0].weight.dtype == torch.float32


def test_bad_input_raises_qcompile_errors():
    with pytest.raises(MasterWeightsError, match="float16 or torch.bfloat16"):
        MasterWeights(nn.Linear(2, 2), torch.optim.SGD, dtype=torch.float32, lr=0.1)
    with pytest.raises(MasterWeightsError, match="nn.Module"):
        MasterWeights("model", torch.optim.SGD, lr=0.1)
    with pytest.raises(LossScalerError, match="backoff_factor"):
        DynamicLossScaler(backoff_factor=2.0)
    with pytest.raises(LossScalerError, match="step"):
        DynamicLossScaler().update()
    scaler = DynamicLossScaler()
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
    scaler.unscale_(opt)
    with pytest.raises(LossScalerError, match="once per optimizer"):
        scaler.unscale_(opt)
    assert issubclass(LossScalerError, QCompileError)


def _train_digits_linear(dtype, epochs=6):
    """Softmax regression on scikit-learn digits (8x8 -> 10): the light version of the benchmark's
    CNN training (benchmarks/mixed_precision.py)."""
    from qcompile.testing.models import digits_data

    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits_data(0)
    x_train, x_test = x_train.flatten(1), x_test.flatten(1)
    model = nn.Linear(64, 10)
    if dtype == torch.float32:
        opt, run = torch.optim.Adam(model.parameters(), lr=1e-2), model
        scaler = DynamicLossScaler(enabled=False)
    else:
        opt = MasterWeights(model, torch.optim.Adam, dtype=dtype, lr=1e-2)
        run = opt.model
        scaler = DynamicLossScaler(enabled=dtype == torch.float16)
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train), generator=seeded("order", _)).split(64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(run(x_train[idx].to(dtype)).float(), y_train[idx])
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    with torch.no_grad():
        pred = run(x_test.to(dtype)).float().argmax(1)
    return 100.0 * (pred == y_test).float().mean().item()


def test_digits_training_in_fp16_and_bf16_tracks_fp32():
    fp32 = _train_digits_linear(torch.float32)
    fp16 = _train_digits_linear(torch.float16)
    bf16 = _train_digits_linear(torch.bfloat16)
    print(f"digits softmax regression: fp32 {fp32:.2f}%  fp16+masters+scaling {fp16:.2f}%  bf16+masters {bf16:.2f}%")
    assert fp32 > 93.0
    assert abs(fp16 - fp32) <= 0.5 and abs(bf16 - fp32) <= 0.5
