"""INT4 weight-only GEMM: fp16/bf16 activations x packed signed int4 weights, fp32 accumulation.

W is [N, ceil(K/2)] uint8 in the ONNX int4 layout of qcompile.numerics.pack_int4: two codes per byte
along K, element 2j in the low nibble, 2j+1 in the high nibble; int4 (SIGNED, -8..7) or uint4
(0..15) codes. Scales are [N, ceil(K/G)] float32, one per group of G consecutive k; optional zero
points (HAS_ZP) have the same shape and strides: w = (q - z) * s.

Per K tile the packed bytes are unpacked in registers. int4: the byte is bitcast to int8 so that
arithmetic shifts sign-extend, `(p << 4) >> 4` is the low code and `p >> 4` the high code; uint4:
`p & 0xF` and `p >> 4` on the uint8. Both are converted to the compute dtype (exact: |q| <= 8) before `tl.join(lo, hi).permute.reshape`
interleaves them back to [BLOCK_K, BLOCK_N] (converting before the join lets the compiler feed
the MMA from registers). Since G % BLOCK_K == 0, a tile lies in one group, so the group scale is
applied to the tile's fp32 partial product, `acc += dot(a, q) * s[g, n]`: the MMA multiplies
integers (exact in fp16) and the scale is applied in fp32 exactly as the reference's s * q.
Zero points are subtracted from the unpacked codes in registers, q - z (|q - z| <= 15: exact in fp16
and bf16), so the MMA still multiplies exact integers. (A row-sum correction, s * (sum x q - z sum x),
was tried first: it forces the activation tile through registers and spilled 52 B on sm_80 and 248 B
on sm_90 at 128x128x64; measured with aot.py.)
The activation tile is cast to COMPUTE (fp16 or bf16) in registers, so fp32 inputs work too.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .int8_gemm import ACTIVATIONS, _activation


@triton.jit
def int4_gemm_kernel(
    a_ptr, w_ptr, c_ptr, scale_ptr, zp_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_sn, stride_sg, stride_cm, stride_cn,
    GROUP: tl.constexpr, SIGNED: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    tl.static_assert(GROUP % BLOCK_K == 0)
    tl.static_assert(BLOCK_K % 2 == 0)
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
    rm = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M).to(tl.int64)
    rn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kp = tl.arange(0, BLOCK_K // 2)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_kp[:, None] * stride_wk + rn[None, :] * stride_wn
    s_ptrs = scale_ptr + rn * stride_sn
    z_ptrs = zp_ptr + rn * stride_sn
    KP = (K + 1) // 2

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - kt * BLOCK_K, other=0.0).to(COMPUTE)
        p = tl.load(w_ptrs, mask=offs_kp[:, None] < KP - kt * (BLOCK_K // 2), other=0)
        if SIGNED:
            p = p.to(tl.int8, bitcast=True)
            lo = ((p << 4) >> 4).to(COMPUTE)
        else:
            lo = (p & 0xF).to(COMPUTE)
        hi = (p >> 4).to(COMPUTE)
        g_off = ((kt * BLOCK_K) // GROUP) * stride_sg
        if HAS_ZP:
            z = tl.load(z_ptrs + g_off).to(COMPUTE)[None, :]
            lo = lo - z
            hi = hi - z
        q = tl.join(lo, hi).permute(0, 2, 1).reshape(BLOCK_K, BLOCK_N)
        acc += tl.dot(a, q, out_dtype=tl.float32) * tl.load(s_ptrs + g_off)[None, :]
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += (BLOCK_K // 2) * stride_wk

    mask_m = offs_m < M
    mask_n = offs_n < N
    y = acc
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = _activation(y, ACT)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def launch_int4_gemm(a, w_packed, c, scale, bias, *, group: int, act: str, compute, config, zp=None,
                     signed: bool = True) -> None:
    """a [M, K] float, w_packed [N, ceil(K/2)] uint8, c [M, N], scale [N, ceil(K/group)] float32, zp like
    scale (same strides) or None."""
    import torch

    M, K = a.shape
    N = w_packed.shape[0]
    bk = config.block_k
    grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n),)
    if zp is not None:
        assert zp.shape == scale.shape and zp.stride() == scale.stride(), "zero points must be laid out like scales"
    int4_gemm_kernel[grid](
        a, w_packed, c, scale, zp if zp is not None else scale, bias if bias is not None else scale,
        M, N, K, a.stride(0), a.stride(1), w_packed.stride(0), w_packed.stride(1),
        scale.stride(0), scale.stride(1), c.stride(0), c.stride(1),
        GROUP=group, SIGNED=signed, HAS_ZP=zp is not None, HAS_BIAS=bias is not None, ACT=ACTIVATIONS[act],
        COMPUTE=tl.float16 if compute == torch.float16 else tl.bfloat16,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=bk, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
