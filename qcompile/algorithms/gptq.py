"""GPTQ (Frantar et al., 2022): quantize a linear's weight column by column, pushing each
column's rounding error onto the columns not yet quantized through the inverse Hessian of the
layer objective ||W X - Q X||^2, whose Hessian is H = X^T X (X: [rows, K]).

The implementation is the paper's: Cholesky factor of the damped inverse Hessian, lazy batch
updates per block of columns. Group-wise scales are chosen when the quantizer reaches a group
(from the weights as updated so far); with `act_order` (columns in order of decreasing H_ii) the
group scales are chosen up front from the original weights ("static groups"), so that the
groups stay contiguous along K and the scale layout is the usual [N, K / group].
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..memory import return_freed_heap
from ..numerics import dequantize_math, qparams_for_range, quantize_math, stored_qparams
from ..observers import weight_qparams
from ..spec import PerChannel, PerGroup, PerTensor


def layer_error(w: Tensor, w_hat: Tensor | None, h: Tensor) -> float:
    """The GPTQ objective tr((W - W_hat) H (W - W_hat)^T), computed in H's dtype (float64 for an
    exact figure; the pass's reports use its float32 H: no float64 copy of a K x K matrix) and
    summed in float64. `w_hat=None` is zero: tr(W H W^T)."""
    total = 0.0
    for rows in range(0, w.shape[0], 256):  # by rows: no N x K temporaries (lm_head: 32000 x 2048)
        d = w[rows:rows + 256].to(h.dtype)
        if w_hat is not None:
            d = d - w_hat[rows:rows + 256].to(h.dtype)
        total += float(((d @ h) * d).sum(dtype=torch.float64))
    return total


def code_dtype(spec) -> torch.dtype:
    """int8 when the grid [qmin, qmax] fits in it (every int4 / uint4 / int8 spec), else int32: an
    lm_head's codes are 65 MB, not 262, while its float weight, GPTQ's target and the result live."""
    return torch.int8 if -128 <= spec.qmin and spec.qmax <= 127 else torch.int32


def _column_grid(spec, k: int) -> tuple[int, int]:
    """(group size along K, number of groups) of a spec; per channel / per tensor is one group."""
    g = spec.granularity
    if isinstance(g, PerGroup):
        if g.axis not in (-1, 1):
            raise ValueError(f"GPTQ quantizes along K (axis -1 of an [N, K] weight); got a group axis {g.axis}")
        return g.size, -(-k // g.size)
    if isinstance(g, PerChannel) and g.axis != 0:
        raise ValueError(f"GPTQ needs per-output-channel scales (axis 0), got axis {g.axis}")
    return k, 1


def _group_qparams(w_cols: Tensor, spec, h_block: Tensor | None = None, clip_grid: int = 0,
                   max_shrink: float = 0.5) -> tuple[Tensor, Tensor]:
    """Per-row scale and zero point [N] for a slice of columns (one group). With `clip_grid`, each
    row's range is shrunk by the factor in [1 - max_shrink, 1] that minimizes its rounding error
    weighted by the Hessian block of these columns, d H_g d^T (an output error, not a weight error)."""
    w_cols = w_cols.float().contiguous()  # a column slice of W: strided, slow to scan repeatedly
    if isinstance(spec.granularity, PerTensor):
        s, z = weight_qparams(w_cols, spec)
        n = w_cols.shape[0]
        return s.reshape(1).expand(n), z.reshape(1).expand(n)
    row = dataclasses.replace(spec, granularity=PerChannel(0))  # the same grid, one scale per row
    s, z = weight_qparams(w_cols.float(), row)
    if not clip_grid or h_block is None:
        return s, z
    w = w_cols.float()
    lo, hi = w.amin(1), w.amax(1)
    hb = h_block.float()
    best = None
    for i in range(clip_grid + 1):
        factor = 1.0 - max_shrink * i / clip_grid
        si, zi = qparams_for_range(lo * factor, hi * factor, spec)
        d = w - _quantize_column_block(w, si, zi, spec)
        err = ((d @ hb) * d).sum(1)
        if best is None:
            best, s, z = err, si, zi
        else:
            better = err < best
            best, s, z = torch.where(better, err, best), torch.where(better, si, s), torch.where(better, zi, z)
    return s, z


def _quantize_column_block(w: Tensor, s: Tensor, z: Tensor, spec) -> Tensor:
    q = quantize_math(w, s, z, 0, 0, spec.qmin, spec.qmax, torch.int32, spec.rounding)
    return dequantize_math(q, *stored_qparams(s, z, spec), 0, 0, torch.float32)


def _quantize_column(w: Tensor, s: Tensor, z: Tensor, spec) -> tuple[Tensor, Tensor]:
    """(codes, dequantized values) of one column with per-row qparams, by the numerics contract
    (dequantized with the stored qparams: what the file and the reference graph hold)."""
    q = quantize_math(w, s, z, 0, 0, spec.qmin, spec.qmax, torch.int32, spec.rounding)
    return q, dequantize_math(q, *stored_qparams(s, z, spec), 0, 0, w.dtype)


def refit_scales(w: Tensor, codes: Tensor, scale: Tensor, zero: Tensor, h: Tensor, group: int) -> Tensor:
    """Per row, the group scales that minimize tr((W - W_hat) H (W - W_hat)^T) with the codes and
    zero points fixed: W_hat is linear in the scales, so this is a G x G least squares per row
    (A s = b, A_gh = (q - z)_g^T H_gh (q - z)_h, b_g = (q - z)_g^T (H w)_g). The scales GPTQ used
    were fixed before the error feedback moved the weights; the codes it chose fit other ones
    better. A row whose system is singular or changes a scale's sign keeps its scales. A float
    zero point is an offset m (W_hat = q s + m): then q takes the place of q - z and W - m of W."""
    n, k = w.shape
    scale2 = scale.reshape(n, -1).double()
    n_groups = scale2.shape[1]
    pad = n_groups * group - k
    zero_full = zero.reshape(n, -1).double().repeat_interleave(group, 1)[:, :k]
    if zero.is_floating_point():
        w, qz = w.double() - zero_full, codes.double()
    else:
        qz = codes.double() - zero_full
    qz = torch.nn.functional.pad(qz, (0, pad)).reshape(n, n_groups, group)
    hp = torch.nn.functional.pad(h.double(), (0, pad, 0, pad)).reshape(n_groups, group, n_groups, group)
    t = torch.einsum("agbh,nbh->nagb", hp, qz)                    # [N, G, g, G]: (H restricted) (q - z)
    a = torch.einsum("nag,nagb->nab", qz, t)                      # [N, G, G]
    hw = torch.nn.functional.pad(w.double() @ h.double(), (0, pad)).reshape(n, n_groups, group)
    b = (qz * hw).sum(-1)                                          # [N, G]
    new, info = torch.linalg.solve_ex(a, b.unsqueeze(-1))
    new = new.squeeze(-1)
    ok = (info == 0) & torch.isfinite(new).all(1) & (new * scale2 > 0).all(1)
    return torch.where(ok.unsqueeze(1), new, scale2).to(scale.dtype).reshape(scale.shape)


def gptq_quantize(w: Tensor, h: Tensor, spec, *, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False, clip_grid: int = 0, max_shrink: float = 0.5, refit: bool = False,
                  dtype: torch.dtype = torch.float32, row_chunk: int = 4096) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize an [N, K] weight given the Hessian H = X^T X / rows ([K, K]) of its inputs.

    Returns (codes [N, K] in `code_dtype(spec)`, scale, zero_point) with scale and zero point in the layout of
    `spec` (numerics: [] per tensor, [N] per channel, [N, K / group] per group), such that
    `quantize_math(dequantize(codes), scale, zero_point)` gives back exactly `codes`.
    `damp` adds damp * mean(diag H) to the diagonal; `dtype` is the precision of the updates.
    `clip_grid` > 0 searches each group's range (see `_group_qparams`) instead of min-max.
    `refit` re-solves the scales for the final codes (`refit_scales`, on the undamped H).
    `row_chunk`: given H (and a per-tensor scale fixed up front) the rows are independent, so the
    column loop runs on this many rows at a time and its working copies are [row_chunk, K]: an
    lm_head of 32000 x 2048 holds its codes and 2 x 32 MB of work (the rows and their error
    feedback), not four N x K buffers (8192 rows: the lm_head's peak of a sequential 1B run).
    """
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"Hessian of shape {tuple(h.shape)} does not fit a weight of shape {tuple(w.shape)}")
    group, n_groups = _column_grid(spec, k)
    grouped = isinstance(spec.granularity, PerGroup)
    w_orig, h_orig = w.detach(), h.detach()
    # One K x K working matrix (127 MB in float32 at K = 5632, a 1B LLaMA's down_proj): H is read
    # from the caller's, gathered into it in processing order, damped, and factored in place
    h_src = h_orig if h_orig.dtype == dtype else h_orig.to(dtype)
    diag = torch.diagonal(h_src).clone()
    dead = diag == 0
    diag[dead] = 1.0  # inputs that are always zero: their columns cannot matter, quantize them alone

    def h_block(cols: slice) -> Tensor:  # a diagonal block of H with the dead inputs' 1.0
        block = h_src[cols, cols].clone()
        block.diagonal().copy_(diag[cols])
        return block

    def working_rows(rows: slice, order: Tensor | None) -> Tensor:
        """The rows in the update dtype, columns in `order`, dead columns zeroed: one new chunk
        (gathered from the view, not copied and then permuted: an lm_head's chunks are 64 MB)."""
        part = w_orig[rows]
        part = part.index_select(1, order) if order is not None else part.clone()
        part = part.to(dtype)
        part[:, dead if order is None else dead[order]] = 0.0
        return part

    scales = torch.empty(n, n_groups, dtype=torch.float32)
    zeros = torch.empty(n, n_groups, dtype=torch.float32 if spec.zero_point_domain == "float" else torch.int32)
    static = not grouped or act_order
    if static:  # qparams from the original weights, before any error is pushed onto them
        for gi in range(n_groups):
            cols = slice(gi * group, (gi + 1) * group)
            part = w_orig[:, cols].to(dtype).clone()
            part[:, dead[cols]] = 0.0
            scales[:, gi], zeros[:, gi] = _group_qparams(part, spec, h_block(cols), clip_grid, max_shrink)
            del part
            # glibc serves even a 16-32 MB temporary from a free hole of its heap when one fits, and
            # the pages it touches there stay resident after it is freed: by a 1B model's lm_head
            # the heap spans ~820 MB (~210 resident), and the head's groups and row chunks touched
            # 240-350 MB more of it (peak 1477-1650 MB, or 1265-1283 in runs whose heap was small).
            # Handing the free pages back after each group and each chunk keeps only one step's.
            return_freed_heap()

    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(k)
    h = h_src[perm.unsqueeze(1), perm] if act_order else h_src.clone()
    del h_src
    h.diagonal().copy_(diag[perm])
    col_group = perm // group  # the group of each column, in processing order

    h.diagonal().add_(damp * torch.diagonal(h).mean())
    if grouped and not act_order:
        block_size = group  # a block never straddles a group, so a group's qparams see all earlier updates
    # the loop reads only H's diagonal blocks (the range search of groups chosen on the fly)
    diagonal_blocks = {i1: h[i1:i1 + block_size, i1:i1 + block_size].clone()
                       for i1 in range(0, k, block_size)} if not static else {}
    # Upper Cholesky factor of H^-1: row i holds the OBS update of the columns after column i. Each
    # step writes into the storage of the one before (H is symmetric, so its column-major view is
    # LAPACK's layout): bit for bit the values of three out-of-place calls, with no K x K copy
    factor = torch.linalg.cholesky(h.mT, out=h.mT)
    factor = torch.cholesky_inverse(factor, out=factor)
    hinv = torch.linalg.cholesky(factor, upper=True, out=factor)
    del h, factor

    codes = torch.empty(n, k, dtype=code_dtype(spec))
    inverse = torch.argsort(perm)
    for r0 in range(0, n, max(1, row_chunk)):
        rows = slice(r0, min(r0 + max(1, row_chunk), n))
        w = working_rows(rows, perm if act_order else None)
        # The column loop works on transposed blocks ([columns, rows], contiguous): a column of W is
        # then a contiguous row, and on a 5632-row weight the per-column ops ran 5-25x faster than on
        # strided columns. Same arithmetic, element for element.
        codes_t = torch.zeros(k, w.shape[0], dtype=codes.dtype)
        scales_t, zeros_t = scales[rows].T.contiguous(), zeros[rows].T.contiguous()
        for i1 in range(0, k, block_size):
            i2 = min(i1 + block_size, k)
            w1 = w[:, i1:i2].T.contiguous()
            err1 = torch.zeros_like(w1)
            h1 = hinv[i1:i2, i1:i2]
            if not static:
                gi = i1 // group
                s_g, z_g = _group_qparams(w[:, i1:i2], spec, diagonal_blocks[i1], clip_grid, max_shrink)
                scales_t[gi], zeros_t[gi] = s_g, z_g
            for i in range(i2 - i1):
                gi = int(col_group[i1 + i])
                q, deq = _quantize_column(w1[i], scales_t[gi], zeros_t[gi], spec)
                codes_t[i1 + i] = q
                e = (w1[i] - deq) / h1[i, i]
                w1[i:] -= h1[i, i:].unsqueeze(1) * e.unsqueeze(0)
                err1[i] = e
            w[:, i2:] -= err1.T @ hinv[i1:i2, i2:]
        scales[rows], zeros[rows] = scales_t.T, zeros_t.T
        codes[rows] = codes_t.T[:, inverse] if act_order else codes_t.T
        del w, codes_t
        return_freed_heap()   # as after each group's qparams above
    if refit and not isinstance(spec.granularity, PerTensor):
        # the refitted scales are stored as they are (float16 for GGUF): the codes stay the chosen ones
        scales = stored_qparams(refit_scales(w_orig, codes, scales, zeros, h_orig, group), zeros, spec)[0]
    if isinstance(spec.granularity, PerTensor):
        return codes, scales[0, 0].clone(), zeros[0, 0].clone()
    if isinstance(spec.granularity, PerChannel):
        return codes, scales[:, 0].contiguous(), zeros[:, 0].contiguous()
    return codes, scales, zeros
