"""Weight-only INT8 / INT4 linears on PyTorch's CPU pack kernels.

    int8_weight_only_linear(x [..., K], w_q int8 [N, K], w_scale [N], bias, compute_dtype)
        -> aten._weight_int8pack_mm: y = x @ (w_q * s_w)^T
    int4_weight_only_linear(x [..., K], w_packed, w_codes, scale_and_zero [K/G, N, 2], group, n, bias, compute_dtype)
        -> aten._weight_int4pack_mm_for_cpu on nibbles packed by aten._convert_weight_to_int4pack_for_cpu

are the lowered forms of `linear(x, dequantize(w_q, s_w, z_w), bias)` for the w8a16 / w4a16 recipes.

The kernels take their activations in `compute_dtype` (bfloat16 by default): with FP32 activations
they are 5-50x slower than an FP32 linear (`_weight_int8pack_mm` 6.5 GOP/s at M = 1024), so FP32
activations are cast to BF16 on the way in and the output is cast back. They are GEMV kernels:
measured here (2 threads, BF16), at M = 1 and 4096 x 4096 int8pack takes 0.70 ms and int4pack 0.50 ms
against 2.19 ms for a BF16 linear, but at M = 128 on 384 x 1536 they take 1.08 / 0.88 ms against 0.43 ms,
and dequantizing the weight in BF16 per call then running the BF16 linear takes 0.57 ms. So rows
M <= GEMV_MAX_M go to the pack kernels and larger M dequantizes per call (the weights stay stored as
integers; the INT4 op keeps one code per byte beside the packed nibbles for this). That is the one rounding the reference graph does not do: its
bound is the BF16 rounding of x, of the scales and of the output (see tests/test_torch_cpu_lowering.py).
`compute_dtype=torch.float32` keeps FP32 arithmetic (the reference's, to summation order) for
users who want it and accept the speed.

INT4: the kernel's dequantization is `(q_u - 8) * scale + zero` per group with q_u in [0, 15]
(tinygemm's layout). The reference's `(q - z) * s` maps onto it exactly in real arithmetic:
q_u = q + 8 for int4 codes in [-8, 7] (zero = 0) and q_u = q for uint4 with zero = (8 - z) * s.
The kernel needs N % 16 == 0, K % G == 0 and G in {32, 64, 128, 256}: the lowering pads N with zero
rows (sliced off the output) and K with codes that dequantize to 0 (x is zero-padded to match).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

INT4_GROUPS = (32, 64, 128, 256)
INT4_N_MULTIPLE = 16
# BF16 _weight_int8pack_mm with K not a multiple of 16 crashes the process (K = 36, 37, 40) or
# returns NaN (K = 33), checked here; those shapes take the dequantize + GEMM path.
INT8PACK_K_MULTIPLE = 16
GEMV_MAX_M = 32   # measured crossover on 384 x 1536: pack kernel faster up to M = 32, dequantize + GEMM above


@torch.library.custom_op("qcompile::int8_weight_only_linear", mutates_args=())
def int8_weight_only_linear(x: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                            compute_dtype: torch.dtype) -> Tensor:
    n, k = w.shape
    x2d = x.reshape(-1, k).to(compute_dtype).contiguous()
    if x2d.shape[0] <= GEMV_MAX_M and (k % INT8PACK_K_MULTIPLE == 0 or compute_dtype == torch.float32):
        y = torch.ops.aten._weight_int8pack_mm(x2d, w, w_scale.to(compute_dtype))
    else:
        y = F.linear(x2d, w.to(compute_dtype) * w_scale.to(compute_dtype)[:, None])
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


@int8_weight_only_linear.register_fake
def _(x, w, w_scale, bias, compute_dtype):
    torch._check(w.dtype == torch.int8 and w.dim() == 2, lambda: "w must be int8 [N, K]")
    torch._check(x.shape[-1] == w.shape[1], lambda: "x [..., K] and w [N, K] disagree on K")
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def pack_int4_for_cpu(w_q: Tensor, scale: Tensor, zero_point: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """(packed nibbles, q_u uint8 [N_pad, K_pad], scale_and_zero [K_pad / G, N_pad, 2] float32) for
    `int4_weight_only_linear`.

    w_q: int4 codes in int8 ([-8, 7]) or uint4 codes in uint8 ([0, 15]), [N, K]; scale, zero_point:
    [N, ceil(K / G)] (zero_point may be one element)."""
    n, k = w_q.shape
    n_groups = -(-k // group)
    k_pad, n_pad = n_groups * group, -(-n // INT4_N_MULTIPLE) * INT4_N_MULTIPLE
    s = scale.float().reshape(n, n_groups)
    z = zero_point.float().expand(n, n_groups) if zero_point.numel() == 1 else zero_point.float().reshape(n, n_groups)
    if w_q.dtype == torch.int8:            # int4: q_u = q + 8 and (q - z) s = (q_u - 8) s + (-z) s
        q_u, zero = w_q.to(torch.int32) + 8, -z * s
    else:                                  # uint4: q_u = q and (q - z) s = (q - 8) s + (8 - z) s
        q_u, zero = w_q.to(torch.int32), (8.0 - z) * s
    # padding: K with q_u = 8 and N with zero rows dequantize to exactly 0.0
    q_u = F.pad(q_u, (0, k_pad - k, 0, n_pad - n), value=8)
    s = F.pad(s, (0, 0, 0, n_pad - n), value=0.0)
    zero = F.pad(zero, (0, 0, 0, n_pad - n), value=0.0)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_u.contiguous(), 1)
    return packed, q_u.to(torch.uint8).contiguous(), torch.stack([s.t(), zero.t()], dim=-1).contiguous()


@torch.library.custom_op("qcompile::int4_weight_only_linear", mutates_args=())
def int4_weight_only_linear(x: Tensor, w_packed: Tensor, w_codes: Tensor, scale_and_zero: Tensor, group: int,
                            n: int, bias: Optional[Tensor], compute_dtype: torch.dtype) -> Tensor:
    k = x.shape[-1]
    k_pad = scale_and_zero.shape[0] * group
    x2d = x.reshape(-1, k).to(compute_dtype)
    if k_pad != k:
        x2d = F.pad(x2d, (0, k_pad - k))
    sz = scale_and_zero.to(compute_dtype)
    if x2d.shape[0] <= GEMV_MAX_M:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d.contiguous(), w_packed, group, sz)
    else:   # the kernel's own dequantization, (q_u - 8) * scale + zero per group, then one GEMM
        n_pad = w_codes.shape[0]
        w = (w_codes.to(compute_dtype) - 8).view(n_pad, -1, group) * sz[..., 0].t().unsqueeze(-1) + sz[..., 1].t().unsqueeze(-1)
        y = F.linear(x2d, w.view(n_pad, k_pad))
    y = y[:, :n].to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


@int4_weight_only_linear.register_fake
def _(x, w_packed, w_codes, scale_and_zero, group, n, bias, compute_dtype):
    torch._check(group in INT4_GROUPS, lambda: f"group must be one of {INT4_GROUPS}")
    return x.new_empty((*x.shape[:-1], n))
