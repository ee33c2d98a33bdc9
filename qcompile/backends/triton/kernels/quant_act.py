"""Activation quantization to int8/uint8 codes.

DYNAMIC (per token, symmetric int8), `quantize_rows_kernel`, ROWS rows per program: absmax over a row -> s = max(absmax / 127, eps) -> codes,
in one kernel (two sweeps over the row when K > BLOCK_K). The same float32 operations as
qcompile.numerics (choose_qparams symmetric, then quantize_math), so the codes and scales are
bit-identical to the reference graph: IEEE division (`tl.div_rn`; Triton's `/` is the approximate
div.full.f32 on NVIDIA), round half to even, clamp, NaN -> zero point.
Static (per tensor): `quantize_flat_kernel`, BLOCK elements per program over the flattened tensor
(rows can be as short as a feature map's width), s and z read from 0-d tensors (no host sync).
"""
from __future__ import annotations

import triton
import triton.language as tl

SCALE_EPS = tl.constexpr(1.1920928955078125e-07)   # float32 eps: the numerics module's degenerate-range scale


@triton.jit
def quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, zp_ptr, M, K, stride_xm, stride_qm,
                         DYNAMIC: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    # ROWS rows per program: short rows (K of a few hundred) would leave most lanes idle otherwise.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qm
    offs = tl.arange(0, BLOCK_K)[None, :]
    if DYNAMIC:
        amax = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_rows + k0 + offs, mask=row_ok[:, None] & (k0 + offs < K), other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.div_rn(tl.max(amax, axis=1), QMAX * 1.0)
        scale = tl.where(scale > SCALE_EPS, scale, SCALE_EPS)
        zp = 0.0
        tl.store(scale_ptr + rows, scale, mask=row_ok)
        tl.store(zp_ptr + rows, tl.zeros((ROWS,), dtype=tl.int32), mask=row_ok)
        scale = scale[:, None]
    else:
        scale = tl.load(scale_ptr)
        zp = tl.load(zp_ptr).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & (k0 + offs < K)
        x = tl.load(x_rows + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.div_rn(x, scale)
        v = tl.where(v != v, 0.0, v)                   # NaN -> the zero point
        v = (v + 12582912.0) - 12582912.0              # round half to even; huge |v| still saturates
        v = tl.clamp(v + zp, QMIN, QMAX)
        tl.store(q_rows + k0 + offs, v.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def quantize_flat_kernel(x_ptr, q_ptr, scale_ptr, zp_ptr, numel, QMIN: tl.constexpr, QMAX: tl.constexpr,
                         BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.div_rn(x, tl.load(scale_ptr))
    v = tl.where(v != v, 0.0, v)
    v = (v + 12582912.0) - 12582912.0
    v = tl.clamp(v + tl.load(zp_ptr).to(tl.float32), QMIN, QMAX)
    tl.store(q_ptr + offs, v.to(q_ptr.dtype.element_ty), mask=mask)


def launch_quantize_flat(x, q, scale, zp, *, qmin: int, qmax: int, block: int = 1024) -> None:
    """Contiguous x -> q (same shape) with a per-tensor scale / zero point (0-d tensors)."""
    n = x.numel()
    quantize_flat_kernel[(triton.cdiv(n, block),)](x, q, scale, zp, n, QMIN=qmin, QMAX=qmax, BLOCK=block,
                                                   num_warps=4, enable_fp_fusion=False)


def launch_quantize_rows(x2d, q2d, scale, zp, *, dynamic: bool, qmin: int, qmax: int) -> None:
    """x2d [M, K] float (unit stride along K) -> q2d [M, K]; dynamic writes scale [M], zp [M]."""
    M, K = x2d.shape
    block_k = min(triton.next_power_of_2(max(K, 16)), 4096)
    rows = max(1, min(4096 // block_k, triton.next_power_of_2(M)))   # ~4096 elements per program
    quantize_rows_kernel[(triton.cdiv(M, rows),)](x2d, q2d, scale, zp, M, K, x2d.stride(0), q2d.stride(0),
                                                  DYNAMIC=dynamic, QMIN=qmin, QMAX=qmax, ROWS=rows,
                                                  BLOCK_K=block_k, num_warps=4 if rows * block_k <= 2048 else 8,
                                                  enable_fp_fusion=False)
