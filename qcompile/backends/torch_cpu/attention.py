"""INT8 attention on the CPU: `qcompile::int8_attention`, the lowered form of the reference pattern

    scores = matmul(dequantize(q), dequantize(k)^T) * scale + mask
    P      = quantize(softmax(scores, -1), p_scale, p_zp)                     uint8, fixed [0, 1] range
    out    = matmul(dequantize(P), dequantize(v))           [-> quantize(o_scale, o_zp): the next linear's codes]

with per-tensor qparams (Python numbers in the op's schema, so that inductor sees them as
constants). Codes are [batch, heads, seq, head_dim]; K is passed untransposed.

- Eager: the exact integer accumulators (q - z_q)(k - z_k) and (P - z_p)(v - z_v), computed as
  float32 matmuls of the zero-point-shifted codes, exact while the largest possible sum stays
  below 2**24 (else float64, exact to 2**53); then the reference's float steps (rescale, scale,
  mask, softmax, quantize P, rescale, requantize) with numerics.py's quantize. This is the
  correctness path, no faster than float attention.
- Under `torch.compile` (inductor) on a CPU with AMX, the op is lowered to torchao's INT8 SDPA
  template (`torchao.prototype.inductor`: one fused C++ kernel of oneDNN brgemm int8 matmuls with
  the zero-point compensation, mask, softmax, P quantization and output requantization between
  them; no float round trip, no [seq x seq] tensor in memory). Elsewhere inductor calls the eager op.
  What the template computes differently: exp is a vectorized polynomial (`fexp_u20`), P is
  quantized as p * (1 / sum / p_scale) (a multiplication, not a division), and the output codes
  come from the int32 accumulator rescaled by p_scale * v_scale / o_scale. tests/test_attention.py
  bounds both paths against the reference graph in quantization steps.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor

from ...numerics import quantize_math

CODE_DTYPES = (torch.uint8, torch.int8)
_F32_EXACT = 2 ** 24


def _shifted(codes: Tensor, zp: int, dtype: torch.dtype) -> Tensor:
    return codes.to(dtype) - zp


def exact_matmul(a: Tensor, a_zp: int, b: Tensor, b_zp: int) -> Tensor:
    """(a - a_zp) @ (b - b_zp) of integer codes, exact, as float32 (float64 when a float32 sum
    could exceed 2**24). The largest |a - a_zp| and |b - b_zp| come from the code ranges."""
    k = a.shape[-1]
    lim = lambda t, z: max(z - (0 if t.dtype == torch.uint8 else -128), (255 if t.dtype == torch.uint8 else 127) - z)  # noqa: E731
    exact32 = k * lim(a, a_zp) * lim(b, b_zp) <= _F32_EXACT
    dt = torch.float32 if exact32 else torch.float64
    return torch.matmul(_shifted(a, a_zp, dt), _shifted(b, b_zp, dt)).to(torch.float32)


def int8_attention_math(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], q_scale: float, q_zp: int,
                        k_scale: float, k_zp: int, v_scale: float, v_zp: int, scale: float, p_scale: float,
                        p_zp: int, p_qmin: int, p_qmax: int, o_scale: float, o_zp: int, out_dtype: torch.dtype,
                        o_qmin: int, o_qmax: int) -> Tensor:
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    s = exact_matmul(q, q_zp, k.transpose(-2, -1), k_zp)
    s = s * f32(q_scale) * f32(k_scale)          # = dequantize(q) @ dequantize(k)^T, up to float32 rounding
    s = s * f32(scale)
    if mask is not None:
        s = s + mask.to(torch.float32)
    p = torch.softmax(s, dim=-1)
    p_codes = quantize_math(p, f32(p_scale), torch.tensor(p_zp), 0, 0, p_qmin, p_qmax, torch.uint8)
    o = exact_matmul(p_codes, p_zp, v, v_zp) * f32(p_scale) * f32(v_scale)
    if out_dtype in CODE_DTYPES:
        return quantize_math(o, f32(o_scale), torch.tensor(o_zp), 0, 0, o_qmin, o_qmax, out_dtype)
    return o.to(out_dtype)


@torch.library.custom_op("qcompile::int8_attention", mutates_args=())
def int8_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], q_scale: float, q_zp: int,
                   k_scale: float, k_zp: int, v_scale: float, v_zp: int, scale: float, p_scale: float, p_zp: int,
                   p_qmin: int, p_qmax: int, o_scale: float, o_zp: int, out_dtype: torch.dtype, o_qmin: int,
                   o_qmax: int) -> Tensor:
    """q [B, H, L, D], k and v [B, H, S, D] uint8/int8 codes; mask float, broadcastable to [B, H, L, S]."""
    return int8_attention_math(q, k, v, mask, q_scale, q_zp, k_scale, k_zp, v_scale, v_zp, scale, p_scale, p_zp,
                               p_qmin, p_qmax, o_scale, o_zp, out_dtype, o_qmin, o_qmax)


@int8_attention.register_fake
def _(q, k, v, mask, q_scale, q_zp, k_scale, k_zp, v_scale, v_zp, scale, p_scale, p_zp, p_qmin, p_qmax, o_scale,
      o_zp, out_dtype, o_qmin, o_qmax):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q, k, v must be [B, H, seq, D]")
    torch._check(all(t.dtype in CODE_DTYPES for t in (q, k, v)), lambda: "q, k, v must be int8/uint8 codes")
    torch._check(q.shape[-1] == k.shape[-1], lambda: "q and k disagree on the head dim")
    torch._check(k.shape[-2] == v.shape[-2], lambda: "k and v disagree on the key length")
    if "torch._inductor.lowering" in sys.modules:   # being compiled: make inductor know the fused kernel
        register_inductor_lowering()
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=out_dtype)


# ---------------------------------------------------------------- inductor: torchao's INT8 SDPA template

_registered = False


def amx_available() -> bool:
    fn = getattr(torch._C._cpu, "_is_amx_tile_supported", None) or getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(fn and fn())


def fused_kernel_available() -> str | None:
    """None when inductor can lower int8_attention to torchao's fused template here, else why not."""
    if not amx_available():
        return "this CPU has no AMX tiles (torchao's INT8 SDPA template needs them)"
    try:
        import torchao.prototype.inductor.qsdpa_lowering  # noqa: F401
    except Exception as e:   # noqa: BLE001  (torchao absent or incompatible)
        return f"torchao's INT8 SDPA template is not importable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    return None


