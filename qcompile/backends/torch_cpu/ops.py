"""CPU integer kernels of the torch backend, as custom ops that torch.export / torch.compile see as one node.

`qcompile::int8_dynamic_linear(x, w_q_t, w_scale, bias)` is the lowered form of the reference pattern

    choose_qparams_per_token(x) -> quantize(x, s, 0, -1, K, -128, 127, int8) -> dequantize
    aten.linear(that, dequantize(w_q [N, K] int8, w_scale [N], 0, axis 0), bias)

It quantizes x per token with the numerics module's own functions (identical codes), multiplies the
codes on `torch._int_mm` (int8 x int8 -> int32, exact), and rescales in float32 as
`acc.float() * x_scale * w_scale` (that order is the one inductor's x86 int8 pattern matcher
recognizes) before adding the bias.

`torch._int_mm` on CPU (aten/src/ATen/native/LinearAlgebra.cpp `_int_mm_out_cpu`, and
torch/_meta_registrations.py `meta__int_mm`) only requires two 2-D operands, `self` int8 or uint8,
`mat2` int8, and matching K; any M >= 0, K and N work (checked here on M = 0, 1, 3, K = 5, 17, N = 7, 33)
and `mat2` may be non-contiguous. The CUDA kernel is the one with shape rules (M > 16, K and N
multiples of 8): this op is for the CPU, so it neither pads nor falls back. The int32 accumulator is
exact while K * 128 * 128 < 2**31, i.e. K <= 131071 (checked in `int8_mm`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...numerics import per_token_qparams_math, quantize_math

QMIN, QMAX = -128, 127
MAX_K = (2 ** 31 - 1) // (128 * 128)   # largest K whose int32 sum of int8 x int8 products cannot overflow


def quantize_per_token(x2d: Tensor) -> tuple[Tensor, Tensor]:
    """int8 codes [M, K] and float32 scales [M, 1] of the reference per-token symmetric quantization."""
    scale, zero_point = per_token_qparams_math(x2d, QMIN, QMAX)
    q = quantize_math(x2d, scale, zero_point, -1, x2d.shape[-1], QMIN, QMAX, torch.int8)
    return q, scale


def int8_mm(q_x: Tensor, w_q_t: Tensor) -> Tensor:
    """Exact int32 [M, N] accumulator of int8 [M, K] x int8 [K, N]."""
    if q_x.shape[-1] > MAX_K:
        raise ValueError(f"K = {q_x.shape[-1]} can overflow the int32 accumulator (K <= {MAX_K})")
    return torch._int_mm(q_x, w_q_t)


def int8_dynamic_linear_math(x: Tensor, w_q_t: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    k, n = w_q_t.shape
    x2d = x.reshape(-1, k)
    q_x, x_scale = quantize_per_token(x2d)
    acc = int8_mm(q_x, w_q_t)
    # In place on one [M, N] buffer; the same operations in the same order as acc.float() * x_scale * w_scale + bias.
    y = acc.to(torch.float32)
    y.mul_(x_scale).mul_(w_scale.to(torch.float32))
    if bias is not None:
        y.add_(bias)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


@torch.library.custom_op("qcompile::int8_dynamic_linear", mutates_args=())
def int8_dynamic_linear(x: Tensor, w_q_t: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Dynamic per-token INT8 linear: x float [..., K], w_q_t int8 [K, N], w_scale float32 [N], bias [N]."""
    return int8_dynamic_linear_math(x, w_q_t, w_scale, bias)


@int8_dynamic_linear.register_fake
def _(x, w_q_t, w_scale, bias=None):
    torch._check(w_q_t.dim() == 2 and w_q_t.dtype == torch.int8, lambda: "w_q_t must be int8 [K, N]")
    torch._check(x.shape[-1] == w_q_t.shape[0], lambda: "x [..., K] and w_q_t [K, N] disagree on K")
    return x.new_empty((*x.shape[:-1], w_q_t.shape[1]))
