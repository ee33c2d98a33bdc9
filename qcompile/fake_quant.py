"""Fake quantization for quantization-aware training.

The forward pass computes exactly what the reference QDQ graph will compute (numerics.quantize_math
followed by dequantize_math, with the same qparams), so a QAT model in eval mode and the module
`convert` makes from it agree bit for bit. The backward pass is:

- the straight-through estimator for the input: d x_hat / d x = 1 where round(x/s) + z lies in
  [qmin, qmax] (boundaries included), 0 where the clamp saturates;
- LSQ (Esser et al., 2020) for a learned scale: d x_hat / d s = round(x/s) - x/s inside the range,
  qmin - z below it, qmax - z above it; and for a learned zero point (LSQ+): 0 inside, -s outside.
  Both are multiplied by LSQ's gradient scale g = 1 / sqrt(values_per_scale * qmax).

Modules: `FakeQuantize` (activations; wraps an observer and exposes the observer interface, so
convert_qdq reads it like one), `DynamicFakeQuantize` (per-token dynamic activations) and
`WeightFakeQuantize` (qparams from the current FP32 latent weight each step, or learned).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from .numerics import SCALE_EPS, broadcast_param, dequantize_math, per_token_qparams_math, quantize_math
from .observers import make_observer, weight_qparams
from .spec import QuantSpec, scale_layout



def _sum_to_param(grad: Tensor, param: Tensor, x: Tensor, axis: int, block: int) -> Tensor:
    """Sum a gradient the size of x down to the layout of a scale / zero point (adjoint of broadcast_param)."""
    if param.numel() == 1:
        return grad.sum().reshape(param.shape)
    axis = axis % x.ndim
    if param.ndim == x.ndim:  # blocked
        if param.shape[axis] == x.shape[axis]:
            return grad
        g = grad.movedim(axis, -1)
        g = nn.functional.pad(g, (0, (-g.shape[-1]) % block))
        return g.reshape(*g.shape[:-1], -1, block).sum(-1).movedim(-1, axis)
    return grad.sum(dim=[d for d in range(x.ndim) if d != axis])


class FakeQuantizeFunction(torch.autograd.Function):
    """x_hat = dequantize(quantize(x)); STE for x, LSQ for scale and zero point (see module doc)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, block: int,
                qmin: int, qmax: int, grad_factor: float) -> Tensor:
        xf = x.float()
        # the learned zero point is an integer held in float; numerics reads a floating zero point as
        # an offset m (ggml's Q4_1), so pass it as the integer it is
        z_int = torch.round(zero_point.detach()).to(torch.int32)
        q = quantize_math(xf, scale, z_int, axis, block, qmin, qmax, torch.float32)
        ctx.save_for_backward(xf, scale, zero_point)
        ctx.layout = (axis, block, qmin, qmax, grad_factor)
        return dequantize_math(q, scale, z_int, axis, block, torch.float32).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        xf, scale, zero_point = ctx.saved_tensors
        axis, block, qmin, qmax, grad_factor = ctx.layout
        s = broadcast_param(scale.float(), xf, axis, block)
        z = broadcast_param(zero_point.float(), xf, axis, block)
        v = xf / s
        rounded = torch.round(v)
        below, above = rounded + z < qmin, rounded + z > qmax
        inside = ~(below | above)
        g = grad_out.float()
        grad_x = (g * inside).to(grad_out.dtype)
        grad_s = grad_z = None
        if ctx.needs_input_grad[1]:
            d_s = torch.where(inside, rounded - v, torch.where(below, qmin - z, qmax - z))
            grad_s = _sum_to_param(g * d_s, scale, xf, axis, block).to(scale.dtype) * grad_factor
        if ctx.needs_input_grad[2]:
            d_z = torch.where(inside, torch.zeros_like(v), -s.expand_as(v))
            grad_z = _sum_to_param(g * d_z, zero_point, xf, axis, block).to(zero_point.dtype) * grad_factor
        return grad_x, grad_s, grad_z, None, None, None, None, None


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, block: int,
                  qmin: int, qmax: int, grad_factor: float = 1.0) -> Tensor:
    return FakeQuantizeFunction.apply(x, scale, zero_point, axis, block, qmin, qmax, grad_factor)


def lsq_grad_factor(values_per_scale: float, qmax: int) -> float:
    return 1.0 / math.sqrt(max(values_per_scale, 1.0) * max(qmax, 1))


class _RoundSTE(torch.autograd.Function):
    """round() in the forward pass, identity in the backward pass (for a learned zero point)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def _positive(scale: Tensor) -> Tensor:
    """A learned scale is kept positive and finite: |s| floored at the contract's minimum scale."""
    return scale.abs().clamp_min(SCALE_EPS)


