"""CPU backend benchmark: `qc.lower(..., backend="torch")` against FP32, BF16, BF16 + torch.compile,
torchao and torch.ao on the same machine, in one process, 2 threads.

Cases: all-MiniLM-L6-v2 at batch 1 and 8 (sequence 128; calibrated on 200 docstring sentences, cosine
to FP32 on 64 disjoint ones, both in batches of the captured size) and one 4096 x 4096 linear at M = 1
and 1024 (random weights and inputs). Each variant runs once per round, rounds interleave the variants
(load from other processes hits all alike), and the table shows the median over the rounds and the
speedup over FP32 eager measured in the same rounds. "compile" means `torch.compile` with inductor's
`freezing` on (the bar the issue sets); a compiled variant is timed only if it agrees with its eager
module (min cosine >= 0.98; the agreement is printed).

GOP/s: 2*M*K*N summed over the INT8 GEMMs of the lowered graph, divided by the whole variant's time;
"torch._int_mm" runs plain `torch._int_mm` on int8 codes of the same shapes in the same rounds: the
practical ceiling of an INT8 GEMM on this machine.

"qcompile target='torch-cpu' (qc.compile)" is the one-call path with no hand-written option:
`prepare(model, x, target="torch-cpu")`, calibrate, `qc.compile(prepared)` (convert, lower, and
torch.compile with freezing as its own option); the row to compare it with is the hand-written
"w8a8 linears + outlier split (q/k/v) + smoothquant + compile". `--target-row` times only those,
the FP32 / BF16 baselines and BF16 + compile (a shorter run).

    python benchmarks/cpu_backend.py [--runs 20] [--threads 2] [--only linear|minilm] [--no-compile] [--target-row]
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import qcompile as qc
from qcompile.backends.torch_cpu import lower, lowering_report

warnings.filterwarnings("ignore")
qops = torch.ops.qcompile
INT8_GEMMS = {qops.onednn_int8_linear.default, qops.int8_dynamic_linear.default}


def cosine(a, b) -> tuple[float, float]:
    """(mean, min) over rows of the cosine similarity."""
    a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    c = F.cosine_similarity(a, b, dim=-1)
    return c.mean().item(), c.min().item()


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


def gemm_shapes(gm) -> list[tuple[int, int, int]]:
    """(M, K, N) of every INT8 GEMM of a lowered graph, from the recorded fake values."""
    out = []
    for n in gm.graph.nodes:
        if n.target in INT8_GEMMS:
            x = n.args[0].meta["val"]
            w = getattr(gm, n.args[3 if n.target is qops.onednn_int8_linear.default else 1].target)
            k = x.shape[-1]
            n_out = w.shape[0] if n.target is qops.onednn_int8_linear.default else w.shape[1]
            out.append((x.numel() // k, k, n_out))
    return out


def int_mm_fn(shapes):
    mats = [(torch.randint(-128, 128, (m, k), dtype=torch.int8), torch.randint(-128, 128, (k, n), dtype=torch.int8))
            for m, k, n in shapes]
    return lambda: [torch._int_mm(a, b) for a, b in mats]


def compiled(module, inputs, name, notes):
    """torch.compile with freezing, checked against the eager module (max-autotune once gave wrong results)."""
    c = torch.compile(module)
    with torch.inference_mode():
        ref, got = module(*inputs), c(*inputs)
    cos = cosine(got.float(), ref.float())[1]
    # Not exact agreement: inductor's fused LayerNorm/softmax/GELU round differently in float32,
    # codes flip at rounding ties, and six quantized layers amplify the flips (measured down to
    # 0.988 for single MiniLM sentences, at unchanged accuracy to FP32). The gate catches a broken
    # compile (max-autotune once gave 0.82); the table's cosine to FP32 is the compiled module's own.
    notes.append(f"{name}: agreement with eager, min cosine {cos:.5f}")
    if cos < 0.98:
        notes.append(f"{name}: compiled output disagrees with eager; not timed")
        return None
    return c


def torchao_variants(model, to_bf16, notes) -> dict:
    out = {}
    try:
        from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                          Int8WeightOnlyConfig, quantize_)
    except Exception as e:   # noqa: BLE001
        notes.append(f"torchao not available: {e}")
        return out
    configs = {"torchao int8 dynamic (fp32)": (Int8DynamicActivationInt8WeightConfig, False),
               "torchao int8 weight-only (bf16)": (Int8WeightOnlyConfig, True),
               "torchao int4 weight-only (bf16)": (Int4WeightOnlyConfig, True)}
    for name, (cfg, bf16) in configs.items():
        m = copy.deepcopy(model)
        if bf16:
            m = m.to(torch.bfloat16)
        try:
            kwargs = {}
            if cfg is Int4WeightOnlyConfig:
                kwargs = dict(group_size=128, int4_packing_format="tile_packed_to_4d")   # tinygemm's layout
            quantize_(m, cfg(**kwargs))
            out[name] = (m, bf16)
        except Exception as e:   # noqa: BLE001
            notes.append(f"{name}: did not run on this CPU ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    return out


# The static INT8 configurations for MiniLM: the default recipe (every op family, SmoothQuant),
# linears only, and linears only with LLM.int8()-style float outlier channels on the q/k/v input
# (the tensor whose quantization costs most) plus SmoothQuant on the rest. The outlier split is kept
# to q/k/v because on the FFN it would put a float add between the GEMM and its fused GELU.
LINEARS = qc.recipes["w8a8"].replace(name="w8a8 linears", ops=("linear",))
MINILM_STATIC = [
    ("w8a8 + smoothquant", "w8a8", ["smoothquant"]),
    ("w8a8 linears", LINEARS, None),
    ("w8a8 linears + outlier split (q/k/v) + smoothquant", LINEARS,
     [{"name": "outlier_split", "modules": ["*.attention.self.*"]}, "smoothquant"]),
]


TARGET_ROW = "qcompile target='torch-cpu' (qc.compile)"


def bench_case(name, model, inputs, calib, evaluation, runs, use_compile, static, target_row=False, others=True):
    """`static`: [(label, recipe, algorithms)] of the w8a8 variants; `evaluation`: batches for the cosine;
    `target_row`: add the torch-cpu target through qc.compile; `others`: the dynamic / weight-only
    recipes, torchao and torch.ao too."""
    notes = []
    model = model.eval()
    to_bf16 = lambda i: tuple(t.bfloat16() if t.is_floating_point() else t for t in i)  # noqa: E731
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    variants = {"fp32 eager": (model, False), "bf16 eager": (bf16, True)}
    if use_compile:
        c = compiled(bf16, to_bf16(inputs), "bf16 + compile", notes)
        if c is not None:
            variants["bf16 + compile (freezing)"] = (c, True)
    lowered = {}
    configs = [(f"qcompile {label}", recipe, algos) for label, recipe, algos in static]
    if others:
        configs += [(f"qcompile {r}", r, None) for r in ("w8a8-dynamic", "w8a16", "w4a16")]
    for label, recipe, algos in configs:
        t0 = time.perf_counter()
        prepared = qc.prepare(model, inputs, recipe=recipe, algorithms=algos)
        spec = (qc.recipes[recipe] if isinstance(recipe, str) else recipe).activation
        if spec is not None and not spec.dynamic:
            qc.calibrate(prepared, calib, progress=False)
        low = lower(qc.convert(prepared))
        rep = lowering_report(low)
        kernels = sorted({k.split()[0] for _, k in rep.lowered if k.startswith("qcompile.")})
        notes.append(f"{label}: {sum(k.startswith('qcompile.') for _, k in rep.lowered)} ops on kernels "
                     f"({', '.join(kernels)}), {len(rep.not_lowered)} not lowered; built in {time.perf_counter() - t0:.0f}s")
        lowered[label] = low
        variants[label] = (low, False)
        if use_compile and "dynamic" not in label and "w8a16" not in label and "w4a16" not in label:
            c = compiled(low, inputs, label + " + compile", notes)
            if c is not None:
                variants[label + " + compile"] = (c, False)
    if target_row:
        t0 = time.perf_counter()
        prepared = qc.prepare(model, inputs, target="torch-cpu")
        qc.calibrate(prepared, calib, progress=False)
        fast = qc.compile(prepared)
        with torch.inference_mode():
            ref, got = fast.lowered(*inputs), fast(*inputs)
        notes.append(f"{TARGET_ROW}: recipe {prepared.meta['qcompile'].recipe.name}, algorithms "
                     f"{[n for n, _ in prepared.meta['qcompile'].recipe.algorithms]}; built and compiled in "
                     f"{time.perf_counter() - t0:.0f}s; agreement with its eager lowered module, min cosine "
                     f"{cosine(got.float(), ref.float())[1]:.5f}")
        variants[TARGET_ROW] = (fast, False)
    if others:
        for k, (m, bf) in torchao_variants(model, to_bf16, notes).items():
            variants[k] = (m, bf)
        variants["torch.ao quantize_dynamic"] = (torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8), False)
    fns = {k: (lambda m=m, i=(to_bf16(inputs) if bf else inputs): m(*i)) for k, (m, bf) in variants.items()}
    first_static = f"qcompile {static[0][0]}"
    shapes = {"w8a8": gemm_shapes(lowered[first_static])}
    if others:
        shapes["w8a8-dynamic"] = gemm_shapes(lowered["qcompile w8a8-dynamic"])
        fns["torch._int_mm on the w8a8 GEMM shapes"] = int_mm_fn(shapes["w8a8"])
    t = interleaved(fns, runs)
    with torch.inference_mode():
        ref = torch.cat([model(*b) for b in evaluation]).float()
        outs = {k: torch.cat([m(*(to_bf16(b) if bf else b)) for b in evaluation]).float() for k, (m, bf) in variants.items()}
    rows = []
    for k in fns:
        gops = ""
        if k.startswith("qcompile w8a8") or k.startswith("torch._int_mm"):
            s = shapes["w8a8-dynamic" if "dynamic" in k else "w8a8"]
            gops = f"{sum(2 * m * kk * n for m, kk, n in s) / t[k] / 1e9:.0f}"
        cos = cosine(outs[k], ref) if k in outs else (float("nan"), float("nan"))
        rows.append((name, k, t[k] * 1e3, t["fp32 eager"] / t[k], cos, gops))
    bar = "bf16 + compile (freezing)"
    if bar in t:
        for k in fns:
            if k.startswith("qcompile"):
                notes.append(f"{k}: {t[bar] / t[k]:.2f}x bf16 + compile (freezing)")
    if bar in t and TARGET_ROW in t:
        hand = f"qcompile {static[-1][0]} + compile"
        if hand in t:
            notes.append(f"{TARGET_ROW} vs the hand-written {hand}: time ratio {t[hand] / t[TARGET_ROW]:.3f} "
                         f"(> 1: the target is faster)")
    return rows, notes


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
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--calib", type=int, default=200, help="MiniLM calibration sentences")
    ap.add_argument("--eval", type=int, default=64, help="MiniLM evaluation sentences (cosine to FP32)")
    ap.add_argument("--target-row", action="store_true",
                    help="MiniLM: only the baselines, the hand-written fastest configuration and target='torch-cpu'")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    import transformers
    try:
        import torchao
        ao_version = torchao.__version__
    except Exception:   # noqa: BLE001
        ao_version = "not installed"
    print(f"torch {torch.__version__}, torchao {ao_version}, transformers {transformers.__version__}, "
          f"python {platform.python_version()}, {platform.machine()}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, {args.runs} interleaved runs (median)")
    rows, notes = [], []
    if args.only in (None, "linear"):
        lin = Linear4096().eval()
        for m in (1, 1024):
            x = torch.randn(m, 4096)
            calib = [(torch.randn(m, 4096),) for _ in range(4)]
            evaluation = [(torch.randn(m, 4096),) for _ in range(4)]
            try:
                r, n = bench_case(f"linear 4096x4096 M={m}", lin, (x,), calib, evaluation, args.runs,
                                  not args.no_compile, [("w8a8", "w8a8", None)])
                rows += r
                notes += n
            except Exception:   # noqa: BLE001
                traceback.print_exc()
    if args.only in (None, "minilm"):
        from qcompile.testing.minilm import batches, load_sentence_encoder
        from qcompile.testing.text import docstring_sentences
        enc = load_sentence_encoder()
        for b in (1, 8):
            # calibration and evaluation in batches of the captured size; disjoint sentences
            calib = batches(docstring_sentences(args.calib, 0), batch_size=b, seq_len=128)
            evaluation = batches(docstring_sentences(args.eval, args.calib), batch_size=b, seq_len=128)
            inputs = evaluation[0]
            try:
                static = MINILM_STATIC[-1:] if args.target_row else MINILM_STATIC
                r, n = bench_case(f"MiniLM b={b} s=128", enc, inputs, calib, evaluation, args.runs,
                                  not args.no_compile, static, target_row=True, others=not args.target_row)
                rows += r
                notes += [f"MiniLM b={b}: {x}" for x in n]
            except Exception:   # noqa: BLE001
                traceback.print_exc()
    print()
    print("| case | variant | ms (median) | x fp32 | cosine to fp32 (mean / min) | int8 GEMM GOP/s |")
    print("|---|---|---:|---:|---:|---:|")
    for case, k, ms, sp, (cos, cmin), gops in rows:
        print(f"| {case} | {k} | {ms:.2f} | {sp:.2f} | {cos:.5f} / {cmin:.5f} | {gops} |")
    print()
    for n in notes:
        print("-", n)


if __name__ == "__main__":
    main()
