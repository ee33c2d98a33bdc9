"""The Cholesky factor of a damped Hessian, computed in the Hessian's own storage, with the Hessian
still readable afterwards.

GPTQ's float_targets solve (H + d I) V^T = ... in float64 and then quantize on H in float32. Held
side by side, the float64 factor and the float32 H are 381 MB at K = 5632 (a 1B LLaMA's down_proj),
the largest thing a block's calibration holds. LAPACK's potrf writes the factor into one triangle
and leaves the strictly other triangle as it was ("not referenced"); torch.linalg.cholesky zeroes
it, scipy's wrapper does not with clean=0. So H's off-diagonal half survives the factorization,
its diagonal is kept aside (K values), and `hessian()` reads H back afterwards: one K x K matrix.
"""
from __future__ import annotations

import torch
from scipy.linalg import lapack

from ..errors import RecipeError


class DampedCholesky:
    """L with L L^T = H + damp * mean(diag H) * I, in `h`'s storage (float64, C-contiguous,
    symmetric; it is overwritten). Inputs that are always zero (H_ii = 0) get 1.0 on the diagonal
    before damping, as `gptq_quantize` treats them."""

    def __init__(self, h: torch.Tensor, damp: float):
        if h.dtype != torch.float64 or not h.is_contiguous() or h.ndim != 2 or h.shape[0] != h.shape[1]:
            raise ValueError(f"DampedCholesky factors a square C-contiguous float64 matrix in place, "
                             f"got {h.dtype} {tuple(h.shape)}")
        self._storage = h
        self.diagonal = h.diagonal().clone()   # H's own diagonal: the factor overwrites it
        dead = self.diagonal == 0
        damped = torch.where(dead, 1.0, self.diagonal)
        h.diagonal().copy_(damped + damp * damped.mean())
        # h as a Fortran-ordered array is H^T = H: potrf's lower factor goes to h's upper triangle
        # (C order) and h's strict lower triangle keeps H
        array = h.numpy().T
        factor, info = lapack.dpotrf(array, lower=1, clean=0, overwrite_a=1)
        if factor.ctypes.data != array.ctypes.data:   # a copy would leave h unfactored
            raise RuntimeError("scipy's dpotrf did not factor the Hessian in place")
        if info != 0:
            raise RecipeError(f"gptq: the damped Hessian is not positive definite (LAPACK potrf stopped at "
                              f"column {info}); raise gptq's damp (e.g. algorithms=[{{'name': 'gptq', 'damp': 0.1}}])")

    @property
    def lower(self) -> torch.Tensor:
        """L as a view, its strict upper triangle holding H: read it with `solve_triangular(upper=False)`,
        which, like LAPACK's trsm, reads only the lower triangle."""
        return self._storage.mT

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """x with (H + d I) x = b, [K, n] float64: two triangular solves on the factor where it lies."""
        lower = self.lower
        return torch.linalg.solve_triangular(lower.mT, torch.linalg.solve_triangular(lower, b, upper=False),
                                             upper=True)

    def hessian(self, dtype: torch.dtype = torch.float32, rows: int = 256) -> torch.Tensor:
        """H (undamped, dead inputs' diagonal 0) in `dtype`, read back a block of rows at a time from
        the strict lower triangle and the saved diagonal: bit for bit `h.to(dtype)` of a symmetric h."""
        h = self._storage
        k = h.shape[0]
        out = torch.empty(k, k, dtype=dtype)
        cols = torch.arange(k)
        for r0 in range(0, k, rows):
            part = slice(r0, min(r0 + rows, k))
            below = cols.unsqueeze(0) < torch.arange(r0, part.stop).unsqueeze(1)   # c < r: in row r's lower half
            out[part] = torch.where(below, h[part], h[:, part].T)
        out.diagonal().copy_(self.diagonal)
        return out