class FakeQuantize(nn.Module):
    """Activation fake-quant for one sharing group: an observer plus the fake-quant op.

    The observer updates while the module is training (or inside `qc.calibrate`) until
    `freeze_observers`; with `learn_scale` the scale (and, asymmetric, the zero point) become
    parameters initialised from the observer on the first batch and trained by LSQ from then on.
    It exposes the observer interface (`calibrated`, `calculate_qparams`, `range`, `seen_min`,
    `seen_max`) so `convert` materializes it exactly as it would an observer."""

    def __init__(self, spec: QuantSpec, learn_scale: bool = False):
        super().__init__()
        self.spec, self.learn_scale = spec, learn_scale
        self.observer = make_observer(spec)
        self.register_buffer("observer_enabled", torch.tensor(True))
        self.register_buffer("fake_quant_enabled", torch.tensor(True))
        self.register_buffer("scale_initialized", torch.tensor(False))
        self.calibrating = False
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(1.0))
            self.zero_point = nn.Parameter(torch.tensor(0.0), requires_grad=not spec.symmetric)

    @property
    def calibrated(self) -> bool:
        return bool(self.scale_initialized) if self.learn_scale else self.observer.calibrated

    @property
    def seen_min(self) -> Tensor:
        return self.observer.seen_min

    @property
    def seen_max(self) -> Tensor:
        return self.observer.seen_max

    def _learned(self) -> tuple[Tensor, Tensor]:
        z = _RoundSTE.apply(self.zero_point).clamp(self.spec.qmin, self.spec.qmax)
        return _positive(self.scale), z

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:
        if self.learn_scale:
            s, z = self._learned()
            return s.detach().clone(), z.detach().to(torch.int32)
        return self.observer.calculate_qparams()

    def range(self) -> tuple[Tensor, Tensor]:
        if not self.learn_scale:
            return self.observer.range()
        s, z = self.calculate_qparams()
        return (self.spec.qmin - z) * s, (self.spec.qmax - z) * s

    def forward(self, x: Tensor) -> Tensor:
        observing = bool(self.observer_enabled) and (self.training or self.calibrating)
        if observing and not (self.learn_scale and bool(self.scale_initialized)):
            self.observer(x.detach())
            if self.learn_scale and self.observer.calibrated:
                s, z = self.observer.calculate_qparams()
                with torch.no_grad():
                    self.scale.copy_(s)
                    self.zero_point.copy_(z.float())
                self.scale_initialized.fill_(True)
        if not bool(self.fake_quant_enabled) or not self.calibrated:
            return x
        if self.learn_scale:
            s, z = self._learned()
            factor = lsq_grad_factor(x.numel(), self.spec.qmax)
        else:
            s, z = self.observer.calculate_qparams()
            factor = 1.0
        return fake_quantize(x, s, z, 0, 0, self.spec.qmin, self.spec.qmax, factor)

    def extra_repr(self) -> str:
        return (f"{self.spec.dtype}, symmetric={self.spec.symmetric}, learn_scale={self.learn_scale}, "
                f"observer_enabled={bool(self.observer_enabled)}")


class DynamicFakeQuantize(nn.Module):
    """Per-token dynamic fake-quant: qparams from each batch's rows, as choose_qparams_per_token."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.register_buffer("fake_quant_enabled", torch.tensor(True))

    def forward(self, x: Tensor) -> Tensor:
        if not bool(self.fake_quant_enabled):
            return x
        s, z = per_token_qparams_math(x.detach(), self.spec.qmin, self.spec.qmax)
        return fake_quantize(x, s, z, -1, int(x.shape[-1]), self.spec.qmin, self.spec.qmax)


class WeightFakeQuantize(nn.Module):
    """Weight fake-quant. Without `learn_scale`, the qparams come from the current latent weight
    every step through observers.weight_qparams, the function `convert` uses, so the converted
    weight codes are the ones the last forward pass saw. With `learn_scale`, scale (and zero
    point) start from the range of each channel/group shrunk to its MSE-optimal fraction (searched
    over (0, 1]: at 2-3 bits the min-max range rounds most weights to zero) and train by LSQ."""

    def __init__(self, spec: QuantSpec, weight: Tensor, learn_scale: bool = False):
        super().__init__()
        self.spec, self.learn_scale = spec, learn_scale
        self.register_buffer("fake_quant_enabled", torch.tensor(True))
        if learn_scale:
            s, z = weight_qparams(weight.detach(), spec, shrink_factors=torch.linspace(0.05, 1.0, 96))
            self.scale = nn.Parameter(s.clone())
            self.zero_point = nn.Parameter(z.float(), requires_grad=not spec.symmetric)

    def qparams(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """The (scale, int32 zero point) the forward pass uses for weight w, detached."""
        if self.learn_scale:
            z = torch.round(self.zero_point.detach()).clamp(self.spec.qmin, self.spec.qmax)
            return _positive(self.scale.detach()).clone(), z.to(torch.int32)
        return weight_qparams(w.detach(), self.spec)

    def forward(self, w: Tensor) -> Tensor:
        if not bool(self.fake_quant_enabled):
            return w
        axis, block = scale_layout(self.spec, w)
        if self.learn_scale:
            z = _RoundSTE.apply(self.zero_point).clamp(self.spec.qmin, self.spec.qmax)
            s = _positive(self.scale)
            factor = lsq_grad_factor(w.numel() / s.numel(), self.spec.qmax)
            return fake_quantize(w, s, z, axis, block, self.spec.qmin, self.spec.qmax, factor)
        s, z = weight_qparams(w.detach(), self.spec)
        return fake_quantize(w, s, z, axis, block, self.spec.qmin, self.spec.qmax)

    def extra_repr(self) -> str:
        return f"{self.spec.dtype}, {type(self.spec.granularity).__name__}, learn_scale={self.learn_scale}"


@contextlib.contextmanager
def calibrating(module: nn.Module):
    """Let every FakeQuantize observe while `qc.calibrate` runs batches through a QAT module."""
    fqs = [m for m in module.modules() if isinstance(m, FakeQuantize)]
    for m in fqs:
        m.calibrating = True
    try:
        yield
    finally:
        for m in fqs:
            m.calibrating = False