def template_fits(q_dtype, k_dtype, v_dtype, out_dtype, p_zp: int, p_qmin: int, p_qmax: int, o_qmin: int,
                  o_qmax: int) -> str | None:
    """None when the template computes this instance: uint8 everywhere, full uint8 ranges."""
    if not all(d == torch.uint8 for d in (q_dtype, k_dtype, v_dtype)):
        return f"codes are {q_dtype}/{k_dtype}/{v_dtype}; the template takes uint8 q, k and v"
    if out_dtype != torch.uint8 or (o_qmin, o_qmax) != (0, 255):
        return f"output is {out_dtype} [{o_qmin}, {o_qmax}]; the template writes full-range uint8 codes"
    if (p_qmin, p_qmax) != (0, 255):
        return f"P codes span [{p_qmin}, {p_qmax}]; the template writes full-range uint8"
    return None


def _last_dim_dense(x, broadcast_ok: bool = False):
    """`x` (an inductor IR node) realized with stride 1 in its last dim (0 too for a broadcast
    mask), copied only when it has another. torchao's template takes the B / H / seq strides of
    its operands but reads the head dim (and the mask's key dim) as contiguous: K handed over as
    the transpose of the K^T codes, the layout inductor picks for a quantized K^T edge, has a head
    dim stride of S and gave wrong outputs (up to the whole output range; tests/test_targets.py)."""
    from torch._inductor.ir import ExternKernel, get_stride_order

    x = ExternKernel.realize_input(x)
    strides = x.get_stride()
    if strides[-1] == 1 or broadcast_ok and strides[-1] == 0:
        return ExternKernel.require_stride_order(x, get_stride_order(strides))   # fixes a flexible layout as it is
    return ExternKernel.require_contiguous(x)


def register_inductor_lowering() -> bool:
    """Teach inductor to lower qcompile::int8_attention to torchao's template (idempotent).
    Returns whether the fused kernel is in use on this machine."""
    global _registered
    if _registered:
        return True
    if fused_kernel_available() is not None:
        return False
    from torch._inductor.lowering import fallback_handler, lowerings, register_lowering

    torchao_op = torch.ops.torchao.qscaled_dot_product.default
    op = torch.ops.qcompile.int8_attention.default
    fallback = fallback_handler(op, add_to_fallback_set=False)

    @register_lowering(op, type_promotion_kind=None)
    def _lower(q, k, v, mask, q_scale, q_zp, k_scale, k_zp, v_scale, v_zp, scale, p_scale, p_zp, p_qmin, p_qmax,
               o_scale, o_zp, out_dtype, o_qmin, o_qmax):
        if template_fits(q.get_dtype(), k.get_dtype(), v.get_dtype(), out_dtype, p_zp, p_qmin, p_qmax,
                         o_qmin, o_qmax) is None:
            q, k, v = (_last_dim_dense(t) for t in (q, k, v))
            if mask is not None:
                mask = _last_dim_dense(mask, broadcast_ok=True)
            return lowerings[torchao_op](q, k, v, mask, 0.0, False, scale, q_scale, q_zp, k_scale, k_zp,
                                         v_scale, v_zp, p_scale, p_zp, o_scale, o_zp)
        return fallback(q, k, v, mask, q_scale, q_zp, k_scale, k_zp, v_scale, v_zp, scale, p_scale, p_zp, p_qmin,
                        p_qmax, o_scale, o_zp, out_dtype, o_qmin, o_qmax)

    _registered = True
    return True
