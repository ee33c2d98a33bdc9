"""Stochastic rounding of weights: unbiased in expectation, seeded, at most one step from
round-to-nearest; selected per QuantSpec (rounding="stochastic", seed=...), weights only."""
from __future__ import annotations

import pytest
import torch

import qcompile as qc
from qcompile.errors import RecipeError
from qcompile.numerics import (
    choose_qparams, dequantize_math, quantize_math, quantize_stochastic_math, stochastic_generator,
)
from qcompile.spec import PerChannel, QuantSpec
from qcompile.testing.tolerances import seeded

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    gen = seeded("sr-unbiased")
    scale, zp = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    x = (torch.rand(512, generator=gen) * 2 - 1) * 0.6  # inside the int8 range of this scale
    draws = 2000
    g = torch.Generator().manual_seed(1234)
    total = torch.zeros_like(x, dtype=torch.float64)
    ups = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(draws):
        q = quantize_stochastic_math(x, scale, zp, 0, 0, -128, 127, torch.int32, g)
        total += dequantize_math(q, scale, zp, 0, 0, torch.float64)
        ups += (q > torch.floor(x / scale)).double()
    mean = total / draws
    frac = (x / scale - torch.floor(x / scale)).double()
    # each element rounds up with probability frac: a binomial count; z-scores of its mean
    sd = (frac * (1 - frac) / draws).sqrt().clamp(min=1e-12)
    z = (ups / draws - frac) / sd
    assert z.abs().max() < 5.0                                   # no element is biased
    assert abs(float(z.mean()) * (512 ** 0.5)) < 4.0             # nor all together (mean of 512 z)
    assert (mean - x.double()).abs().max() <= 5 * 0.1 * float(sd.max())  # E[dequantized] = x
    nearest = dequantize_math(quantize_math(x, scale, zp, 0, 0, -128, 127, torch.int32), scale, zp, 0, 0,
                              torch.float64)
    # round-to-nearest errs by up to half a step, deterministically; the stochastic mean does not
    assert (nearest - x.double()).abs().mean() > 10 * (mean - x.double()).abs().mean()


def test_stochastic_rounding_stays_on_the_two_neighbouring_codes_and_clamps():
    gen = seeded("sr-neighbours")
    x = torch.randn(64, 32, generator=gen)
    s, z = choose_qparams(x.amin(1), x.amax(1), -8, 7, symmetric=True)
    q = quantize_stochastic_math(x, s, z, 0, 0, -8, 7, torch.int32, torch.Generator().manual_seed(0))
    lo = torch.floor(x / s.unsqueeze(1)).clamp(-8, 7)
    assert ((q == lo) | (q == (lo + 1).clamp(max=7))).all()
    exact = torch.tensor([0.0, 0.5, -1.0])  # values on the grid never move
    qe = quantize_stochastic_math(exact, torch.tensor(0.5), torch.tensor(0, dtype=torch.int32), 0, 0, -8, 7,
                                  torch.int32, torch.Generator().manual_seed(0))
    assert qe.tolist() == [0, 1, -2]


def test_generator_is_reproducible_per_seed_and_tensor():
    a = torch.rand(8, generator=stochastic_generator(0, "fc1.weight"))
    assert torch.equal(a, torch.rand(8, generator=stochastic_generator(0, "fc1.weight")))
    assert not torch.equal(a, torch.rand(8, generator=stochastic_generator(1, "fc1.weight")))
    assert not torch.equal(a, torch.rand(8, generator=stochastic_generator(0, "fc2.weight")))


def test_recipe_with_stochastic_weight_rounding_end_to_end():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    x = torch.randn(4, 32)
    spec = QuantSpec("int4", PerChannel(0), rounding="stochastic", seed=7)
    recipe = qc.recipes["w8a16"].replace(name="w4a16-sr", weight=spec)
    assert QuantSpec.from_dict(spec.to_dict()) == spec  # the rounding travels with the recipe's JSON

    def codes(r):
        p = qc.prepare(model, x, recipe=r)
        qc.calibrate(p, [x], progress=False)
        return qc.convert(p).get_buffer("qc_w_0_weight").int()

    sr, again = codes(recipe), codes(recipe)
    nearest = codes(qc.recipes["w8a16"].replace(weight=QuantSpec("int4", PerChannel(0))))
    other_seed = codes(recipe.replace(weight=QuantSpec("int4", PerChannel(0), rounding="stochastic", seed=8)))
    assert torch.equal(sr, again)                     # seeded: convert is reproducible
    assert not torch.equal(sr, other_seed)
    assert (sr - nearest).abs().max() == 1            # one step at most, and it does move some
    changed = float((sr != nearest).float().mean())
    # a code differs from nearest with probability min(f, 1 - f) for fraction f: 0.25 on average
    # for spread-out fractions; 2048 weights give a standard deviation of 0.0096 (measured 0.243)
    assert abs(changed - 0.25) < 0.05
    print(f"stochastic vs nearest codes differ on {changed:.3f} of the weights")


def test_rounding_errors():
    with pytest.raises(RecipeError, match="rounding"):
        QuantSpec("int8", rounding="up")
    with pytest.raises(RecipeError, match="weights only"):
        qc.Recipe("bad", weight=QuantSpec("int8"), activation=QuantSpec("int8", rounding="stochastic"))
