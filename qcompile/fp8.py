"""FP8 (E4M3 / E5M2) arithmetic: saturating casts, per-tensor scales, fake-quant with delayed scaling.

Design section 4: E4M3 (finite max 448) and E5M2 (max 57344), saturating casts, s = amax / fmax.

- `fp8_round(x, fmt)` returns float32 values on the FP8 grid: |x| is clamped to fmax first (so
  +-inf saturate to +-fmax, NaN stays NaN), then rounded to nearest, ties to even, with gradual
  underflow below the smallest normal. It is written with float32 arithmetic only (frexp, an exact
  division by a power of two, round-half-even), so it runs wherever float32 does and needs no FP8
  dtype; the tests check it bit for bit against `torch.float8_e4m3fn` / `torch.float8_e5m2`.
- `fp8_encode` / `fp8_decode` move between those values and the 8-bit codes (sign, exponent, mantissa).
- `fp8_fake_quant(x, scale, fmt)` = fp8_round(x / s) * s, with a straight-through gradient that is zero
  where x / s saturated.
- `DelayedScalingFakeQuant` is the training-time module: the scale of step t comes from the amax history
  of the steps before t (delayed scaling, as in NVIDIA Transformer Engine), and an optional second
  format fake-quantizes the gradient flowing back (E5M2 for gradients, E4M3 forward).

Inputs are taken as float32 (float16 and bfloat16 convert exactly); a float64 input is rounded to
float32 first, which can differ from a direct float64 -> FP8 rounding on rare double-rounding ties.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import RecipeError


@dataclass(frozen=True)
class Fp8Format:
    name: str
    mbits: int           # stored mantissa bits
    bias: int            # exponent bias
    fmax: float          # largest finite value
    min_exp: int         # exponent of the smallest normal number
    torch_dtype: torch.dtype
    nan_code: int        # the code this library writes for NaN (sign bit added for negative NaN)


E4M3 = Fp8Format("e4m3", mbits=3, bias=7, fmax=448.0, min_exp=-6, torch_dtype=torch.float8_e4m3fn, nan_code=0x7F)
E5M2 = Fp8Format("e5m2", mbits=2, bias=15, fmax=57344.0, min_exp=-14, torch_dtype=torch.float8_e5m2, nan_code=0x7F)
FORMATS = {"e4m3": E4M3, "e5m2": E5M2}


def fp8_format(fmt: "str | Fp8Format") -> Fp8Format:
    if isinstance(fmt, Fp8Format):
        return fmt
    try:
        return FORMATS[fmt]
    except KeyError:
        raise RecipeError(f"unknown FP8 format {fmt!r}; use one of {sorted(FORMATS)}") from None


def fp8_round(x: Tensor, fmt: "str | Fp8Format" = "e4m3") -> Tensor:
    """Saturating round-to-nearest-even of `x` onto the FP8 grid; float32 values out."""
    f = fp8_format(fmt)
    x32 = x.float()
    a = x32.abs().clamp(max=f.fmax)                     # saturate first: inf -> fmax, NaN stays NaN
    _, e = torch.frexp(a)                               # a = m * 2**e with m in [0.5, 1)
    exp = (e - 1).clamp(min=f.min_exp)                  # below the smallest normal the grid is uniform
    step = torch.ldexp(torch.ones_like(a), exp - f.mbits)
    q = torch.round(a / step) * step                    # a / step is exact: step is a power of two
    return torch.copysign(q, x32)                       # keeps -0.0 and the sign of NaN


def fp8_encode(x: Tensor, fmt: "str | Fp8Format" = "e4m3") -> Tensor:
    """The uint8 codes of the saturating cast of `x` (bit layout of torch's float8 dtypes)."""
    f = fp8_format(fmt)
    q = fp8_round(x, f)
    a = q.abs()
    _, e = torch.frexp(a)
    exp = e - 1
    normal = a >= 2.0 ** f.min_exp
    exp_field = torch.where(normal, exp + f.bias, torch.zeros_like(exp))
    unit = torch.ldexp(torch.ones_like(a), torch.where(normal, exp, torch.full_like(exp, f.min_exp)) - f.mbits)
    mant = (a / unit).to(torch.int32) - torch.where(normal, 1 << f.mbits, 0)
    code = (exp_field.to(torch.int32) << f.mbits) | mant
    code = torch.where(torch.isnan(q), torch.full_like(code, f.nan_code), code)
    code = code | (torch.signbit(q).to(torch.int32) << 7)
    return code.to(torch.uint8)


def fp8_decode(codes: Tensor, fmt: "str | Fp8Format" = "e4m3") -> Tensor:
    """float32 values of uint8 FP8 codes."""
    f = fp8_format(fmt)
    c = codes.to(torch.int32)
    sign = torch.where((c >> 7) == 1, -1.0, 1.0)
    exp_field = (c >> f.mbits) & ((1 << (7 - f.mbits)) - 1)
    mant = (c & ((1 << f.mbits) - 1)).float()
    normal = exp_field > 0
    exp = torch.where(normal, exp_field - f.bias, torch.full_like(exp_field, f.min_exp))
    value = torch.ldexp(torch.where(normal, mant + (1 << f.mbits), mant), exp - f.mbits)
    max_field = (1 << (7 - f.mbits)) - 1
    if f is E4M3:   # e4m3fn: no infinities, only S.1111.111 is NaN
        nan = (exp_field == max_field) & (mant == (1 << f.mbits) - 1)
        inf = torch.zeros_like(nan)
    else:           # IEEE-like: all-ones exponent is inf (mantissa 0) or NaN
        nan = (exp_field == max_field) & (mant != 0)
        inf = (exp_field == max_field) & (mant == 0)
    value = torch.where(inf, torch.full_like(value, float("inf")), value)
    value = torch.where(nan, torch.full_like(value, float("nan")), value)
    return sign * value


def fp8_scale(amax: Tensor, fmt: "str | Fp8Format" = "e4m3") -> Tensor:
    """Per-tensor scale s = amax / fmax (float32). A zero or non-finite amax gives s = 1.0: finite,
    positive, and a zero tensor still fake-quantizes to zeros."""
    f = fp8_format(fmt)
    amax = torch.as_tensor(amax, dtype=torch.float32)
    ok = torch.isfinite(amax) & (amax > 0)
    return torch.where(ok, amax / f.fmax, torch.ones_like(amax))


class _FakeQuantFp8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, fmt_name):
        f = FORMATS[fmt_name]
        scaled = x.float() / scale
        ctx.save_for_backward(scaled.abs() <= f.fmax)
        return (fp8_round(scaled, f) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None   # straight-through, zero where the cast saturated


def fp8_fake_quant(x: Tensor, scale: Tensor, fmt: "str | Fp8Format" = "e4m3") -> Tensor:
    """dequantize(quantize(x)) through FP8 with a per-tensor scale; the output keeps x's dtype."""
    return _FakeQuantFp8.apply(x, scale, fp8_format(fmt).name)


class _GradFakeQuant(torch.autograd.Function):
    """Identity forward; the backward fake-quantizes the incoming gradient with the owner's scale."""

    @staticmethod
    def forward(ctx, x, owner):
        ctx.owner = owner
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.owner._quantize_grad(grad), None


class DelayedScalingFakeQuant(nn.Module):
    """FP8 fake-quant with delayed scaling: step t uses s = max(amax history of steps < t) / fmax.

    The history (length `history_len`) is updated on every call while `update_history` is True (in
    training and calibration); the first call, with an empty history, uses its own amax. With
    `grad_fmt` ("e5m2" for gradients) the gradient flowing back through this point is fake-quantized
    too, with its own delayed-scaling history.
    """

    def __init__(self, fmt: str = "e4m3", history_len: int = 16, grad_fmt: str | None = None):
        super().__init__()
        if history_len < 1:
            raise RecipeError(f"history_len must be at least 1, got {history_len}")
        self.fmt = fp8_format(fmt).name
        self.grad_fmt = fp8_format(grad_fmt).name if grad_fmt else None
        self.update_history = True
        self.register_buffer("amax_history", torch.zeros(history_len))
        self.register_buffer("grad_amax_history", torch.zeros(history_len))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("grad_steps", torch.zeros((), dtype=torch.int64))

    def scale(self) -> Tensor:
        return fp8_scale(self.amax_history.max(), self.fmt)

    def forward(self, x: Tensor) -> Tensor:
        amax = x.detach().abs().amax().float()
        scale = self.scale() if self.steps > 0 else fp8_scale(amax, self.fmt)
        if self.update_history:
            _push(self.amax_history, amax)
            self.steps += 1
        y = fp8_fake_quant(x, scale, self.fmt)
        if self.grad_fmt is not None and torch.is_grad_enabled() and y.requires_grad:
            y = _GradFakeQuant.apply(y, self)
        return y

    def _quantize_grad(self, grad: Tensor) -> Tensor:
        amax = grad.detach().abs().amax().float()
        hist = self.grad_amax_history
        scale = fp8_scale(hist.max(), self.grad_fmt) if self.grad_steps > 0 else fp8_scale(amax, self.grad_fmt)
        if self.update_history:
            _push(hist, amax)
            self.grad_steps += 1
        with torch.no_grad():
            return (fp8_round(grad.float() / scale, self.grad_fmt) * scale).to(grad.dtype)

    def extra_repr(self) -> str:
        grad = f", grad_fmt={self.grad_fmt}" if self.grad_fmt else ""
        return f"fmt={self.fmt}, history_len={self.amax_history.numel()}{grad}"


class CurrentScalingFakeQuant(nn.Module):
    """FP8 fake-quant of a tensor with its own amax (s = amax(x) / fmax at every call): for weights
    in QAT, whose values are known when they are used, so no history is needed."""

    def __init__(self, fmt: str = "e4m3"):
        super().__init__()
        self.fmt = fp8_format(fmt).name

    def forward(self, x: Tensor) -> Tensor:
        return fp8_fake_quant(x, fp8_scale(x.detach().abs().amax().float(), self.fmt), self.fmt)

    def extra_repr(self) -> str:
        return f"fmt={self.fmt}"


@torch.no_grad()
def _push(history: Tensor, value: Tensor) -> None:
    history.copy_(torch.roll(history, 1))
    history[0] = value
