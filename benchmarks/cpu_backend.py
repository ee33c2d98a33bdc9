"""CPU backend benchmark: qcompile w8a8-dynamic lowered to torch._int_mm against FP32, BF16, the reference
QDQ graph and torch.ao quantize_dynamic.

Cases: all-MiniLM-L6-v2 at batch 1 and 8 (sequence 128) and one 4096 x 4096 linear at M = 1 and 1024.
Each variant is timed once per round, rounds interleave the variants (so load from other processes
hits all alike), and the table shows the median over the rounds. 2 threads.

GOP/s: 2*M*K*N per int8 GEMM. "lowered" is the whole lowered op (quantize x + _int_mm + rescale), or
for MiniLM all its int8 GEMMs divided by the whole model's time; "int_mm" is plain torch._int_mm on
int8 codes of the same shapes, timed in the same rounds: the practical ceiling on this machine.

    python benchmarks/cpu_backend.py [--runs 20] [--threads 2] [--only linear|minilm]
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import qcompile as qc
from qcompile.backends.torch_cpu import lower, lowering_report

warnings.filterwarnings("ignore")


def cosine(a, b) -> float:
    return F.cosine_similarity(a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1), dim=-1).mean().item()


def interleaved(fns: dict, runs: int, warmup: int = 3) -> dict:
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for f in fns.values():
                f()
        for _ in range(runs):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def int_mm_fns(shapes):
    """One callable running torch._int_mm on random codes at every (M, K, N) in shapes."""
    mats = [(torch.randint(-128, 128, (m, k), dtype=torch.int8), torch.randint(-128, 128, (k, n), dtype=torch.int8))
            for m, k, n in shapes]
    return lambda: [torch._int_mm(a, b) for a, b in mats]


def linear_shapes(gm, example):
    """(M, K, N) of every lowered int8 GEMM, from the recorded fake values."""
    out = []
    for n in gm.graph.nodes:
        if n.target is torch.ops.qcompile.int8_dynamic_linear.default:
            x, w = n.args[0].meta["val"], getattr(gm, n.args[1].target)
            out.append((x.numel() // x.shape[-1], w.shape[0], w.shape[1]))
    return out


def bench_case(name, model, inputs, runs, to_bf16):
    model = model.eval()
    prepared = qc.prepare(model, inputs, recipe="w8a8-dynamic")
    ref = qc.convert(prepared)
    low = lower(ref)
    rep = lowering_report(low)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    bf_inputs = to_bf16(inputs)
    variants = {
        "fp32 eager": lambda: model(*inputs),
        "bf16 eager": lambda: bf16(*bf_inputs),
        "qcompile w8a8-dyn reference QDQ": lambda: ref(*inputs),
        "qcompile w8a8-dyn lowered": lambda: low(*inputs),
        "torch.ao quantize_dynamic": lambda: ao(*inputs),
    }
    shapes = linear_shapes(low, inputs)
    gemm = {"plain torch._int_mm (same shapes)": int_mm_fns(shapes)}
    t = interleaved({**variants, **gemm}, runs)
    with torch.inference_mode():
        outs = {k: f() for k, f in variants.items()}
    y32 = outs["fp32 eager"].float()
    ops = sum(2 * m * k * n for m, k, n in shapes)
    rows = []
    for k in variants:
        gops = f"{ops / t[k] / 1e9:8.1f}" if k == "qcompile w8a8-dyn lowered" else ""
        rows.append((name, k, t[k] * 1e3, t["fp32 eager"] / t[k], cosine(outs[k].float(), y32), gops))
    k = "plain torch._int_mm (same shapes)"
    rows.append((name, k, t[k] * 1e3, float("nan"), float("nan"), f"{ops / t[k] / 1e9:8.1f}"))
    return rows, f"{name}: {len(rep.lowered)} linears lowered, {len(rep.not_lowered)} not; int8 GEMMs {shapes[:1]}... x{len(shapes)}"


class Linear4096(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4096, 4096)

    def forward(self, x):
        return self.fc(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["linear", "minilm"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}, threads {torch.get_num_threads()}, runs {args.runs} (median, interleaved)")
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    rows, notes = [], []
    if args.only in (None, "linear"):
        lin = Linear4096()
        for m in (1, 1024):
            x = torch.randn(m, 4096)
            r, note = bench_case(f"linear 4096x4096 M={m}", lin, (x,), args.runs, lambda i: tuple(t.bfloat16() for t in i))
            rows += r
            notes.append(note)
    if args.only in (None, "minilm"):
        from qcompile.testing.minilm import batches, load_sentence_encoder
        from qcompile.testing.text import docstring_sentences
        enc = load_sentence_encoder()
        for b in (1, 8):
            inputs = batches(docstring_sentences(b), batch_size=b, seq_len=128)[0]
            r, note = bench_case(f"MiniLM b={b} s=128", enc, inputs, args.runs, lambda i: i)
            rows += r
            notes.append(note)
    print()
    print(f"| {'case':<22} | {'variant':<34} | {'ms':>8} | {'x fp32':>6} | {'cos fp32':>8} | {'int8 GOP/s':>10} |")
    print(f"|{'-' * 24}|{'-' * 36}|{'-' * 10}|{'-' * 8}|{'-' * 10}|{'-' * 12}|")
    for case, k, ms, sp, cos, gops in rows:
        print(f"| {case:<22} | {k:<34} | {ms:8.2f} | {sp:6.2f} | {cos:8.5f} | {gops:>10} |")
    print()
    for n in notes:
        print(n)


if __name__ == "__main__":
    main()
