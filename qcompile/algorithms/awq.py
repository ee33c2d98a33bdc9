"""AWQ (Lin et al., 2023): activation-aware weight quantization, on one group of linears that
read the same input X.

1. Scale search: per input channel s_k = mean|X_k|^alpha (normalized so that max*min = 1); the
   weights become W * s and the input X / s, which leaves X W^T unchanged in exact arithmetic but
   gives the salient input channels (large |X_k|) a finer grid. alpha is chosen on a grid in
   [0, 1) to minimize the output error of round-to-nearest; alpha = 0 is plain RTN, so the search
   never does worse than RTN on the calibration rows.
2. Clip search: per output row and group, shrink the weight range by the factor in
   [1 - max_shrink, 1] that minimizes that group's share of the output error on the sample rows.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics import dequantize_math, qparams_for_range, quantize_math, stored_qparams
from ..observers import weight_qparams, weight_range
from ..spec import PerChannel, PerGroup, PerTensor, scale_layout



def fake_quantize(w: Tensor, spec, qparams: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Round-to-nearest on the spec's grid (or the given qparams), dequantized."""
    s, z = qparams if qparams is not None else weight_qparams(w, spec)
    axis, block = scale_layout(spec)
    q = quantize_math(w, s, z, axis, block, spec.qmin, spec.qmax, torch.int32, spec.rounding)
    return dequantize_math(q, *stored_qparams(s, z, spec), axis, block, torch.float32)


def output_error(weights: list[Tensor], x: Tensor, s: Tensor, spec, refs: list[Tensor] | None = None) -> float:
    """sum_i ||X W_i^T - (X / s) Q(W_i * s)^T||^2 on the sample rows X (float32 products, float64 sum);
    `refs` are the X W_i^T, when the caller has them already."""
    xs = x.float() / s
    total = 0.0
    for i, w in enumerate(weights):
        ref = refs[i] if refs is not None else x.float() @ w.float().T
        total += float((xs @ fake_quantize(w * s, spec).T - ref).pow(2).sum(dtype=torch.float64))
    return total


def search_scales(weights: list[Tensor], x: Tensor, x_absmean: Tensor, spec, n_grid: int = 20) -> tuple[Tensor, float, dict]:
    """(s [K], the chosen alpha, {alpha: output error}) for the linears `weights` ([N_i, K]) that
    read the sample rows `x` ([rows, K]); `x_absmean` is mean|X_k| over all calibration rows."""
    base = x_absmean.float().clamp(min=1e-4)
    refs = [x.float() @ w.float().T for w in weights]
    errors, best = {}, None
    for i in range(n_grid):
        alpha = i / n_grid
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = output_error(weights, x, s, spec, refs)
        errors[alpha] = err
        if best is None or err < best[0]:
            best = (err, alpha, s)
    return best[2], best[1], errors


def search_clip(w: Tensor, x: Tensor, spec, n_grid: int = 10, max_shrink: float = 0.5) -> tuple[Tensor, Tensor]:
    """Weight qparams (the spec's layout) whose range, per output row and group, is shrunk by the
    factor that minimizes ||(W_g - Q(W_g)) X_g^T||^2 for that row and group."""
    g = spec.granularity
    if isinstance(g, PerTensor):
        return weight_qparams(w, spec)
    lo, hi = weight_range(w, spec)
    axis, block = scale_layout(spec)
    n, k = w.shape
    size = g.size if isinstance(g, PerGroup) else k
    pad = (-k) % size
    xg = torch.nn.functional.pad(x.float(), (0, pad)).reshape(x.shape[0], -1, size)   # [rows, G, g]
    best_err = best_s = best_z = None
    for i in range(n_grid + 1):
        factor = 1.0 - max_shrink * i / n_grid
        s, z = qparams_for_range(lo * factor, hi * factor, spec)
        q = quantize_math(w, s, z, axis, block, spec.qmin, spec.qmax, torch.int32, spec.rounding)
        d = w.float() - dequantize_math(q, *stored_qparams(s, z, spec), axis, block, torch.float32)
        dg = torch.nn.functional.pad(d, (0, pad)).reshape(n, -1, size)                   # [N, G, g]
        err = torch.einsum("ngk,rgk->ngr", dg, xg).pow(2).sum(-1)                        # [N, G]
        if isinstance(g, PerChannel):
            err = err[:, 0]
        if best_err is None:
            best_err, best_s, best_z = err, s, z
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z
