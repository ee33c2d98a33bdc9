"""NF4 (QLoRA, Dettmers et al., 2023): 4-bit NormalFloat weights with double quantization.

- The 16 levels are the bitsandbytes/QLoRA table: quantiles of N(0, 1) scaled to [-1, 1], with an
  exact 0 (8 positive levels, 7 negative, plus zero).
- The flattened weight is cut into blocks of `block_size` (64) elements; each block is divided by
  its absmax and every element takes the code of its nearest level.
- Double quantization: the fp32 absmaxes minus their mean are quantized to int8 (symmetric,
  s = amax / 127) in blocks of `absmax_block` (256) absmaxes, one fp32 scale per block; the mean
  is kept as one fp32 offset. Element codes are chosen against the *decoded* absmax, the one the
  dequantizer will use, so the double quantization's error is not compounded.
- Codes pack two per byte, element 0 in the low nibble (the project's int4 layout).
A ragged tail (numel not a multiple of the blocks) is padded with zeros and cut off on decode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..numerics import choose_qparams, dequantize_math, pack_int4, quantize_math, unpack_int4

# bitsandbytes' NF4 table (functional.py, get_4bit_type("nf4")), as published with QLoRA.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
BLOCK_SIZE = 64
ABSMAX_BLOCK = 256


@dataclass
class NF4Tensor:
    """A weight in NF4 storage: what the reference graph holds as constants."""

    packed: Tensor          # uint8 [ceil(numel_padded / 2)]
    absmax_codes: Tensor    # int8 [n_blocks padded to a multiple of absmax_block]
    absmax_scale: Tensor    # float32 [n_absmax_blocks]
    absmax_mean: Tensor     # float32 []
    shape: tuple
    block_size: int = BLOCK_SIZE
    absmax_block: int = ABSMAX_BLOCK

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_nf4_math(self.packed, self.absmax_codes, self.absmax_scale, self.absmax_mean,
                                   list(self.shape), self.block_size, self.absmax_block, dtype)

    def dequantize_absmax(self) -> Tensor:
        """The per-block absmax the decoder uses (after double quantization), [n_blocks]."""
        n_blocks = -(-int(torch.Size(self.shape).numel()) // self.block_size)
        return dequantize_absmax(self.absmax_codes, self.absmax_scale, self.absmax_mean, self.absmax_block)[:n_blocks]

    def codes(self) -> Tensor:
        """Element codes 0..15, [numel] in the weight's flattened order."""
        numel = int(torch.Size(self.shape).numel())
        return unpack_int4(self.packed, 2 * self.packed.numel(), signed=False)[:numel]


def _pad_to(x: Tensor, multiple: int) -> Tensor:
    pad = (-x.numel()) % multiple
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def quantize_absmax(absmax: Tensor, absmax_block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Double quantization: (int8 codes of absmax - mean, fp32 scale per block, fp32 mean)."""
    mean = absmax.mean()
    centered = _pad_to(absmax - mean, absmax_block)
    amax = centered.reshape(-1, absmax_block).abs().amax(1)
    scale, zp = choose_qparams(-amax, amax, -128, 127, symmetric=True)
    codes = quantize_math(centered, scale, zp, 0, absmax_block, -128, 127, torch.int8)
    return codes, scale, mean


def dequantize_absmax(codes: Tensor, scale: Tensor, mean: Tensor, absmax_block: int) -> Tensor:
    zp = torch.zeros_like(scale, dtype=torch.int32)
    return dequantize_math(codes, scale, zp, 0, absmax_block, torch.float32) + mean.float()


def nearest_level(x: Tensor) -> Tensor:
    """Code (0..15, uint8) of the NF4 level nearest to each element of x (x in [-1, 1])."""
    mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
    # bucketize with right=False: a value exactly on a midpoint goes to the lower level
    return torch.bucketize(x.float().contiguous(), mids).to(torch.uint8)


def quantize_nf4(w: Tensor, block_size: int = BLOCK_SIZE, absmax_block: int = ABSMAX_BLOCK) -> NF4Tensor:
    flat = _pad_to(w.detach().float().flatten(), block_size)
    blocks = flat.reshape(-1, block_size)
    absmax = blocks.abs().amax(1)
    a_codes, a_scale, a_mean = quantize_absmax(absmax, absmax_block)
    decoded = dequantize_absmax(a_codes, a_scale, a_mean, absmax_block)[: blocks.shape[0]]
    # A small absmax in a block of large ones can decode to 0 or even below 0 (the int8 step is set
    # by the largest |absmax - mean|): dividing by the signed decoded value keeps the sign right
    # after decoding, and the error is then bounded by what the double quantization lost.
    safe = torch.where(decoded != 0, decoded, torch.ones_like(decoded))
    normalized = torch.where(decoded.unsqueeze(1) != 0, blocks / safe.unsqueeze(1), torch.zeros_like(blocks))
    codes = nearest_level(normalized).flatten()
    return NF4Tensor(pack_int4(codes), a_codes, a_scale, a_mean.reshape(()), tuple(w.shape), block_size, absmax_block)


def dequantize_nf4_math(packed: Tensor, absmax_codes: Tensor, absmax_scale: Tensor, absmax_mean: Tensor,
                        shape: list[int], block_size: int, absmax_block: int, out_dtype: torch.dtype) -> Tensor:
    numel = int(torch.Size(shape).numel())
    codes = unpack_int4(packed, 2 * packed.numel(), signed=False).long()
    n_blocks = -(-numel // block_size)
    absmax = dequantize_absmax(absmax_codes, absmax_scale, absmax_mean, absmax_block)[:n_blocks]
    values = NF4_LEVELS.to(packed.device)[codes[: n_blocks * block_size]].reshape(n_blocks, block_size)
    return (values * absmax.unsqueeze(1)).flatten()[:numel].reshape(shape).to(out_dtype)


@torch.library.custom_op("qcompile::dequantize_nf4", mutates_args=())
def dequantize_nf4(packed: Tensor, absmax_codes: Tensor, absmax_scale: Tensor, absmax_mean: Tensor,
                   shape: list[int], block_size: int, absmax_block: int, out_dtype: torch.dtype) -> Tensor:
    return dequantize_nf4_math(packed, absmax_codes, absmax_scale, absmax_mean, shape, block_size,
                               absmax_block, out_dtype)


@dequantize_nf4.register_fake
def _(packed, absmax_codes, absmax_scale, absmax_mean, shape, block_size, absmax_block, out_dtype):
    return packed.new_empty(shape, dtype=out_dtype)
