"""ggml's block formats: which QuantSpec each one stores exactly, and the bytes of its blocks.

A GGUF tensor of type Q8_0 / Q4_0 / Q4_1 is a sequence of blocks of 32 weights along a row (K):

| type | block (bytes) | weight |
|---|---|---|
| Q8_0 | fp16 d, 32 x int8 q | d * q |
| Q4_0 | fp16 d, 16 bytes: byte j = (q_j + 8) | (q_{j+16} + 8) << 4 | d * q, q in [-8, 7] |
| Q4_1 | fp16 d, fp16 m, 16 bytes as Q4_0 with q in [0, 15] | d * q + m |

The nibble order is ggml's (element j and j + 16 share a byte), not ONNX's (2j, 2j + 1): the other
order loads silently and computes garbage. Nothing here chooses a code: the codes and scales come
from the reference graph, and `encode` refuses any that the type does not hold bit for bit
(float32 scales that float16 rounds, zero points outside the format, rows that are not whole blocks).
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ...errors import GGUFExportError
from ...spec import PerChannel, PerGroup, QuantSpec

BLOCK = 32
QUANTIZED_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1)
RECIPE_HINT = "quantize with a gguf-* recipe (gguf-q8_0, gguf-q4_0, gguf-q4_1), whose specs are these formats"


def ggml_type(spec: QuantSpec, what: str) -> T:
    """The ggml type that stores weights quantized with `spec`, or GGUFExportError saying why none does."""
    if spec.dtype == "int8" and spec.symmetric:
        qtype = T.Q8_0
    elif spec.dtype == "int4" and spec.symmetric:
        qtype = T.Q4_0
    elif spec.dtype == "uint4" and not spec.symmetric and spec.zero_point_domain == "float":
        qtype = T.Q4_1
    elif spec.dtype == "uint4" and not spec.symmetric:
        raise GGUFExportError(f"{what}: asymmetric uint4 with an integer zero point is (q - z) * s; Q4_1 stores "
                              f"q * d + m with its own float16 m: {RECIPE_HINT}")
    else:
        raise GGUFExportError(f"{what}: {'symmetric' if spec.symmetric else 'asymmetric'} {spec.dtype} weights have "
                              f"no GGUF block type (Q8_0: symmetric int8, Q4_0: symmetric int4, Q4_1: uint4 with a "
                              f"float zero point); {RECIPE_HINT}")
    g = spec.granularity
    if not (isinstance(g, PerGroup) and g.axis in (-1, 1) and g.size % BLOCK == 0) and g != PerChannel(0):
        raise GGUFExportError(f"{what}: {qtype.name} has one scale per {BLOCK} weights along K; scales per "
                              f"{g} cannot be written as blocks ({RECIPE_HINT})")
    return qtype


def _block_params(p: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """A scale or zero point in the reference layout ([N], [N, K / g]) as one value per block [N, K / 32]."""
    p = p.detach().float().reshape(n, -1)
    per = k // BLOCK // p.shape[1] if k // BLOCK % p.shape[1] == 0 else 0
    if per == 0:
        raise GGUFExportError(f"{p.shape[1]} scales per row do not divide {k // BLOCK} blocks of {BLOCK}")
    return p.repeat_interleave(per, dim=1)


def _fp16_exact(p: torch.Tensor, what: str, name: str) -> np.ndarray:
    half = p.half()
    bad = ~((half.float() == p) | (torch.isnan(p) & torch.isnan(half.float())))
    if bool(bad.any()):
        raise GGUFExportError(f"{what}: {int(bad.sum())} of {p.numel()} {name}s are not float16 values (e.g. "
                              f"{float(p[bad][0]):.9g}); GGUF stores them in float16, so the file would not "
                              f"decode to the reference weights: {RECIPE_HINT} (QuantSpec(scale_dtype='float16'))")
    return half.numpy()


def encode(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qtype: T, what: str) -> np.ndarray:
    """The blocks of an [N, K] weight's codes (held one per int8 / uint8), as ggml stores them:
    uint8 [N, K / 32 * bytes per block]. `scale` / `zero_point` are in the reference graph's layout."""
    if codes.ndim != 2:
        raise GGUFExportError(f"{what}: GGUF block types hold [N, K] matrices, got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if k % BLOCK:
        raise GGUFExportError(f"{what}: rows of {k} weights are not whole blocks of {BLOCK} ({qtype.name}); llama.cpp "
                              "cannot hold this tensor quantized: exclude its module from the recipe so it stays float")
    q = codes.to(torch.int32).reshape(n, k // BLOCK, BLOCK)
    d = _fp16_exact(_block_params(scale, n, k), what, "scale")[..., None].view(np.uint8)   # [N, B, 2]
    if qtype == T.Q8_0:
        _check_zero(zero_point, what, qtype)
        _check_range(q, -128, 127, what, qtype)
        body = [d, q.to(torch.int8).numpy().view(np.uint8)]
    elif qtype == T.Q4_0:
        _check_zero(zero_point, what, qtype)
        _check_range(q, -8, 7, what, qtype)
        body = [d, _nibbles(q + 8)]
    elif qtype == T.Q4_1:
        if not zero_point.is_floating_point():
            raise GGUFExportError(f"{what}: Q4_1 needs a float zero point (q * d + m); {RECIPE_HINT}")
        _check_range(q, 0, 15, what, qtype)
        m = _fp16_exact(_block_params(zero_point, n, k), what, "zero point")[..., None].view(np.uint8)
        body = [d, m, _nibbles(q)]
    else:
        raise GGUFExportError(f"{what}: no block encoder for {qtype.name}")
    return np.ascontiguousarray(np.concatenate(body, axis=-1).reshape(n, -1))


def _nibbles(q: torch.Tensor) -> np.ndarray:
    """[N, B, 32] values in [0, 15] -> [N, B, 16] bytes: element j low nibble, element j + 16 high."""
    u = q.to(torch.uint8)
    return (u[..., :BLOCK // 2] | (u[..., BLOCK // 2:] << 4)).numpy()


def _check_zero(zero_point: torch.Tensor, what: str, qtype: T) -> None:
    if zero_point.is_floating_point() or bool((zero_point != 0).any()):
        raise GGUFExportError(f"{what}: {qtype.name} is symmetric (zero point 0); this weight has other zero points")


def _check_range(q: torch.Tensor, lo: int, hi: int, what: str, qtype: T) -> None:
    if bool((q < lo).any() or (q > hi).any()):
        raise GGUFExportError(f"{what}: codes in [{int(q.min())}, {int(q.max())}] do not fit {qtype.name}'s [{lo}, {hi}]")


def decode(blocks: np.ndarray, qtype: T, shape: tuple[int, int]) -> np.ndarray:
    """float32 weights of encoded blocks, by the `gguf` package's own decoder (for checks)."""
    from gguf.quants import dequantize

    return dequantize(blocks, qtype).reshape(shape)
