"""Observers: modules that watch a tensor during calibration and choose its quantization range.

An observer passes its input through unchanged. `calculate_qparams()` turns what it saw into a
(scale, zero_point) pair through numerics.qparams_for_range (the spec's rules). Weights do not need calibration data:
`weight_qparams` computes theirs straight from the tensor.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import distributed
from .errors import RecipeError
from .numerics import dequantize_math, qparams_for_range, quantize_math, signed_amax, stored_qparams
from .spec import PerChannel, PerGroup, PerTensor, QuantSpec, scale_layout


class Observer(nn.Module):
    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.register_buffer("num_batches", torch.tensor(0, dtype=torch.int64))
        # The raw range seen, kept for reports even when the chosen range is clipped.
        self.register_buffer("seen_min", torch.tensor(float("inf")))
        self.register_buffer("seen_max", torch.tensor(float("-inf")))

    @property
    def calibrated(self) -> bool:
        return int(self.num_batches) > 0

    def forward(self, x: Tensor) -> Tensor:
        # Under torch.distributed the batch is the global one (every rank's x at this step):
        # ranks skip together or observe together, so their collectives stay in step.
        if distributed.reduce_count(x.numel()) == 0:
            return x
        xd = x.detach().float()
        lo, hi = _range_or_empty(xd)
        lo, hi = all_reduce_range(lo, hi)
        self.seen_min = torch.minimum(self.seen_min, lo)
        self.seen_max = torch.maximum(self.seen_max, hi)
        self._observe(xd)
        self.num_batches += 1
        return x

    def _observe(self, x: Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[Tensor, Tensor]:
        """The (min, max) the qparams are computed from."""
        raise NotImplementedError

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:
        lo, hi = self.range()
        # one scale quantizes and dequantizes an activation: the stored one
        return stored_qparams(*qparams_for_range(lo, hi, self.spec), self.spec)

    def extra_repr(self) -> str:
        return f"{self.spec.dtype}, symmetric={self.spec.symmetric}, batches={int(self.num_batches)}"


def _channel_reduce(x: Tensor, axis: int, fn) -> Tensor:
    return fn(x.transpose(0, axis).reshape(x.shape[axis], -1), dim=1)


def _range_or_empty(x: Tensor) -> tuple[Tensor, Tensor]:
    """(min, max) of x; (+inf, -inf) for an empty x (another rank may hold this step's values)."""
    if x.numel() == 0:
        return torch.tensor(float("inf")), torch.tensor(float("-inf"))
    return x.min(), x.max()


def all_reduce_range(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Under torch.distributed (DDP QAT, distributed calibration), every rank observes the range of
    the whole global batch, so every rank ends with the same statistics and the same qparams."""
    return distributed.reduce_min(lo), distributed.reduce_max(hi)


class MinMaxObserver(Observer):
    def __init__(self, spec: QuantSpec):
        super().__init__(spec)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        g = self.spec.granularity
        if isinstance(g, PerChannel):
            if x.numel() == 0:  # this rank holds nothing at this step; the channel count still is known
                n = x.shape[g.axis]
                lo, hi = torch.full((n,), float("inf")), torch.full((n,), float("-inf"))
            else:
                lo, hi = _channel_reduce(x, g.axis, torch.amin), _channel_reduce(x, g.axis, torch.amax)
        else:
            lo, hi = _range_or_empty(x)
        return all_reduce_range(lo, hi)

    def _observe(self, x: Tensor) -> None:
        lo, hi = self._batch_range(x)
        if not self.calibrated:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)

    def range(self):
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(MinMaxObserver):
    def _observe(self, x: Tensor) -> None:
        lo, hi = self._batch_range(x)
        if not self.calibrated:
            self.min_val, self.max_val = lo, hi
        else:
            c = self.spec.averaging_constant
            self.min_val = self.min_val + c * (lo - self.min_val)
            self.max_val = self.max_val + c * (hi - self.max_val)


class HistogramObserver(Observer):
    """A per-tensor histogram over the range seen so far; the range is re-binned as it grows.

    mode "percentile" clips each tail at `spec.percentile`; mode "mse" searches the clipping
    range that minimizes the expected squared error (rounding s^2/12 inside, clipping outside).
    """

    bins = 2048

    def __init__(self, spec: QuantSpec, mode: str):
        super().__init__(spec)
        if not isinstance(spec.granularity, PerTensor):
            raise RecipeError(f"the {spec.observer} observer is per tensor; use minmax for {spec.granularity}")
        self.mode = mode
        self.register_buffer("histogram", torch.zeros(self.bins, dtype=torch.float64))
        self.register_buffer("lo", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("hi", torch.tensor(0.0, dtype=torch.float64))

    def _observe(self, x: Tensor) -> None:
        # Under torch.distributed: the range grows with the global batch's range, identically on
        # every rank, so all ranks share the bin edges and their counts add up to the histogram
        # one process would have built from the global batch.
        x = x[torch.isfinite(x)]
        lo, hi = all_reduce_range(*_range_or_empty(x))
        if not bool(torch.isfinite(lo)):   # no finite value on any rank
            return
        xmin, xmax = float(lo), float(hi)
        if not self.calibrated:
            hi = xmax if xmax > xmin else xmin + max(abs(xmin), 1.0) * 1e-6
            self.lo, self.hi = torch.tensor(xmin, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
        elif xmin < float(self.lo) or xmax > float(self.hi):
            self._rebin(min(xmin, float(self.lo)), max(xmax, float(self.hi)))
        counts = torch.histc(x.double(), self.bins, float(self.lo), float(self.hi))
        self.histogram += distributed.reduce_sum(counts)

    def _rebin(self, lo: float, hi: float) -> None:
        # Exact re-binning, as torch.ao's HistogramObserver does: grow the range by whole old bins
        # and make the new bin width an integer multiple k of the old one, so every old bin falls
        # entirely inside one new bin and percentiles stay within one new bin of the truth.
        old_lo, old_hi = float(self.lo), float(self.hi)
        width = (old_hi - old_lo) / self.bins
        below = math.ceil((old_lo - lo) / width) if lo < old_lo else 0
        above = math.ceil((hi - old_hi) / width) if hi > old_hi else 0
        k = math.ceil((self.bins + below + above) / self.bins)
        new_lo = old_lo - below * width
        idx = (torch.arange(self.bins) + below) // k
        self.histogram = torch.zeros_like(self.histogram).index_add_(0, idx, self.histogram)
        self.lo = torch.tensor(new_lo, dtype=torch.float64)
        self.hi = torch.tensor(new_lo + k * self.bins * width, dtype=torch.float64)

    def _centres(self) -> Tensor:
        width = (float(self.hi) - float(self.lo)) / self.bins
        return float(self.lo) + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)

    def range(self):
        if self.mode == "percentile":
            return self._percentile_range()
        return self._mse_range()

    def _percentile_range(self):
        cdf = torch.cumsum(self.histogram, 0) / self.histogram.sum()
        q = self.spec.percentile / 100.0
        edges = torch.linspace(float(self.lo), float(self.hi), self.bins + 1, dtype=torch.float64)
        lo_idx = int(torch.searchsorted(cdf, torch.tensor(1.0 - q, dtype=torch.float64)))
        hi_idx = int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64)))
        return edges[lo_idx].float(), edges[min(hi_idx + 1, self.bins)].float()

    def expected_error(self, lo: Tensor, hi: Tensor) -> Tensor:
        """Expected squared quantization error of candidate ranges (1-D tensors of equal length):
        clipping error of the mass outside [lo, hi] plus step^2/12 rounding error inside, from
        prefix sums of the histogram's moments, so each candidate costs O(log bins)."""
        c, n = self._centres(), self.histogram
        zero = torch.zeros(1, dtype=torch.float64)
        p0, p1, p2 = (torch.cat([zero, torch.cumsum(m, 0)]) for m in (n, n * c, n * c * c))
        lo, hi = lo.double().clamp(max=0.0), hi.double().clamp(min=0.0)
        if self.spec.symmetric:
            amax = torch.maximum(-lo, hi)
            lo, hi, step = -amax, amax, amax / self.spec.qmax
        else:
            step = (hi - lo) / (self.spec.qmax - self.spec.qmin)
        step = step.clamp(min=1e-12)
        i_lo = torch.searchsorted(c, lo)                 # bins entirely below lo: [0, i_lo)
        i_hi = torch.searchsorted(c, hi, right=True)     # bins above hi: [i_hi, bins)
        below = p2[i_lo] - 2 * lo * p1[i_lo] + lo * lo * p0[i_lo]
        a0, a1, a2 = p0[-1] - p0[i_hi], p1[-1] - p1[i_hi], p2[-1] - p2[i_hi]
        above = a2 - 2 * hi * a1 + hi * hi * a0
        inside = p0[i_hi] - p0[i_lo]
        return below + above + inside * step**2 / 12.0

    def _mse_range(self):
        # Coordinate descent over 256 candidate ends per side, two rounds: the error is close to
        # convex in each end, and two rounds settle on every histogram tried here.
        full_lo, full_hi = min(float(self.lo), 0.0), max(float(self.hi), 0.0)
        fractions = torch.linspace(0.02, 1.0, 256, dtype=torch.float64)
        best_lo, best_hi = torch.tensor(full_lo, dtype=torch.float64), torch.tensor(full_hi, dtype=torch.float64)
        for _ in range(2):
            his = fractions * full_hi
            best_hi = his[torch.argmin(self.expected_error(best_lo.expand_as(his), his))]
            los = fractions * full_lo
            best_lo = los[torch.argmin(self.expected_error(los, best_hi.expand_as(los)))]
        return best_lo.float(), best_hi.float()


class FixedRangeObserver(Observer):
    """A range known without data (`spec.fixed_range`): a softmax output lies in [0, 1], so its
    uint8 step is 1/255 whatever the calibration batches hold."""

    def __init__(self, spec: QuantSpec):
        super().__init__(spec)
        if not isinstance(spec.granularity, PerTensor):
            raise RecipeError(f"a fixed range is per tensor; got {spec.granularity}")

    def _observe(self, x: Tensor) -> None:
        pass

    def range(self):
        lo, hi = self.spec.fixed_range
        return torch.tensor(lo), torch.tensor(hi)


def make_observer(spec: QuantSpec) -> Observer:
    if spec.observer == "fixed":
        return FixedRangeObserver(spec)
    if spec.observer == "minmax":
        return MinMaxObserver(spec)
    if spec.observer == "moving_average":
        return MovingAverageMinMaxObserver(spec)
    return HistogramObserver(spec, mode=spec.observer)


def _grouped(w: Tensor, group: PerGroup) -> Tensor:
    """View a weight as [..., n_groups, group] along the group axis (padding with zeros)."""
    w = w.movedim(group.axis, -1)
    k = w.shape[-1]
    pad = (-k) % group.size
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(*w.shape[:-1], -1, group.size)


def weight_range(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """(min, max) of a weight in the layout of its scale (see numerics)."""
    w = w.detach().float()
    g = spec.granularity
    if isinstance(g, PerChannel):
        return _channel_reduce(w, g.axis, torch.amin), _channel_reduce(w, g.axis, torch.amax)
    if isinstance(g, PerGroup):
        grouped = _grouped(w, g)
        lo, hi = grouped.amin(-1), grouped.amax(-1)
        return lo.movedim(-1, g.axis), hi.movedim(-1, g.axis)
    return w.min(), w.max()



def weight_signed_amax(w: Tensor, spec: QuantSpec) -> Tensor:
    """The element of largest magnitude (sign kept, first on ties) in the layout of the weight's scale."""
    w = w.detach().float()
    g = spec.granularity
    if isinstance(g, PerChannel):
        return signed_amax(w.transpose(0, g.axis).reshape(w.shape[g.axis], -1), dim=1)
    if isinstance(g, PerGroup):
        return signed_amax(_grouped(w, g), dim=-1).movedim(-1, g.axis)
    return signed_amax(w.reshape(-1), dim=0)


def weight_qparams(w: Tensor, spec: QuantSpec, shrink_factors: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Scale and zero point of a weight under the spec's rules (numerics.qparams_for_range): the ones
    its codes are chosen with (`numerics.stored_qparams` gives the stored ones). With observer "mse"
    (or explicit `shrink_factors`), each channel/group's range is shrunk by the factor (default: in
    [0.5, 1]) that minimizes its own squared quantization error."""
    if spec.symmetric and spec.scale_rule == "signed_amax":
        lo = hi = weight_signed_amax(w, spec)  # the exact element, so ties resolve as ggml's
    else:
        lo, hi = weight_range(w, spec)
    scale, zp = qparams_for_range(lo, hi, spec)
    if spec.observer != "mse" and shrink_factors is None:
        return scale, zp
    axis, block = scale_layout(spec)
    best_err = None
    for factor in (torch.linspace(0.5, 1.0, 26) if shrink_factors is None else shrink_factors):
        s, z = qparams_for_range(lo * factor, hi * factor, spec)
        q = quantize_math(w, s, z, axis, block, spec.qmin, spec.qmax, torch.int32, spec.rounding)
        err = (dequantize_math(q, *stored_qparams(s, z, spec), axis, block, torch.float32) - w.float()) ** 2
        err = _error_in_scale_layout(err, spec)
        if best_err is None:
            best_err, scale, zp = err, s, z
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale, zp = torch.where(better, s, scale), torch.where(better, z, zp)
    return scale, zp


def _error_in_scale_layout(err: Tensor, spec: QuantSpec) -> Tensor:
    g = spec.granularity
    if isinstance(g, PerChannel):
        return _channel_reduce(err, g.axis, torch.sum)
    if isinstance(g, PerGroup):
        return _grouped(err, g).sum(-1).movedim(-1, g.axis)
    return err.sum()
