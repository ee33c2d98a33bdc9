"""DampedCholesky: GPTQ's damped Hessian factored in its own storage, and the Hessian read back."""
from __future__ import annotations

import pytest
import torch

from qcompile.algorithms.damped_cholesky import DampedCholesky
from qcompile.errors import RecipeError
from qcompile.testing.tolerances import E64, seeded


def _hessian(k: int, dead: int, gen) -> torch.Tensor:
    x = torch.randn(3 * k, k, generator=gen, dtype=torch.float64) @ (torch.eye(k, dtype=torch.float64)
                                                                     + 0.3 * torch.randn(k, k, generator=gen,
                                                                                         dtype=torch.float64))
    x[:, dead] = 0.0   # an input that is always zero
    h = x.T @ x / x.shape[0]
    return (h + h.T) / 2   # exactly symmetric, as the read-back assumes


@pytest.mark.parametrize("k", [7, 40, 300])
def test_factor_is_the_damped_hessians_and_the_hessian_reads_back_bit_for_bit(k):
    """L L^T = H + damp mean(diag) I (dead diagonal 1.0 first, as gptq_quantize) within Cholesky's
    backward error (a few K E64 of the largest entry); solve() is that system's solution to its
    backward error; and hessian() gives back H itself, bit for bit, from the same storage."""
    gen = seeded("damped-cholesky", k)
    h = _hessian(k, dead=min(3, k - 1), gen=gen)
    damped = h.clone()
    damped[min(3, k - 1), min(3, k - 1)] = 1.0
    damped.diagonal().add_(0.03 * damped.diagonal().mean())
    storage = h.clone()
    factor = DampedCholesky(storage, 0.03)
    lower = torch.tril(factor.lower)
    assert factor.lower.data_ptr() == storage.data_ptr()   # in place: no second K x K matrix
    scale = damped.abs().max()
    assert (lower @ lower.T - damped).abs().max() <= 4 * k * E64 * scale
    b = torch.randn(k, 5, generator=gen, dtype=torch.float64)
    x = factor.solve(b)
    assert (damped @ x - b).abs().max() <= 8 * k * E64 * scale * x.abs().max()
    # read back in blocks smaller than K, several of them
    assert torch.equal(factor.hessian(torch.float64, rows=3), h)
    assert torch.equal(factor.hessian(rows=16), h.float())


def test_not_positive_definite_or_not_float64_says_what_to_do():
    with pytest.raises(RecipeError, match="raise gptq's damp"):
        DampedCholesky(-torch.eye(4, dtype=torch.float64), 0.01)
    with pytest.raises(ValueError, match="float64"):
        DampedCholesky(torch.eye(4), 0.01)
