"""INT8 x INT8 -> INT32 GEMM with a fused float32 epilogue (scales, bias, activation, requantize).

    C[m, n] = epilogue(s_a[m or 0] * s_w[n] * (sum_k A'[m, k] W[n, k] + corr[n]) + bias[n])

A is [M, K] int8 codes, or uint8 codes (A_U8) that are shifted to int8 in registers by an xor with
0x80 (q - 128): `tl.dot(uint8, int8)` is rejected by Triton, and s8 x s8 is the tensor-core op. The
shift and the activation zero point z_a are folded into `corr[n] = (128 - z_a) * sum_k W[n, k]`,
an exact int32 added to the accumulator (the lowering precomputes it per layer), so
sum_k (q_a - z_a) W = acc + corr. W is [N, K] (nn.Linear's layout): both operands K-major, the only
8-bit layout of mma.sync (`.row.col`) and wgmma. The int32 accumulator is exact for K <= 131071.

The epilogue runs in float32 in the order of the pure-PyTorch reference (ops.py): acc * s_a * s_w
+ bias, then ReLU / exact GELU (erf) / tanh GELU / SiLU, then either a float store (fp32/fp16/bf16)
or a requantization `clamp(round_half_even(y / s_out) + z_out, QMIN, QMAX)` to int8 or uint8 codes
(divide, not multiply by 1/s: the ONNX QuantizeLinear rounding of the numerics contract).
No libdevice (not in the interpreter): rint is the 1.5 * 2**23 trick, tanh-GELU is x*sigmoid(2u).
"""
from __future__ import annotations

import triton
import triton.language as tl

ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
RNE_MAGIC = 12582912.0   # 1.5 * 2**23: (v + M) - M rounds half to even for |v| < 2**22


@triton.jit
def _activation(y, ACT: tl.constexpr):
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 3:
        # 0.5 * y * (1 + tanh(u)) == y * sigmoid(2u), u = sqrt(2/pi) * (y + 0.044715 y^3)
        y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
    elif ACT == 4:
        y = y * tl.sigmoid(y)
    return y


@triton.jit
def _requantize(y, out_scale, out_zp, QMIN: tl.constexpr, QMAX: tl.constexpr):
    v = tl.div_rn(y, out_scale)
    v = tl.where(v != v, 0.0, v)                       # NaN quantizes to the zero point
    v = (v + 12582912.0) - 12582912.0                  # round half to even (|v| >= 2**22 saturates below)
    return tl.clamp(v + out_zp, QMIN, QMAX)           # clamp before the cast: float -> int8 wraps


@triton.jit
def int8_gemm_kernel(
    a_ptr, w_ptr, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, corr_ptr, out_scale_ptr, out_zp_ptr,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_cm, stride_cn,
    A_U8: tl.constexpr, A_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CORR: tl.constexpr,
    ACT: tl.constexpr, REQUANT: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row tiles share each W column tile while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M / N re-read valid rows (modulo) instead of masking every load; their results are
    # never stored. int64 row offsets: M * K or N * K may pass 2**31.
    rm = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M).to(tl.int64)
    rn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + rn[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_left = K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)   # zero W makes padded A harmless
        if A_U8:
            a = (a ^ 0x80).to(tl.int8, bitcast=True)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    mask_m = offs_m < M
    mask_n = offs_n < N
    if HAS_CORR:
        acc += tl.load(corr_ptr + offs_n, mask=mask_n, other=0)[None, :]
    y = acc.to(tl.float32)
    if A_PER_ROW:
        y = y * tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    else:
        y = y * tl.load(a_scale_ptr)
    y = y * tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = _activation(y, ACT)
    if REQUANT:
        y = _requantize(y, tl.load(out_scale_ptr), tl.load(out_zp_ptr).to(tl.float32), QMIN, QMAX)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def launch_int8_gemm(a, w, c, a_scale, w_scale, bias, corr, out_scale, out_zp, *, a_per_row: bool,
                     act: str, qmin: int, qmax: int, config) -> None:
    """Launch on 2-D views: a [M, K] int8/uint8, w [N, K] int8, c [M, N]; `config` from configs.py."""
    import torch

    M, K = a.shape
    N = w.shape[0]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    dummy = w_scale   # never read when the matching constexpr flag is off
    int8_gemm_kernel[grid](
        a, w, c, a_scale, w_scale,
        bias if bias is not None else dummy, corr if corr is not None else dummy,
        out_scale if out_scale is not None else dummy, out_zp if out_zp is not None else dummy,
        M, N, K, a.stride(0), a.stride(1), w.stride(0), w.stride(1), c.stride(0), c.stride(1),
        A_U8=a.dtype == torch.uint8, A_PER_ROW=a_per_row, HAS_BIAS=bias is not None,
        HAS_CORR=corr is not None, ACT=ACTIVATIONS[act], REQUANT=c.dtype in (torch.int8, torch.uint8),
        QMIN=qmin, QMAX=qmax, EVEN_K=K % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages,
        enable_fp_fusion=False,   # no FMA contraction: the epilogue rounds like the reference, op by op
    )
