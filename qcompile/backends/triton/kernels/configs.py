"""Launch configurations per GPU architecture, keyed on a bucketed M, pruned by shared memory.

`gemm_configs(kernel, arch, m)` lists the candidate tiles for a problem with M rows. M is bucketed
(`bucket_m`: 16, 32, 64, 128, 256, then "large") so that a new batch size reuses the tuning of its
bucket instead of retuning. Candidates whose pipelined operand buffers exceed the architecture's
per-block shared memory are dropped here, before any compile (Triton only finds out at load time).

Tile rules measured by ahead-of-time compiles (see aot.py and ../../../../shared/triton-notes.md):
- int8 BLOCK_K >= 32 (the compiler rejects smaller int8 dots), 16-bit BLOCK_K >= 16.
- int8 128x256 tiles spill (1.3 KB on sm_80 at BLOCK_K 128, 172 B on sm_90 at 64): not shipped.
- BLOCK_M = 16 (decode) compiles to mma.sync on sm_90 too (wgmma needs 64 rows per warpgroup).
On a CUDA device `choose` times the candidates of a bucket once (triton.testing.do_bench) and caches
the winner; under the interpreter, or with one candidate, it takes the first (no timing on a CPU).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

# Per-block dynamic shared memory limits (CUDA C Programming Guide, compute capability table).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
M_BUCKETS = (16, 32, 64, 128, 256)
LARGE = 1 << 30


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def name(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}_w{self.num_warps}_s{self.num_stages}"

    def to_dict(self) -> dict:
        return asdict(self)


def bucket_m(m: int) -> int:
    for b in M_BUCKETS:
        if m <= b:
            return b
    return LARGE


C = GemmConfig
# int8 x int8 (operand bytes 1 + 1). Decode tiles first, then square tiles; wide ones only on Hopper.
_INT8 = {
    16: [C(16, 64, 128, 8, 4, 4), C(16, 128, 128, 8, 4, 3)],
    32: [C(32, 64, 128, 8, 4, 4), C(32, 128, 128, 8, 4, 3)],
    64: [C(64, 64, 128, 8, 4, 4), C(64, 128, 64, 8, 4, 4)],
    128: [C(128, 128, 64, 8, 8, 3), C(64, 128, 128, 8, 4, 3)],
    256: [C(128, 128, 64, 8, 8, 4), C(128, 128, 128, 8, 8, 3)],
    LARGE: [C(128, 128, 64, 8, 8, 4), C(128, 128, 128, 8, 8, 3)],
}
# Hopper-only candidates go here. 128x256x64 (8 warps, 3 stages) was one: aot.py measured 172 B of
# spill stores (static epilogue) and 32 B (dynamic) on sm_90 with triton 3.9.0, so it is not shipped.
_INT8_SM90_EXTRA: dict = {}
# int4 weight-only: fp16/bf16 activations (2 bytes) x packed weights (0.5 byte). BLOCK_K divides 128
# so that one K tile lies in one quantization group.
_INT4 = {
    16: [C(16, 64, 64, 8, 4, 3), C(16, 128, 128, 8, 4, 3)],
    32: [C(32, 64, 64, 8, 4, 3), C(32, 128, 128, 8, 4, 3)],
    64: [C(64, 64, 64, 8, 4, 3), C(64, 128, 64, 8, 4, 3)],
    128: [C(128, 128, 64, 8, 8, 3), C(64, 128, 64, 8, 4, 3)],
    256: [C(128, 128, 64, 8, 8, 3)],
    LARGE: [C(128, 128, 64, 8, 8, 3)],
}
del C

KERNELS = ("int8_gemm", "int4_gemm")


def smem_bytes(kernel: str, cfg: GemmConfig) -> int:
    """Shared memory of the software pipeline: num_stages copies of the A and W tiles."""
    if kernel == "int8_gemm":
        per_stage = cfg.block_m * cfg.block_k + cfg.block_n * cfg.block_k
    elif kernel == "int4_gemm":
        per_stage = 2 * cfg.block_m * cfg.block_k + cfg.block_n * cfg.block_k // 2
    else:
        raise ValueError(f"unknown kernel {kernel!r}; known: {KERNELS}")
    return cfg.num_stages * per_stage


def _table(kernel: str, arch: int) -> dict:
    if kernel == "int8_gemm":
        table = {b: list(v) for b, v in _INT8.items()}
        if arch >= 90:
            for b, extra in _INT8_SM90_EXTRA.items():
                table[b] += extra
        return table
    if kernel == "int4_gemm":
        return {b: list(v) for b, v in _INT4.items()}
    raise ValueError(f"unknown kernel {kernel!r}; known: {KERNELS}")


def gemm_configs(kernel: str, arch: int, m: int) -> list[GemmConfig]:
    """The shipped candidates for `kernel` on sm_`arch` and M rows, those that fit in shared memory."""
    limit = SMEM_LIMIT.get(arch, SMEM_LIMIT[86])   # unknown archs get the smallest limit
    return [c for c in _table(kernel, arch)[bucket_m(m)] if smem_bytes(kernel, c) <= limit]


def all_configs(kernel: str, arch: int) -> list[GemmConfig]:
    """Every distinct shipped config of `kernel` on sm_`arch` (what the AOT check compiles)."""
    seen: dict = {}
    for b in (*M_BUCKETS, LARGE):
        for c in gemm_configs(kernel, arch, b):
            seen.setdefault(c, None)
    return list(seen)


_TUNED: dict = {}


def choose(kernel: str, arch: int, m: int, key: tuple, bench=None) -> GemmConfig:
    """The config to launch with. `bench(cfg) -> ms` is given on CUDA: each candidate of the M bucket
    is timed once per (kernel, arch, bucket, key) and the fastest is cached."""
    cands = gemm_configs(kernel, arch, m)
    if not cands:
        raise ValueError(f"no {kernel} config fits sm_{arch} shared memory for M = {m}")
    if bench is None or len(cands) == 1:
        return cands[0]
    k = (kernel, arch, bucket_m(m), key)
    if k not in _TUNED:
        _TUNED[k] = min(cands, key=bench)
    return _TUNED[k]
