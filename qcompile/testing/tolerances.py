"""Tolerances for tests, stated in quantization steps and float roundoffs, in one place."""
from __future__ import annotations

import zlib

import torch

U32 = 2.0 ** -24   # float32 unit roundoff: |fl(v) - v| <= U32 * |v|
E64 = 2.0 ** -53   # float64 unit roundoff


def half_step(s, steps: int):
    """Bound on |x - dequantize(quantize(x))| for x in the range the qparams were chosen for: half a
    step of rounding, plus three float32 roundings, each at most U32 times a magnitude of <= `steps`
    steps (|x / s| is at most the grid's width): of s itself (which places the grid's ends), of
    x / s, and of (q - z) * s. 4 * U32 * steps covers the three."""
    return s * (0.5 + 4 * U32 * steps)


def seeded(*key) -> torch.Generator:
    """A generator seeded from a test's parameters, so each case has its own fixed data."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
