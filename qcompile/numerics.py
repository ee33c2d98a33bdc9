"""The quantization arithmetic, and the custom ops that carry it through graphs.

This is the only place the numerics contract (design section 4) lives:

- quantize:   q = clamp(round_half_to_even(x / s) + z, qmin, qmax), in float32, dividing by s as
  ONNX QuantizeLinear does (multiplying by 1/s rounds differently on ties).
  NaN policy: NaN quantizes to the zero point (it dequantizes to 0.0); +-inf saturate.
- dequantize: (q - z) * s, in float32.
- fp8 codes (a float8 storage dtype, zero point 0): clamp(x / s, -fmax, fmax) cast to the format
  (round to nearest, ties to even; fp8.py's fp8_round is the same rounding, tested bit for bit).
- qparams: asymmetric s = (max(xmax,0) - min(xmin,0)) / (qmax - qmin), z = qmin - round(min(xmin,0)/s),
  so 0.0 is exact; symmetric s = max(|xmin|, |xmax|) / qmax, z = 0. A degenerate range gives
  s = float32 eps, finite and positive.

Scale layouts (the ONNX ones): a 0-d scale is per tensor; a 1-D scale with `axis` is per channel;
a scale with the same rank as x is blocked along `axis` with `block_size` elements per block
(per group along K for weights; per token is a block of the whole last dim).
"""
from __future__ import annotations

import torch
from torch import Tensor

SCALE_EPS = torch.finfo(torch.float32).eps

_INT_DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "int4": torch.int8, "uint4": torch.uint8,
               "int3": torch.int8, "int2": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}


def storage_dtype(dtype_name: str) -> torch.dtype:
    """Tensor dtype holding codes of a quantized dtype (int4 codes live one per int8, fp8 codes as
    torch.float8_e4m3fn)."""
    return _INT_DTYPES[dtype_name]


def choose_qparams(min_val: Tensor, max_val: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int32) for a range; elementwise over per-channel ranges."""
    min_neg = torch.clamp(min_val.float(), max=0.0)
    max_pos = torch.clamp(max_val.float(), min=0.0)
    if symmetric:
        amax = torch.maximum(-min_neg, max_pos)
        scale = amax / float(qmax)
        scale = torch.where(scale > SCALE_EPS, scale, torch.full_like(scale, SCALE_EPS))
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (max_pos - min_neg) / float(qmax - qmin)
        scale = torch.where(scale > SCALE_EPS, scale, torch.full_like(scale, SCALE_EPS))
        zero_point = (qmin - torch.round(min_neg / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def broadcast_param(p: Tensor, x: Tensor, axis: int, block_size: int) -> Tensor:
    """Expand a scale or zero point to broadcast against x, per the layouts in the module doc."""
    if p.numel() == 1:  # one value broadcasts alike in every layout
        return p.reshape(())
    axis = axis % x.ndim
    if p.ndim == x.ndim:  # blocked
        if p.shape[axis] != x.shape[axis]:
            p = p.repeat_interleave(block_size, dim=axis).narrow(axis, 0, x.shape[axis])
        return p
    if p.ndim == 1:  # per channel
        shape = [1] * x.ndim
        shape[axis] = -1
        return p.reshape(shape)
    raise ValueError(f"scale of shape {tuple(p.shape)} does not fit input of shape {tuple(x.shape)} on axis {axis}")


def quantize_math(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, block_size: int,
                  qmin: int, qmax: int, dtype: torch.dtype) -> Tensor:
    s = broadcast_param(scale.float(), x, axis, block_size)
    z = broadcast_param(zero_point.float(), x, axis, block_size)
    scaled = torch.nan_to_num(x.float() / s, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    if dtype.is_floating_point and dtype.itemsize == 1:  # fp8 codes: saturate at the format's max, the cast rounds half to even
        return torch.clamp(scaled + z, qmin, qmax).to(dtype)
    return torch.clamp(torch.round(scaled) + z, qmin, qmax).to(dtype)


def quantize_stochastic_math(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, block_size: int,
                             qmin: int, qmax: int, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    """quantize_math with stochastic rounding: floor(x / s + u), u ~ U[0, 1) from `generator`. A value
    rounds up with probability equal to its distance above the grid point below, so inside the
    range E[q] = x / s + z exactly (unbiased), unlike round-to-nearest. For weights, at convert."""
    s = broadcast_param(scale.float(), x, axis, block_size)
    z = broadcast_param(zero_point.float(), x, axis, block_size)
    scaled = torch.nan_to_num(x.float() / s, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    u = torch.rand(scaled.shape, generator=generator, dtype=torch.float32)
    return torch.clamp(torch.floor(scaled + u) + z, qmin, qmax).to(dtype)


def stochastic_generator(seed: int, key: str) -> torch.Generator:
    """A generator per (seed, tensor name): each weight gets its own reproducible noise."""
    import zlib

    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63))


def dequantize_math(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int, block_size: int,
                    out_dtype: torch.dtype) -> Tensor:
    s = broadcast_param(scale.float(), q, axis, block_size)
    z = broadcast_param(zero_point.float(), q, axis, block_size)
    return ((q.float() - z) * s).to(out_dtype)


def per_token_qparams_math(x: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """Symmetric per-row (last dim) qparams, shaped [..., 1] for the blocked layout."""
    amax = x.detach().float().abs().amax(dim=-1, keepdim=True)
    return choose_qparams(-amax, amax, qmin, qmax, symmetric=True)


# The ops below are opaque to torch.export / FX / ONNX export, so a QDQ graph can be exported
# again and translated op for op (the dynamo exporter would otherwise decompose them into
# Mul/Round/Clip: pytorch/pytorch#127167).

@torch.library.custom_op("qcompile::quantize", mutates_args=())
def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, block_size: int,
             qmin: int, qmax: int, dtype: torch.dtype) -> Tensor:
    return quantize_math(x, scale, zero_point, axis, block_size, qmin, qmax, dtype)


@quantize.register_fake
def _(x, scale, zero_point, axis, block_size, qmin, qmax, dtype):
    return torch.empty_like(x, dtype=dtype)


@torch.library.custom_op("qcompile::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int, block_size: int,
               out_dtype: torch.dtype) -> Tensor:
    return dequantize_math(q, scale, zero_point, axis, block_size, out_dtype)


@dequantize.register_fake
def _(q, scale, zero_point, axis, block_size, out_dtype):
    return torch.empty_like(q, dtype=out_dtype)


@torch.library.custom_op("qcompile::choose_qparams_per_token", mutates_args=())
def choose_qparams_per_token(x: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    return per_token_qparams_math(x, qmin, qmax)


@choose_qparams_per_token.register_fake
def _(x, qmin, qmax):
    shape = (*x.shape[:-1], 1)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.int32)


def pack_int4(q: Tensor) -> Tensor:
    """Pack int4/uint4 codes (held one per int8/uint8) two per byte along the last dim.

    Element 0 goes to the low nibble (ONNX int4 layout). An odd last dim is padded with 0.
    """
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    low = q[..., 0::2].to(torch.int32) & 0xF
    high = q[..., 1::2].to(torch.int32) & 0xF
    return (low | (high << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor, last_dim: int, signed: bool = True) -> Tensor:
    p = packed.to(torch.int32)
    nibbles = torch.stack([p & 0xF, (p >> 4) & 0xF], dim=-1).flatten(-2)[..., :last_dim]
    if signed:
        return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)
    return nibbles.to(torch.uint8)
