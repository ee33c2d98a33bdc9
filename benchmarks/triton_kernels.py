#!/usr/bin/env python
"""Triton kernels of qcompile: GPU timings against cuBLAS, or the static report where there is no GPU.

    python benchmarks/triton_kernels.py [--rounds 5] [--shapes 1,16,128,2048]   # on a CUDA device
    python benchmarks/triton_kernels.py [--json aot.json]                       # no CUDA: static report
    TRITON_INTERPRET=1 python benchmarks/triton_kernels.py --smoke              # CPU: exercise the timing
                                                                                 # code on tiny shapes
With CUDA, for each (M, N, K) it times with triton.testing.do_bench, in interleaved rounds (each
round runs every method once; the median over rounds is printed):
  int8 GEMM  : qcompile.triton_int8_linear (per-token x per-channel scales, bias, fp16 out) vs
               torch._int_mm (int32 out, no epilogue; CUDA needs M > 16) vs cuBLAS fp16 (torch.mm)
               vs the pure-PyTorch reference implementation;
  int4 W-only: qcompile.triton_int4_linear (group 128, fp16) vs cuBLAS fp16;
  per-token quantization: the Triton kernel vs the reference.
FLOPs (2MNK) and bytes (operands + output, once each) give two floors, compute and memory, from the
device's dense peaks (table below, datasheet values); "% of peak" = the larger floor / measured time.
Without CUDA nothing is timed: the script says so and prints the AOT report of every shipped config
(registers, spills, shared memory, the MMA instruction found), compiled here for sm_80 and sm_90.
Never read a CPU interpreter time (--smoke) as a GPU timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

# Dense peaks (no sparsity): (int8 TOPS, fp16 TFLOPS, HBM TB/s). NVIDIA datasheets, as cited in
# /work/shared/triton-notes.md section 3.
PEAKS = {"H100 SXM": (1978.9, 989.4, 3.35), "H100 PCIe": (1513.0, 756.0, 2.0), "H100": (1978.9, 989.4, 3.35),
         "H200": (1978.9, 989.4, 4.8), "A100-SXM4-80GB": (624.0, 312.0, 2.039), "A100": (624.0, 312.0, 1.555)}


def peaks_for(name: str):
    for key, v in PEAKS.items():
        if key.lower() in name.lower():
            return key, v
    return None, None


def versions() -> str:
    import torch

    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    return f"python {platform.python_version()}, torch {torch.__version__}, triton {tv}"


def static_report(args) -> int:
    from qcompile.backends.triton import aot

    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            reps = json.load(f)
        print(f"(static report read from {args.json})")
    else:
        reps = aot.compile_all(tuple(args.arch))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(reps, f, indent=1)
    print(aot.format_table(reps))
    ok = sum(r["ok"] for r in reps)
    print(f"{ok}/{len(reps)} compiles: MMA present, zero spills, shared memory and registers within limits")
    waits = sorted({w for r in reps if r["kernel"] == "int8_gemm" for w in r["wgmma_wait_levels"]})
    print(f"int8 wgmma.wait_group levels on sm_90: {waits} (0 only: no wgmma kept in flight across K steps)")
    return 0 if ok == len(reps) else 1


def timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    def cpu_ms(fn):   # the interpreter smoke mode: wall time of one call, not a GPU timing
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    return cpu_ms


def cases(m: int, n: int, k: int, device: str, g):
    """(name, fn, flops, bytes, peak kind) for one shape; fn is None with a reason when it cannot run."""
    import torch

    from qcompile.backends.triton import ops
    from qcompile.numerics import pack_int4

    x16 = torch.randn(m, k, generator=g).to(device, torch.float16)
    w8 = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8).to(device)
    w8_t = w8.t()                                      # [K, N] column-major view, what _int_mm wants
    a8, a_s, _ = ops.quantize_per_token(x16)
    w_s = (torch.rand(n, generator=g) * 1e-2).to(device)
    bias = torch.randn(n, generator=g).to(device, torch.float16)
    w16 = torch.randn(n, k, generator=g).to(device, torch.float16)
    q4 = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    w4, s4 = pack_int4(q4).to(device), (torch.rand(n, -(-k // 128), generator=g) * 1e-2).to(device)
    flops = 2.0 * m * n * k
    b8 = m * k + n * k + 2 * m * n + 4 * (m + n)
    b16 = 2 * (m * k + n * k + m * n)
    b4 = 2 * m * k + n * k / 2 + 4 * n * -(-k // 128) + 2 * m * n
    int_mm_ok = device != "cuda" or (m > 16 and k % 8 == 0 and n % 8 == 0)
    return [
        ("int8 triton (fused epilogue)", lambda: ops.int8_linear(a8, a_s, w8, w_s, bias, None, "none", None, None,
                                                                 torch.float16, 0, 0), flops, b8, "int8"),
        ("int8 torch._int_mm (no epilogue)", (lambda: torch._int_mm(a8, w8_t)) if int_mm_ok else "needs M > 16",
         flops, b8, "int8"),
        ("int8 reference impl", lambda: ops.int8_linear_reference(a8, a_s, w8, w_s, bias, None, "none", None, None,
                                                                  torch.float16, 0, 0), flops, b8, "int8"),
        ("fp16 cuBLAS (torch.mm)", lambda: torch.mm(x16, w16.t()), flops, b16, "fp16"),
        ("int4 W-only triton g128", lambda: ops.int4_linear(x16, w4, s4, 128, None, "none", torch.float16),
         flops, b4, "fp16"),
        ("per-token quant triton", lambda: ops.quantize_per_token(x16), 0.0, 2 * m * k + m * k + 8 * m, "fp16"),
        ("per-token quant reference", lambda: ops.quantize_per_token_reference(x16), 0.0, 3 * m * k + 8 * m, "fp16"),
    ]


def run_timings(args, device: str) -> int:
    import torch

    g = torch.Generator().manual_seed(0)
    bench = timer(device)
    peak_name, peak = (peaks_for(torch.cuda.get_device_name()) if device == "cuda" else (None, None))
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU, TRITON_INTERPRET=1 (NOT a GPU timing)"
    print(f"# {where}; {versions()}; peaks: {peak_name or 'unknown device: no % of peak'} {peak or ''}")
    print("| M | N | K | method | median ms | TOPS | GB/s | compute floor ms | memory floor ms | % of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in args.shapes:
        n, k = args.n, args.k
        cs = cases(m, n, k, device, g)
        times: dict = {c[0]: [] for c in cs}
        for _ in range(args.rounds):                      # interleaved: every method once per round
            for name, fn, *_ in cs:
                if callable(fn):
                    times[name].append(bench(fn))
        for name, fn, flops, nbytes, kind in cs:
            if not callable(fn):
                print(f"| {m} | {n} | {k} | {name} | n/a ({fn}) | | | | | |")
                continue
            ms = statistics.median(times[name])
            tops = flops / ms / 1e9 if flops else 0.0
            gbs = nbytes / ms / 1e6
            if peak:
                comp = flops / ((peak[0] if kind == "int8" else peak[1]) * 1e12) * 1e3
                mem = nbytes / (peak[2] * 1e12) * 1e3
                frac = f"{100 * max(comp, mem) / ms:.1f}%"
                floors = f"{comp:.4f} | {mem:.4f}"
            else:
                frac, floors = "n/a", "n/a | n/a"
            print(f"| {m} | {n} | {k} | {name} | {ms:.4f} | {tops:.1f} | {gbs:.1f} | {floors} | {frac} |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--shapes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16, 128, 2048])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--json", help="static report: read it from / write it to this file")
    p.add_argument("--smoke", action="store_true", help="run the timing code on the CPU interpreter, tiny shapes")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    import torch

    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--smoke needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
        args.shapes, args.n, args.k, args.rounds = [1, 33], 136, 256, 1
        return run_timings(args, "cpu")
    if torch.cuda.is_available():
        return run_timings(args, "cuda")
    print(f"no CUDA device: nothing is timed here ({versions()}). Static report of the shipped configs instead:")
    return static_report(args)


if __name__ == "__main__":
    sys.exit(main())
