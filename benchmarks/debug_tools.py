"""Evidence for qc.compare / qc.sensitivity / the automatic per-layer recipe / qc.report, on the
digits CNN (test accuracy) and all-MiniLM-L6-v2 (mean cosine of sentence embeddings to FP32).

For each model: the compare table of the uniform INT8 recipe, the sensitivity ranking (one layer
quantized at a time, INT4 and INT8 weights), an automatic recipe at 5 average weight bits, and its
quality and weight size against uniform INT4 and uniform INT8. Writes the HTML reports and the
automatic recipes (JSON) to --out.

    python benchmarks/debug_tools.py [--models digits minilm] [--out /tmp/qcompile-debug]
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import qcompile as qc
from qcompile.debug.compare import compare
from qcompile.debug.report import report
from qcompile.debug.sensitivity import auto_recipe, average_bits, plan_precision, quantize, sensitivity, weight_bits

BUDGET = 5.0


def weight_kib(quantized) -> float:
    """Linear/Conv weight storage: codes at their format's bits (int4 packed two per byte, as the
    exporters store them) plus scales and zero points."""
    total = 0.0
    for b, n in weight_bits(quantized).values():
        total += b * n / 8
    for name, buf in quantized.named_buffers():
        if name.startswith("qc_w_") and (name.endswith("_scale") or name.endswith("_zero_point")):
            total += buf.numel() * buf.element_size()
    return total / 1024


def run(name, model, calib, sens_batches, evaluate, low, high, out: Path, metric: str):
    print(f"\n=== {name} ===")
    t = time.perf_counter()
    prepared = qc.prepare(model, calib[0], high)
    if prepared.meta["qcompile"].observers:
        qc.calibrate(prepared, calib, progress=False)
    int8 = qc.convert(prepared)
    cmp = compare(prepared, int8, calib[:2])
    table = str(cmp).splitlines()
    if len(table) > 40:   # MiniLM has hundreds of rows: the head, the worst rows and the summary
        worst = sorted(cmp.rows, key=lambda r: r.sqnr_db)[:12]
        print("\n".join(table[:3] + table[3:18] + ["... (full table in the HTML report); the 12 worst rows:"] +
                        [ln for ln in table[3:-2] if ln.split()[0] in {r.name for r in worst}] + table[-2:]))
    else:
        print("\n".join(table))
    print(f"[compare: {time.perf_counter() - t:.1f} s]")
    t = time.perf_counter()
    sens = sensitivity(model, sens_batches, [low, high], progress=False)
    print(sens)
    print(f"[sensitivity: {len(sens.rows)} one-layer quantizations, {time.perf_counter() - t:.1f} s]")
    recipe = auto_recipe(model, calib, budget_bits=BUDGET, candidates=[low, high], report=sens)
    plan = plan_precision(sens, budget_bits=BUDGET)
    (out / f"{name}_auto_recipe.json").write_text(recipe.to_json())
    print(f"automatic recipe at <= {BUDGET} bits: base {low}, {len(recipe.overrides)} layers at {high}: "
          + ", ".join(layer for layer, _ in recipe.overrides))
    rows = []
    for label, r in ((f"uniform {low}", low), (f"auto ({BUDGET:g} bit budget)", recipe), (f"uniform {high}", high)):
        q = quantize(model, r, calib)
        rows.append((label, average_bits(weight_bits(q)), weight_kib(q), evaluate(q)))
        if r is recipe:
            auto_q = q
    print(f"{'recipe':<24} {'avg weight bits':>15} {'weight KiB':>11} {metric:>22}")
    for label, bits, kib, score in rows:
        print(f"{label:<24} {bits:>15.3f} {kib:>11.1f} {score:>22.4f}")
    print(f"planned average bits {plan.bits:.4f}; measured in the converted model {rows[1][1]:.4f}")
    report(auto_q, compare=compare(model, auto_q, calib[:2]), sensitivity=sens,
           title=f"{name}: automatic recipe").to_html(out / f"{name}_auto.html")
    report(int8, compare=cmp, sensitivity=sens, title=f"{name}: uniform {high}").to_html(out / f"{name}_{high}.html")
    print(f"reports: {out / f'{name}_auto.html'}, {out / f'{name}_{high}.html'}")
    return rows


def digits(out: Path):
    from qcompile.testing.models import accuracy, train_digits_cnn

    model, (x_train, _, x_test, y_test) = train_digits_cnn()
    print(f"digits CNN FP32 test accuracy {accuracy(model, x_test, y_test):.2f}%")
    calib = [x_train[i:i + 64] for i in range(0, 512, 64)]
    return run("digits", model, calib, calib[:4], lambda q: accuracy(q, x_test, y_test, 64), "w4a8", "w8a8", out,
               "test accuracy %")


def minilm(out: Path):
    from qcompile.testing.minilm import batches, embed, load_sentence_encoder, mean_cosine
    from qcompile.testing.text import docstring_sentences

    encoder = load_sentence_encoder()
    calib = batches(docstring_sentences(200, 0))
    evaluation = batches(docstring_sentences(400, 200))
    reference = embed(encoder, evaluation)
    return run("minilm", encoder, calib, calib[:4], lambda q: mean_cosine(reference, embed(q, evaluation)),
               "w4a16", "w8a16", out, "mean cosine to FP32")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["digits", "minilm"], choices=["digits", "minilm"])
    p.add_argument("--out", default="/tmp/qcompile-debug")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"qcompile {qc.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}, {args.threads} threads")
    for m in args.models:
        {"digits": digits, "minilm": minilm}[m](out)


if __name__ == "__main__":
    main()
