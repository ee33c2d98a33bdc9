"""Ahead-of-time compiles of the shipped Triton configs for sm_80 and sm_90, without a GPU.

Runs in a child pytest without TRITON_INTERPRET (kernels decorated under the interpreter cannot be
compiled; see triton_scripts/subproc.py). A representative subset of 5 compiles keeps this short: the
int8 GEMM's prefill tile on sm_80 and decode tile on sm_90 with the static uint8 + GELU + requantize
epilogue (the heaviest), the dynamic per-token epilogue's prefill tile on sm_90 (wgmma), and the
int4 weight-only GEMM in fp16 with uint4 codes and zero points (sm_80) and in bf16 (sm_90: bf16 is
wrong in the interpreter, so this compile is its only check here).
`python -m qcompile.backends.triton.aot` compiles every shipped config (the full table).
Asserted per compile: the integer (or fp16/bf16) tensor-core instruction is in the PTX, zero spill
bytes from the wheel's `ptxas -v`, shared memory within the arch's per-block limit, registers x
threads within one SM's 64K registers.
"""
from __future__ import annotations

import pytest

from triton_scripts.subproc import INTERPRETING, in_child, run_child
from qcompile.backends.triton.kernels.configs import GemmConfig, all_configs

child = pytest.mark.skipif(not in_child() or INTERPRETING, reason="runs in the AOT child process")
DECODE8, PREFILL8 = GemmConfig(16, 64, 128, 8, 4, 4), GemmConfig(128, 128, 64, 8, 8, 3)
PREFILL4 = GemmConfig(64, 128, 64, 8, 4, 3)
CASES = [("int8_gemm", "static_u8_gelu_requant", PREFILL8, 80), ("int8_gemm", "static_u8_gelu_requant", DECODE8, 90),
         ("int8_gemm", "dynamic_i8_bias_f32", PREFILL8, 90),
         ("int4_gemm", "fp16_u4_zp", PREFILL4, 80), ("int4_gemm", "bf16", PREFILL4, 90)]


def test_aot_compiles_in_a_clean_process():
    if in_child():
        pytest.skip("this is the child")
    pytest.importorskip("triton")
    run_child(__file__, interpret=False, min_passed=len(CASES) + 3)


@child
@pytest.mark.parametrize("kernel, variant, cfg, arch", CASES, ids=lambda v: v.name() if hasattr(v, "name") else str(v))
def test_shipped_config_compiles_to_tensor_core_code_without_spills(kernel, variant, cfg, arch):
    from qcompile.backends.triton import aot

    assert any(c == cfg for a in (80, 90) for c in all_configs(kernel, a))          # it is a shipped config
    v = next(v for v in aot.VARIANTS[kernel] if v.name == variant)
    r = aot.compile_one(v, cfg, arch)
    print(r)
    assert r["mma_found"], (r["mma_expected"], r["mma_instr"])
    if kernel == "int8_gemm":
        # sm_90 prefill tiles are on wgmma (s8); 16-row decode tiles stay on mma.sync s8 (wgmma needs 64 rows)
        want = "wgmma" if arch == 90 and cfg.block_m >= 64 else "mma.sync"
        assert all(i.startswith(want) and ".s8.s8" in i for i in r["mma_instr"]), r["mma_instr"]
    else:
        op = "bf16" if variant.startswith("bf16") else "f16"
        assert all(f".{op}.{op}" in i for i in r["mma_instr"]), r["mma_instr"]
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    assert 0 < r["shared"] <= r["shared_limit"]
    assert r["regs"] * 32 * cfg.num_warps <= 65536
    assert r["cp_async"]            # the specialization is representative: operands are pipelined


@child
@pytest.mark.parametrize("arch", [80, 90])
def test_quantization_kernels_compile_with_ieee_division(arch):
    from qcompile.backends.triton import aot

    for name, const, warps in aot.QUANT_CASES:
        r = aot.compile_quant(name, const, warps, arch)
        assert r["div_rn"] and r["spill_stores"] == 0 and r["spill_loads"] == 0, r


@child
def test_aot_refuses_to_run_under_the_interpreter(monkeypatch):
    from qcompile.backends.triton import aot

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        aot.compile_all()
