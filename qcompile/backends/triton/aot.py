"""Ahead-of-time compilation of every shipped kernel config for sm_80 / sm_90, without a GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs Triton's whole pipeline
on the CPU down to PTX and a cubin. The specialization mimics what the JIT does for a realistic
call (M = N = K = 4096, contiguous tensors): unit strides become constexpr 1, the other ints and
all pointers get `tt.divisibility = 16`. Without that the PTX is unrepresentative (byte loads,
no cp.async pipelining). Per compile this reports:
- the MMA instruction found in the PTX (int8: `mma.sync ... s32.s8.s8.s32` on sm_80, `wgmma ...
  s32.s8.s8` on sm_90 for BLOCK_M >= 64; int4 weight-only: fp16/bf16 `mma.sync` / `wgmma`),
- registers, spill bytes and stack from the triton wheel's own `ptxas -v` (same flags as Triton;
  the driver that reports n_regs/n_spills at load time is absent here),
- shared memory (`metadata.shared`) against the per-block limit, and `wgmma.wait_group` levels.
The activation-quantization kernels have no MMA; for them it checks that the IEEE division
(`div.rn.f32`, what makes the codes match the reference) is in the PTX, and spills.

Run `python -m qcompile.backends.triton.aot [--json out.json]` for all configs (0.3-3 s each).
TRITON_INTERPRET must not be set in this process: interpreted kernels cannot be compiled.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from .kernels.configs import SMEM_LIMIT, GemmConfig, all_configs

MMA_PATTERNS = {
    ("int8", 80): r"mma\.sync\.aligned\.m16n8k32\.row\.col(\.satfinite)?\.s32\.s8\.s8\.s32",
    ("int8", 90): r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8",
    ("fp16", 80): r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.f16\.f16\.f32",
    ("fp16", 90): r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.f16\.f16",
    ("bf16", 80): r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32",
    ("bf16", 90): r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.bf16\.bf16",
}


def expected_mma(operands: str, arch: int, block_m: int) -> str:
    """The instruction a config must produce: wgmma needs a 64-row warpgroup tile, so BLOCK_M < 64
    stays on mma.sync even on sm_90 (measured, triton-notes section 2)."""
    return MMA_PATTERNS[(operands, 90 if arch >= 90 and block_m >= 64 else 80)]


@dataclass(frozen=True)
class Variant:
    """One specialization of a kernel: its name and the constexpr flags / dtypes it compiles with."""
    kernel: str
    name: str
    operands: str   # "int8", "fp16", "bf16": which MMA must appear


# The int8 variants ship the heaviest epilogues: static (uint8 codes, zero-point correction, GELU,
# requantize to uint8) and dynamic (int8 codes, per-row scale, bias, float32 out).
VARIANTS = {
    "int8_gemm": [Variant("int8_gemm", "static_u8_gelu_requant", "int8"),
                  Variant("int8_gemm", "dynamic_i8_bias_f32", "int8")],
    "int4_gemm": [Variant("int4_gemm", "fp16", "fp16"), Variant("int4_gemm", "bf16", "bf16"),
                  Variant("int4_gemm", "fp16_u4_zp", "fp16")],
}
SHAPE = 4096   # M = N = K of the specialization


def _int8_source(variant: Variant, cfg: GemmConfig):
    from triton.compiler import ASTSource

    from .kernels.int8_gemm import ACTIVATIONS, int8_gemm_kernel

    static = variant.name.startswith("static")
    sig = {"a_ptr": "*u8" if static else "*i8", "w_ptr": "*i8", "c_ptr": "*u8" if static else "*fp32",
           "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "bias_ptr": "*fp32", "corr_ptr": "*i32",
           "out_scale_ptr": "*fp32", "out_zp_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
           "stride_am": "i32", "stride_ak": "constexpr", "stride_wn": "i32", "stride_wk": "constexpr",
           "stride_cm": "i32", "stride_cn": "constexpr"}
    const = dict(stride_ak=1, stride_wk=1, stride_cn=1, A_U8=static, A_PER_ROW=not static, HAS_BIAS=True,
                 HAS_CORR=static, ACT=ACTIVATIONS["gelu" if static else "none"], REQUANT=static,
                 QMIN=0 if static else -128, QMAX=255 if static else 127, EVEN_K=True)
    const.update(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
    for k, v in const.items():
        sig[k] = "constexpr"
    return ASTSource(int8_gemm_kernel, sig, const, _divisible(int8_gemm_kernel, sig))


def _int4_source(variant: Variant, cfg: GemmConfig):
    import triton.language as tl
    from triton.compiler import ASTSource

    from .kernels.int4_gemm import int4_gemm_kernel

    act = "*bf16" if variant.operands == "bf16" else "*fp16"
    sig = {"a_ptr": act, "w_ptr": "*u8", "c_ptr": act, "scale_ptr": "*fp32", "zp_ptr": "*i32", "bias_ptr": "*fp32",
           "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_ak": "constexpr",
           "stride_wn": "i32", "stride_wk": "constexpr", "stride_sn": "i32", "stride_sg": "constexpr",
           "stride_cm": "i32", "stride_cn": "constexpr"}
    zp = variant.name.endswith("_zp")
    const = dict(stride_ak=1, stride_wk=1, stride_sg=1, stride_cn=1, GROUP=128, SIGNED=not zp, HAS_ZP=zp,
                 HAS_BIAS=True, ACT=0, COMPUTE=tl.bfloat16 if variant.operands == "bf16" else tl.float16,
                 BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
    for k in const:
        sig[k] = "constexpr"
    return ASTSource(int4_gemm_kernel, sig, const, _divisible(int4_gemm_kernel, sig))


def _divisible(fn, sig) -> dict:
    # Pointers (16-byte aligned allocations) and the 4096-sized ints / strides are multiples of 16.
    return {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, t in sig.items() if t != "constexpr"}


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and stack of the PTX from the wheel's ptxas, with Triton's flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
               src, "-o", os.path.join(d, "k.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {"regs": int(regs.group(1)) if regs else None,
            "spill_stores": int(spills.group(1)) if spills else None,
            "spill_loads": int(spills.group(2)) if spills else None,
            "stack": int(stack.group(1)) if stack else None}


# Activation quantization (no MMA): the per-token rows kernel at MiniLM's K = 384 (8 rows of 512 per
# program) and at K = 4096 (one row), and the flat static kernel (uint8 codes).
QUANT_CASES = [("per_token_rows_8x512", dict(DYNAMIC=True, QMIN=-128, QMAX=127, ROWS=8, BLOCK_K=512), 8),
               ("per_token_rows_1x4096", dict(DYNAMIC=True, QMIN=-128, QMAX=127, ROWS=1, BLOCK_K=4096), 8),
               ("static_flat_u8_1024", dict(QMIN=0, QMAX=255, BLOCK=1024), 4)]


def _quant_source(name: str, const: dict):
    from triton.compiler import ASTSource

    from .kernels.quant_act import quantize_flat_kernel, quantize_rows_kernel

    if name.startswith("per_token"):
        fn = quantize_rows_kernel
        sig = {"x_ptr": "*fp32", "q_ptr": "*i8", "scale_ptr": "*fp32", "zp_ptr": "*i32", "M": "i32", "K": "i32",
               "stride_xm": "i32", "stride_qm": "i32"}
    else:
        fn = quantize_flat_kernel
        sig = {"x_ptr": "*fp32", "q_ptr": "*u8", "scale_ptr": "*fp32", "zp_ptr": "*i32", "numel": "i32"}
    for k in const:
        sig[k] = "constexpr"
    return ASTSource(fn, sig, const, _divisible(fn, sig))


def compile_quant(name: str, const: dict, num_warps: int, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.perf_counter()
    ck = triton.compile(_quant_source(name, const), target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": num_warps, "num_stages": 1, "enable_fp_fusion": False})
    rep = {"kernel": "quant_act", "variant": name, "arch": arch, "config": f"w{num_warps}", "mma_expected": None,
           "mma_found": True, "mma_instr": [], "mma_count": 0, "wgmma_wait_levels": [],
           "shared": int(ck.metadata.shared), "shared_limit": SMEM_LIMIT[arch],
           "compile_s": round(time.perf_counter() - t0, 2), "cp_async": False,
           "div_rn": "div.rn.f32" in ck.asm["ptx"]}
    rep.update(ptxas_usage(ck.asm["ptx"], arch))
    rep["ok"] = (rep["spill_stores"] == 0 and rep["spill_loads"] == 0 and rep["div_rn"]
                 and rep["shared"] <= SMEM_LIMIT[arch])
    return rep


def compile_one(variant: Variant, cfg: GemmConfig, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    src = (_int8_source if variant.kernel == "int8_gemm" else _int4_source)(variant, cfg)
    t0 = time.perf_counter()
    # int8: compiled as launched (no FMA contraction in the epilogue, see kernels/int8_gemm.py)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                 "enable_fp_fusion": variant.kernel != "int8_gemm"})
    seconds = time.perf_counter() - t0
    ptx = ck.asm["ptx"]
    want = expected_mma(variant.operands, arch, cfg.block_m)
    mma = re.findall(r"^\s*((?:wgmma\.mma_async|mma\.sync)\S*)", ptx, flags=re.M)
    waits = sorted({int(w) for w in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)})
    shared = int(ck.metadata.shared)
    rep = {"kernel": variant.kernel, "variant": variant.name, "arch": arch, "config": cfg.name(),
           "mma_expected": want, "mma_found": bool(re.search(want, ptx)), "mma_instr": sorted(set(mma)),
           "mma_count": len(mma), "wgmma_wait_levels": waits, "shared": shared,
           "shared_limit": SMEM_LIMIT[arch], "compile_s": round(seconds, 2),
           "cp_async": "cp.async" in ptx or "cp.async.bulk" in ptx}
    rep.update(ptxas_usage(ptx, arch))
    rep["ok"] = (rep["mma_found"] and rep["spill_stores"] == 0 and rep["spill_loads"] == 0
                 and shared <= SMEM_LIMIT[arch] and rep["regs"] is not None
                 and rep["regs"] * 32 * cfg.num_warps <= 65536)
    return rep


def compile_all(archs=(80, 90), kernels=("int8_gemm", "int4_gemm", "quant_act"), limit: int | None = None) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled ahead of time")
    out = []
    for kernel in kernels:
        if kernel == "quant_act":
            out += [compile_quant(name, const, warps, arch) for arch in archs for name, const, warps in QUANT_CASES]
            continue
        for arch in archs:
            for cfg in all_configs(kernel, arch)[:limit]:
                for variant in VARIANTS[kernel]:
                    out.append(compile_one(variant, cfg, arch))
    return out


def format_table(reports: list[dict]) -> str:
    head = f"{'kernel':<10} {'variant':<24} {'sm':>3} {'config':<22} {'mma':<5} {'regs':>4} {'spill':>5} " \
           f"{'smem B':>7} {'wait':<6} {'s':>5}  first MMA instruction"
    rows = [head]
    for r in reports:
        rows.append(f"{r['kernel']:<10} {r['variant']:<24} {r['arch']:>3} {r['config']:<22} "
                    f"{'yes' if r['mma_found'] else 'NO':<5} {r['regs']:>4} {r['spill_stores']:>5} {r['shared']:>7} "
                    f"{','.join(map(str, r['wgmma_wait_levels'])) or '-':<6} {r['compile_s']:>5}  "
                    f"{(r['mma_instr'] or ['-'])[0]}")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--kernel", nargs="+", default=["int8_gemm", "int4_gemm", "quant_act"])
    p.add_argument("--json", help="write the per-config reports here")
    args = p.parse_args(argv)
    import triton

    reps = compile_all(tuple(args.arch), tuple(args.kernel))
    print(f"triton {triton.__version__}; {len(reps)} compiles, {sum(r['compile_s'] for r in reps):.1f} s")
    print(format_table(reps))
    bad = [r for r in reps if not r["ok"]]
    print(f"{len(reps) - len(bad)}/{len(reps)} ok (MMA present, zero spills, fits shared memory and registers)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reps, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
