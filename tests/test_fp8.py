"""FP8 arithmetic (qcompile/fp8.py) against torch's own float8 dtypes, bit for bit.

torch's casts to float8 do not saturate (E4M3FN overflows to NaN, E5M2 to inf); the saturating cast
of the numerics contract is torch.clamp(x, -fmax, fmax).to(float8), which is the reference here.
"""
from __future__ import annotations

import pytest
import torch

from qcompile.errors import RecipeError
from qcompile.fp8 import (E4M3, E5M2, DelayedScalingFakeQuant, fp8_decode, fp8_encode, fp8_fake_quant,
                          fp8_round, fp8_scale)
from qcompile.testing.tolerances import seeded

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest
FORMATS = [E4M3, E5M2]


def _inputs(f, key):
    """Every float16 bit pattern, random float32 across and beyond the FP8 range, exact ties between
    FP8 neighbours, and the special values."""
    g = seeded("fp8", f.name, key)
    all_fp16 = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    wide = torch.randn(200_000, generator=g) * f.fmax * torch.exp2(torch.randint(-30, 3, (200_000,), generator=g).float())
    grid = fp8_decode(torch.arange(256, dtype=torch.int32).to(torch.uint8), f)
    grid = grid[torch.isfinite(grid)].sort().values
    ties = (grid[:-1] + grid[1:]) / 2
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-30, -1e-30,
                            f.fmax, -f.fmax, f.fmax * 1.03, f.fmax * 1.1, 3.4e38, -3.4e38])
    return torch.cat([all_fp16, wide, ties, special])


def _torch_codes(x, f):
    return x.clamp(-f.fmax, f.fmax).to(f.torch_dtype).view(torch.uint8)


@pytest.mark.parametrize("f", FORMATS, ids=lambda f: f.name)
def test_encode_matches_torch_float8_bit_for_bit(f):
    x = _inputs(f, "encode")
    ours, theirs = fp8_encode(x, f), _torch_codes(x, f)
    nan = torch.isnan(x)
    mismatch = (ours != theirs) & ~nan
    assert mismatch.sum() == 0, f"{int(mismatch.sum())} codes differ, first inputs {x[mismatch][:5].tolist()}"
    assert torch.equal(ours[nan], theirs[nan])   # the same NaN code, sign included


@pytest.mark.parametrize("f", FORMATS, ids=lambda f: f.name)
def test_round_is_decode_of_torch_cast_and_saturates(f):
    x = _inputs(f, "round")
    ours = fp8_round(x, f)
    theirs = x.clamp(-f.fmax, f.fmax).to(f.torch_dtype).float()
    nan = torch.isnan(x)
    assert torch.equal(ours[~nan].view(torch.int32), theirs[~nan].view(torch.int32))  # -0.0 included
    assert torch.isnan(ours[nan]).all()
    assert (ours[x == float("inf")] == f.fmax).all() and (ours[x == float("-inf")] == -f.fmax).all()
    assert ours[~nan].abs().max().item() == f.fmax


@pytest.mark.parametrize("f", FORMATS, ids=lambda f: f.name)
def test_decode_of_every_code_matches_torch(f):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ours, theirs = fp8_decode(codes, f), codes.view(f.torch_dtype).float()
    nan = torch.isnan(theirs)
    assert torch.equal(torch.isnan(ours), nan)
    assert torch.equal(ours[~nan].view(torch.int32), theirs[~nan].view(torch.int32))
    assert int(nan.sum()) == {"e4m3": 2, "e5m2": 6}[f.name]   # E4M3FN: only S.1111.111 is NaN


@pytest.mark.parametrize("f", FORMATS, ids=lambda f: f.name)
def test_round_from_float16_and_bfloat16_inputs(f):
    g = seeded("fp8-low", f.name)
    x = torch.randn(4096, generator=g) * 100
    for dtype in (torch.float16, torch.bfloat16):
        xl = x.to(dtype)
        assert torch.equal(fp8_round(xl, f), xl.float().clamp(-f.fmax, f.fmax).to(f.torch_dtype).float())


def test_scale_is_amax_over_fmax_and_degenerate_ranges_are_finite():
    assert fp8_scale(torch.tensor(448.0), "e4m3").item() == 1.0
    assert fp8_scale(torch.tensor(57344.0 * 4), "e5m2").item() == 4.0
    for bad in (0.0, float("inf"), float("nan")):
        s = fp8_scale(torch.tensor(bad), "e4m3").item()
        assert s == 1.0
    with pytest.raises(RecipeError, match="e4m3"):
        fp8_scale(torch.tensor(1.0), "e3m4")


@pytest.mark.parametrize("f", FORMATS, ids=lambda f: f.name)
def test_fake_quant_error_is_half_an_fp8_ulp_in_scale_units(f):
    g = seeded("fq", f.name)
    x = torch.randn(10_000, generator=g) * 3
    s = fp8_scale(x.abs().max(), f)
    y = fp8_fake_quant(x, s, f)
    # relative rounding error of a normal FP8 value is at most 2**-(mbits+1); below the smallest
    # normal the absolute error is at most half the subnormal step, 2**(min_exp - mbits - 1) * s
    bound = torch.maximum(x.abs() * 2.0 ** -(f.mbits + 1), torch.full_like(x, 2.0 ** (f.min_exp - f.mbits - 1)) * s)
    err = (y - x).abs()
    assert (err <= bound * (1 + 2 ** -20)).all()
    assert err.max() > bound.max() / 8   # the check above is not vacuous: errors are of that order
    assert torch.equal(y, fp8_round(x / s, f) * s)


def test_fake_quant_gradient_is_straight_through_inside_and_zero_when_saturated():
    x = torch.tensor([0.1, -3.0, 500.0, -1000.0], requires_grad=True)
    fp8_fake_quant(x, torch.tensor(1.0), "e4m3").sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_delayed_scaling_uses_the_history_of_previous_steps():
    fq = DelayedScalingFakeQuant("e4m3", history_len=3)
    a, b, c, d = (torch.full((4,), v) for v in (448.0, 44.8, 4.48, 4.48))
    fq(a)                                        # first step: its own amax (empty history)
    assert fq.amax_history.tolist() == pytest.approx([448.0, 0, 0])
    fq(b)
    fq(c)
    # step 4 uses max(history) = 448 from step 1, so s = 1 and 4.48 rounds on the unit-scale grid
    y = fq(d)
    assert torch.equal(y, fp8_round(d, "e4m3"))
    # step 1 has now left the 3-long window: the next scale comes from 44.8
    assert fq.scale().item() == pytest.approx(44.8 / 448.0)
    fq.update_history = False
    fq(torch.full((4,), 1000.0))
    assert fq.amax_history.tolist() == pytest.approx([4.48, 4.48, 44.8])


def test_e5m2_gradient_fake_quant():
    fq = DelayedScalingFakeQuant("e4m3", history_len=2, grad_fmt="e5m2")
    x = torch.ones(6, requires_grad=True)
    g = torch.tensor([1.0, 1.1, 1.2, 1.3, 3.0, 1e-3])
    (fq(x) * g).sum().backward()
    s = fp8_scale(g.abs().max(), "e5m2")
    assert torch.equal(x.grad, fp8_round(g / s, "e5m2") * s)
    assert not torch.equal(x.grad, g)            # E5M2 keeps 2 mantissa bits: 1.1 is not on its grid
