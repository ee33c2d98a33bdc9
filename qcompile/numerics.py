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

ggml's block formats (GGUF) add, per QuantSpec (spec.py):
- roundings that multiply by id = 1/s (id = 0 when s = 0, so an all-zero block has scale 0 and zero
  codes): "half_away" q = roundf(x * id) (Q8_0), "half_up" q = trunc(x * id + 0.5 - qmin) + qmin
  (Q4_0, Q4_1), each product and sum rounded to float32 as gguf-py's numpy quantizers do;
- the scale rule "signed_amax": s = m / qmin, m the first element of largest magnitude (Q4_0: m / -8);
- float zero points: an offset m with q * s + m, m the range minimum (Q4_1); the zero point tensor's
  dtype says which: integer -> (q - z) * s, floating -> q * s + m;
- float16 scales: rounded to float16 before the codes are chosen (fp16-first), or after
  (`fp16_first=False`: ggml's order, its codes bit for bit); `stored_qparams` gives what is stored.

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


RECIPROCAL_ROUNDINGS = ("half_away", "half_up")


def round_half_away(x: Tensor) -> Tensor:
    """C's roundf (half away from zero), in gguf-py's form: floor(|x|) + floor(2 (|x| - floor|x|)), exact
    in float32 (floor(|x| + 0.5) is not: 0.49999997 + 0.5 rounds up to 1)."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def quantize_math(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, block_size: int,
                  qmin: int, qmax: int, dtype: torch.dtype, rounding: str = "nearest") -> Tensor:
    """Codes of x (see the module doc). `rounding`: "nearest" (x / s, half to even), or ggml's
    "half_away" / "half_up" (x * (1/s)). A floating `zero_point` is an offset m: x - m is quantized."""
    z = broadcast_param(zero_point.float(), x, axis, block_size)
    offset = zero_point.is_floating_point()
    v = x.float() - z if offset else x.float()
    z = 0.0 if offset else z
    if rounding == "nearest":
        s = broadcast_param(scale.float(), x, axis, block_size)
        scaled = torch.nan_to_num(v / s, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
        if dtype.is_floating_point and dtype.itemsize == 1:  # fp8 codes: saturate at the format's max, the cast rounds half to even
            return torch.clamp(scaled + z, qmin, qmax).to(dtype)
        return torch.clamp(torch.round(scaled) + z, qmin, qmax).to(dtype)
    scale = scale.float()  # 1/s on the compact scale, then broadcast: elementwise the same, far cheaper
    inv = broadcast_param(torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale), x, axis, block_size)
    scaled = torch.nan_to_num(v * inv, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    if rounding == "half_away":
        q = round_half_away(scaled) + z
    elif rounding == "half_up":
        # ggml: (int8_t)(x * id + 8.5f), one float32 rounding for the product and one for the sum
        q = torch.trunc(scaled + (z + (0.5 - qmin))) + qmin
    else:
        raise ValueError(f"unknown rounding {rounding!r}")
    return torch.clamp(q, qmin, qmax).to(dtype)


def signed_amax(x: Tensor, dim: int = -1) -> Tensor:
    """The element of largest magnitude along `dim`, sign kept; the first one on ties (ggml, numpy argmax)."""
    idx = x.abs().argmax(dim=dim, keepdim=True)
    return x.gather(dim, idx).squeeze(dim)


def _round_scale(t: Tensor, scale_dtype: str) -> Tensor:
    return t.half().float() if scale_dtype == "float16" else t.float()


def qparams_for_range(min_val: Tensor, max_val: Tensor, spec) -> tuple[Tensor, Tensor]:
    """Scale and zero point of a range under a QuantSpec's rules: its symmetric / scale_rule /
    zero_point_domain, its float16 scales (rounded here when `fp16_first`; see `stored_qparams`
    otherwise). For "signed_amax", m is min_val where |min_val| > |max_val|, else max_val (pass
    m, m to choose a particular element). The ggml roundings keep a zero scale for an all-zero
    range (their codes are then 0, as ggml's); the others get float32 eps, as `choose_qparams`."""
    qmin, qmax = spec.qmin, spec.qmax
    lo, hi = min_val.float(), max_val.float()
    if spec.symmetric and spec.scale_rule == "signed_amax":
        scale = torch.where(lo.abs() > hi.abs(), lo, hi) / float(qmin)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    elif spec.symmetric:
        scale = torch.maximum(-torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)) / float(qmax)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    elif spec.zero_point_domain == "float":
        scale, zero_point = (hi - lo) / float(qmax - qmin), lo.clone()
    else:
        scale, zero_point = None, None
    if spec.scale_dtype == "float16" and spec.fp16_first:
        if scale is not None:
            scale = _round_scale(scale, "float16")
        if zero_point is not None and zero_point.is_floating_point():
            zero_point = _round_scale(zero_point, "float16")
    if scale is None:  # integer zero point: the range that includes 0 (rounded scale first, then z)
        min_neg, max_pos = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        scale = (max_pos - min_neg) / float(qmax - qmin)
        if spec.scale_dtype == "float16" and spec.fp16_first:
            scale = _round_scale(scale, "float16")
        scale = torch.where(scale > SCALE_EPS, scale, torch.full_like(scale, SCALE_EPS))
        zero_point = (qmin - torch.round(min_neg / scale)).clamp(qmin, qmax).to(torch.int32)
        return scale, zero_point
    if spec.rounding not in RECIPROCAL_ROUNDINGS:
        scale = torch.where(scale.abs() > SCALE_EPS, scale, torch.full_like(scale, SCALE_EPS))
    return scale, zero_point


def stored_qparams(scale: Tensor, zero_point: Tensor, spec) -> tuple[Tensor, Tensor]:
    """The scale and zero point as the spec stores them (float16 values for GGUF formats), float32
    tensors holding those values; a no-op when `qparams_for_range` already rounded them."""
    if spec.scale_dtype != "float16":
        return scale, zero_point
    if zero_point.is_floating_point():
        zero_point = _round_scale(zero_point, "float16")
    return _round_scale(scale, "float16"), zero_point


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
    if zero_point.is_floating_point():  # an offset: q * s + m, as ggml's Q4_1 (two float32 roundings)
        return (q.float() * s + z).to(out_dtype)
    return ((q.float() - z) * s).to(out_dtype)


WEIGHT_ELEMENTS = 1 << 20   # values per chunk of a weight's (de)quantization: 4 MB float32 temporaries


def _param_rows(p: Tensor, x: Tensor, axis: int, rows: slice) -> Tensor | None:
    """The part of a scale or zero point that goes with x[rows], or None if the layout has none (a
    per-channel or blocked parameter along dim 0 with blocks of more than one row)."""
    if p.numel() == 1:
        return p
    along_rows = axis % x.ndim == 0
    if p.ndim == 1:
        return p[rows] if along_rows else p
    if p.ndim == x.ndim and p.shape[0] == x.shape[0]:
        return p[rows]
    return None


def _by_rows(fn, x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, out_dtype: torch.dtype,
             rows: int | None, out: Tensor | None = None) -> Tensor:
    """fn(x, scale, zero_point) applied `rows` rows of x at a time (None: WEIGHT_ELEMENTS values),
    into one output: the arithmetic is elementwise, so the result is the same, element for element,
    as one call; what changes is that its float32 temporaries (broadcast qparams, quotients) are a
    chunk's, not x's size (a 2048 x 5632 down_proj's were 46 MB each, at a block's convert peak).
    `out`: written there (cast to its dtype, as `.to` casts), e.g. over the tensor the values replace."""
    if rows is None:
        rows = max(1, WEIGHT_ELEMENTS // max(1, x[0].numel())) if x.ndim else 1
    if x.ndim == 0 or x.shape[0] <= rows or _param_rows(scale, x, axis, slice(0, 1)) is None \
            or _param_rows(zero_point, x, axis, slice(0, 1)) is None:
        return fn(x, scale, zero_point) if out is None else out.copy_(fn(x, scale, zero_point))
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype)
    for r0 in range(0, x.shape[0], rows):
        part = slice(r0, r0 + rows)
        out[part] = fn(x[part], _param_rows(scale, x, axis, part), _param_rows(zero_point, x, axis, part))
    return out


def quantize_weight(w: Tensor, scale: Tensor, zero_point: Tensor, axis: int, block_size: int, qmin: int,
                    qmax: int, dtype: torch.dtype, rounding: str = "nearest", rows: int | None = None) -> Tensor:
    """`quantize_math` of a weight, a chunk of rows at a time (same codes, bounded temporaries: the
    passes that rewrite an lm_head's weight no longer hold several copies of it at once)."""
    return _by_rows(lambda x, s, z: quantize_math(x, s, z, axis, block_size, qmin, qmax, dtype, rounding),
                    w, scale, zero_point, axis, dtype, rows)


def dequantize_weight(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int, block_size: int,
                      out_dtype: torch.dtype, rows: int | None = None, out: Tensor | None = None) -> Tensor:
    """`dequantize_math` of a weight's codes, a chunk of rows at a time (same values), into `out`
    when given (each chunk cast from `out_dtype` to its dtype)."""
    return _by_rows(lambda x, s, z: dequantize_math(x, s, z, axis, block_size, out_dtype),
                    q, scale, zero_point, axis, out_dtype, rows, out)


def per_token_qparams_math(x: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """Symmetric per-row (last dim) qparams, shaped [..., 1] for the blocked layout."""
    amax = x.detach().float().abs().amax(dim=-1, keepdim=True)
    return choose_qparams(-amax, amax, qmin, qmax, symmetric=True)


def per_block_qparams_math(x: Tensor, block_size: int, qmin: int, qmax: int, fp16_scale: bool,
                           fp16_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric qparams per block of `block_size` along the last dim (the last block padded with zeros),
    shaped [..., ceil(K / block)] for the blocked layout: (scale the codes are chosen with, scale
    stored and dequantized with, zero point). llama.cpp's activation quantization (Q8_0 blocks of 32:
    d = amax / 127 in float32, codes from it, d stored as float16) is `fp16_scale=True, fp16_first=False`:
    the two scales differ by the float16 rounding, which moves codes by one on ~0.5% of elements if ignored."""
    xf = x.detach().float()
    k = xf.shape[-1]
    pad = (-k) % block_size
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    amax = xf.reshape(*xf.shape[:-1], -1, block_size).abs().amax(dim=-1)
    scale, zero_point = choose_qparams(-amax, amax, qmin, qmax, symmetric=True)
    stored = scale.half().float() if fp16_scale else scale
    if fp16_scale and fp16_first:
        scale = stored
    return scale, stored, zero_point


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


@torch.library.custom_op("qcompile::choose_qparams_per_block", mutates_args=())
def choose_qparams_per_block(x: Tensor, block_size: int, qmin: int, qmax: int, fp16_scale: bool,
                             fp16_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    return per_block_qparams_math(x, block_size, qmin, qmax, fp16_scale, fp16_first)


@choose_qparams_per_block.register_fake
def _(x, block_size, qmin, qmax, fp16_scale, fp16_first):
    shape = (*x.shape[:-1], -(-x.shape[-1] // block_size))
    return (x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32),
            x.new_empty(shape, dtype=torch.int32))


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
