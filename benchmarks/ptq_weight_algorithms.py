#!/usr/bin/env python
"""Weight-side PTQ algorithms on all-MiniLM-L6-v2: round-to-nearest vs AWQ vs GPTQ, and NF4.

    python benchmarks/ptq_weight_algorithms.py [--calib 128] [--eval 400] [--rounds 1] [--skip-layers] [--skip-model]
        [--methods NAME ...]
    python benchmarks/ptq_weight_algorithms.py --smollm2 [--llm-calib 16] [--llm-methods NAME ...]

Calibration sentences: ``docstring_sentences(calib, 0)``; evaluation: ``docstring_sentences(eval, max(200, calib))``
(always disjoint from the calibration ones), batches of 8 x 64 tokens.

1. Per layer (36 linears, 6 of each type): each weight is quantized alone from statistics of its
   FP32 inputs on the calibration sentences (real tokens only: the attention mask selects the rows),
   with the pure functions of ``qcompile.algorithms`` at W4 and W3, group 128, symmetric. The table
   gives ||X W^T - X Q(W)^T|| / ||X W^T|| on the evaluation sentences' inputs, averaged per layer
   type (for AWQ, Q(W) is Q(W * s) / s: the 1/s moves into the input). GPTQ here is one layer at
   a time on FP32 inputs (the pass itself is sequential: see part 2).
2. Whole model, through qc.prepare / qc.calibrate / qc.convert (int4, group 128, symmetric
   unless ``asym``: the w4a16 recipe is asymmetric; nf4), each in a fresh subprocess: mean cosine of the sentence embeddings to FP32 on
   the evaluation sentences, the algorithm pass's own time (PassRecord.seconds), the wall time of
   prepare + calibrate + convert, and peak RSS (VmHWM; tracemalloc does not see torch's allocator)
   before and after. ``--rounds`` runs the methods interleaved and reports medians. The methods
   named ``token_mask`` leave the padded positions out of the algorithms' statistics (see
   ``passes/gptq.py: TokenRows``); ``asym`` ones use asymmetric int4 weights.
3. torchao 0.18's AWQ and GPTQ (int4 needs the ``mslk`` kernels or CUDA) and NF4 (runs on CPU:
   ``NF4Tensor.from_tensor`` on every linear, dequantized into the FP32 model).

Markdown tables and versions go to stdout, progress to stderr. Everything runs offline.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_REPO = pathlib.Path(__file__).resolve().parent.parent
try:
    import qcompile  # noqa: F401
except ImportError:
    sys.path.insert(0, str(_REPO))

import torch
from torch import nn

import qcompile as qc
from qcompile.algorithms.awq import fake_quantize, search_clip, search_scales
from qcompile.algorithms.gptq import gptq_quantize
from qcompile.numerics import dequantize_math
from qcompile.spec import PerGroup, QuantSpec
from qcompile.testing.minilm import batches, embed, load_sentence_encoder, mean_cosine
from qcompile.testing.text import docstring_sentences

logging.getLogger("torchao").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")
TYPES = ("query", "key", "value", "attention output", "intermediate", "output")
GROUP = 128
GPTQ_PAPER = {"act_order": False, "clip_grid": 0}   # the paper's GPTQ: columns in order, min-max group ranges
GPTQ_OPTIONS = {"act_order": True, "clip_grid": 0}
GPTQ_CLIP_OPTIONS = {"act_order": True, "clip_grid": 10}  # the pass's defaults
# Sentences are padded to 64 tokens (two thirds of the rows are padding, which neither attention nor
# the mean pooling reads): token_mask leaves those rows out of the algorithms' statistics.
MASK = {"token_mask": "attention_mask"}
# The w4a16 recipe is asymmetric int4 since 2026-12-06; the symmetric rows keep the earlier recipe.
W4_SYM = qc.recipes["w4a16"].replace(weight=QuantSpec("int4", PerGroup(GROUP), symmetric=True, observer="minmax"))
W4_ASYM = qc.recipes["w4a16"]
# GPTQ's defaults before 2026-12-06 (now damp 0.03, bias_correction True): the rows that name an option
# start from these, so each row measures what its name says
OLD = {"damp": 0.01, "bias_correction": False}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def layer_type(name: str) -> str:
    if name.endswith("attention.self.query"):
        return "query"
    if name.endswith("attention.self.key"):
        return "key"
    if name.endswith("attention.self.value"):
        return "value"
    if name.endswith("attention.output.dense"):
        return "attention output"
    if name.endswith("intermediate.dense"):
        return "intermediate"
    return "output"


class Taps:
    """Forward hooks on every nn.Linear: hand the real-token rows of its input to a callback."""

    def __init__(self, encoder: nn.Module):
        self.linears = {n: m for n, m in encoder.named_modules() if isinstance(m, nn.Linear)}
        self.mask = None
        self.callback = None
        for name, mod in self.linears.items():
            mod.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(mod, inputs, output):
            if self.callback is not None:
                x = inputs[0].detach()
                self.callback(name, x[self.mask.bool()].float())
        return hook

    def run(self, encoder, data, callback):
        self.callback = callback
        with torch.no_grad():
            for ids, mask in data:
                self.mask = mask
                encoder(ids, mask)
        self.callback = None


def per_layer_table(encoder, calib, evaluation, n_samples=512) -> str:
    taps = Taps(encoder)
    stats = {n: {"h": 0, "abs": 0, "rows": 0, "sample": []} for n in taps.linears}
    gen = torch.Generator().manual_seed(0)
    per_batch = -(-n_samples // len(calib))

    def collect(name, x):
        st = stats[name]
        st["h"] = st["h"] + (x.T @ x).double()
        st["abs"] = st["abs"] + x.abs().sum(0, dtype=torch.float64)
        st["rows"] += x.shape[0]
        st["sample"].append(x[torch.randperm(x.shape[0], generator=gen)[:per_batch]])

    log("per layer: collecting calibration statistics")
    taps.run(encoder, calib, collect)
    methods = ("RTN", "AWQ", "GPTQ", "GPTQ+clip")  # GPTQ: act_order; +clip: also clip_grid=10 (the defaults)
    effective = {}   # (layer, bits, method) -> effective float weight
    seconds = {m: 0.0 for m in methods}
    for bits in (4, 3):
        spec = QuantSpec(f"int{bits}", PerGroup(GROUP))
        for name, mod in taps.linears.items():
            w = mod.weight.detach().float()
            st = stats[name]
            h = (st["h"] / st["rows"]).float()
            x = torch.cat(st["sample"])[:n_samples]
            t = time.perf_counter()
            effective[name, bits, "RTN"] = fake_quantize(w, spec)
            seconds["RTN"] += time.perf_counter() - t
            t = time.perf_counter()
            s, _, _ = search_scales([w], x, (st["abs"] / st["rows"]).float(), spec)
            qparams = search_clip(w * s, x / s, spec)
            effective[name, bits, "AWQ"] = fake_quantize(w * s, spec, qparams) / s
            seconds["AWQ"] += time.perf_counter() - t
            for method, options in (("GPTQ", GPTQ_OPTIONS), ("GPTQ+clip", GPTQ_CLIP_OPTIONS)):
                t = time.perf_counter()
                codes, scale, zp = gptq_quantize(w, h, spec, **options)
                effective[name, bits, method] = dequantize_math(codes, scale, zp, -1, GROUP, torch.float32)
                seconds[method] += time.perf_counter() - t
        log(f"per layer: W{bits} done")
    err = {k: 0.0 for k in effective}
    ref = {n: 0.0 for n in taps.linears}

    def evaluate(name, x):
        w = taps.linears[name].weight.detach().float()
        ref[name] += float((x @ w.T).pow(2).sum())
        for bits in (4, 3):
            for m in methods:
                err[name, bits, m] += float((x @ (w - effective[name, bits, m]).T).pow(2).sum())

    log("per layer: evaluating")
    taps.run(encoder, evaluation, evaluate)
    rel = {k: (v / ref[k[0]]) ** 0.5 for k, v in err.items()}
    lines = []
    for bits in (4, 3):
        lines += [f"\n### W{bits} g{GROUP} symmetric: ||XW^T - XQ(W)^T|| / ||XW^T|| on evaluation inputs "
                  "(mean over the 6 layers of each type)\n",
                  "| layer type | " + " | ".join(methods) + " | AWQ / RTN | GPTQ / RTN | GPTQ+clip / RTN |",
                  "|---|" + "---:|" * (len(methods) + 3)]
        rows = {t: [n for n in taps.linears if layer_type(n) == t] for t in TYPES}
        rows["average (36 layers)"] = list(taps.linears)
        for t, names in rows.items():
            means = {m: statistics.fmean(rel[n, bits, m] for n in names) for m in methods}
            worst = {m: max(rel[n, bits, m] / rel[n, bits, "RTN"] for n in names) for m in methods[1:]}
            cells = [f"{means[m]:.4f}" for m in methods]
            cells += [f"{means[m] / means['RTN']:.3f} (worst layer {worst[m]:.3f})" for m in methods[1:]]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("\nAlgorithm time over the 72 layer quantizations (36 layers x 2 bit widths), one thread: "
                 + ", ".join(f"{m} {s:.1f} s" for m, s in seconds.items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------- whole model, one method per process

NO_MASK = {"token_mask": None}   # the GPTQ/AWQ default is token_mask="auto" (the graph's attention mask)
METHODS = {
    "RTN": (W4_SYM, []),
    "AWQ (no mask)": (W4_SYM, [{"name": "awq", **NO_MASK}]),
    "GPTQ (paper: no act_order, min-max, no mask)": (W4_SYM, [{"name": "gptq", **GPTQ_PAPER, **NO_MASK, **OLD}]),
    "GPTQ act_order (no mask)": (W4_SYM, [{"name": "gptq", **GPTQ_OPTIONS, **NO_MASK, **OLD}]),
    "GPTQ act_order+clip (no mask)": (W4_SYM, [{"name": "gptq", **NO_MASK, **OLD}]),
    "AWQ then GPTQ (no mask)": (W4_SYM, [{"name": "awq", **NO_MASK}, {"name": "gptq", **NO_MASK, **OLD}]),
    "AWQ (token_mask auto)": (W4_SYM, ["awq"]),
    "GPTQ token_mask": (W4_SYM, [{"name": "gptq", **MASK, **OLD}]),
    "GPTQ token_mask+bias_correction": (W4_SYM, [{"name": "gptq", **MASK, **OLD, "bias_correction": True}]),
    "GPTQ token_mask+bias_correction, damp 0.03": (
        W4_SYM, [{"name": "gptq", **MASK, "bias_correction": True, "damp": 0.03}]),
    "GPTQ token_mask+bias_correction, damp 0.03, refit": (
        W4_SYM, [{"name": "gptq", **MASK, "bias_correction": True, "damp": 0.03, "refit": True}]),
    "asym RTN": (W4_ASYM, []),
    "asym GPTQ (no mask)": (W4_ASYM, [{"name": "gptq", **NO_MASK, **OLD}]),
    "asym GPTQ token_mask": (W4_ASYM, [{"name": "gptq", **MASK, **OLD}]),
    "asym GPTQ token_mask+bias_correction, damp 0.03": (
        W4_ASYM, [{"name": "gptq", **MASK, "bias_correction": True, "damp": 0.03}]),
    # what `qc.prepare(encoder, x, recipe="w4a16", algorithms=[...])` does with no options
    "w4a16 AWQ (defaults)": ("w4a16", ["awq"]),
    "w4a16 GPTQ (defaults)": ("w4a16", ["gptq"]),
    "w4a16 GPTQ refit": ("w4a16", [{"name": "gptq", "refit": True}]),
    "w4a16 GPTQ damp 0.05": ("w4a16", [{"name": "gptq", "damp": 0.05}]),
    "w4a16 GPTQ damp 0.1": ("w4a16", [{"name": "gptq", "damp": 0.1}]),
    "w4a16 GPTQ clip_grid 20": ("w4a16", [{"name": "gptq", "clip_grid": 20}]),
    "w4a16 GPTQ damp 0.1, refit": ("w4a16", [{"name": "gptq", "damp": 0.1, "refit": True}]),
    # columns in order: each group's range is chosen when the loop reaches it, from the weights as
    # the error feedback left them (act_order fixes all ranges up front from the original weights)
    "w4a16 GPTQ act_order False": ("w4a16", [{"name": "gptq", "act_order": False}]),
    "w4a16 GPTQ float_targets": ("w4a16", [{"name": "gptq", "float_targets": True}]),
    "w4a16 GPTQ float_targets, refit": ("w4a16", [{"name": "gptq", "float_targets": True, "refit": True}]),
    "NF4": ("nf4", []),
    "torchao NF4": (None, None),
}


def eval_offset(n_calib: int) -> int:
    """First evaluation sentence: 200, or after the calibration sentences when there are more."""
    return max(200, n_calib)


def rss_mb() -> float:
    """Peak RSS of this process so far: VmHWM, which starts afresh at exec (ru_maxrss carries the
    parent's peak over fork + exec, so it would report the parent's size)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_method(method: str, n_calib: int, n_eval: int) -> dict:
    torch.set_num_threads(1)
    encoder = load_sentence_encoder()
    calib = batches(docstring_sentences(n_calib, 0))
    evaluation = batches(docstring_sentences(n_eval, eval_offset(n_calib)))
    reference = embed(encoder, evaluation)
    recipe, algorithms = METHODS[method]
    before = rss_mb()
    t = time.perf_counter()
    if recipe is None:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

        with torch.no_grad():
            for mod in encoder.modules():
                if isinstance(mod, nn.Linear):
                    mod.weight.copy_(NF4Tensor.from_tensor(mod.weight.detach(), 64, 256).get_original_weight())
        quantized, algo_seconds = encoder, None
    else:
        prepared = qc.prepare(encoder, calib[0], recipe=recipe, algorithms=algorithms)
        qc.calibrate(prepared, calib, progress=False)
        quantized = qc.convert(prepared)
        state = prepared.meta["qcompile"]
        algo_seconds = sum(r.seconds for r in state.records if r.name in ("awq", "gptq")) if algorithms else None
    seconds = time.perf_counter() - t
    out = embed(quantized, evaluation)
    worst = torch.nn.functional.cosine_similarity(out.double(), reference.double(), dim=-1).min().item()
    return dict(method=method, cosine=mean_cosine(out, reference), min_cosine=worst, seconds=seconds,
                algorithm_seconds=algo_seconds, rss_before_mb=before, rss_peak_mb=rss_mb())


# --------------------------------------------------------------------------- SmolLM2-135M perplexity

W4_LLM = W4_SYM.replace(exclude=("lm.lm_head",))   # lm_head (tied to the embedding) stays FP32
W4_LLM_ASYM = W4_ASYM.replace(exclude=("lm.lm_head",))   # the w4a16 recipe
LLM_METHODS = {
    "FP32": (None, None),
    "RTN": (W4_LLM, []),
    "GPTQ damp 0.01": (W4_LLM, [{"name": "gptq", "damp": 0.01}]),
    "GPTQ damp 0.03": (W4_LLM, [{"name": "gptq", "damp": 0.03}]),
    "GPTQ refit": (W4_LLM, [{"name": "gptq", "damp": 0.01, "refit": True}]),
    "GPTQ damp 0.03, refit": (W4_LLM, [{"name": "gptq", "damp": 0.03, "refit": True}]),
    "asym RTN": (W4_LLM_ASYM, []),
    "asym GPTQ damp 0.01": (W4_LLM_ASYM, [{"name": "gptq", "damp": 0.01}]),
    "asym GPTQ (defaults: damp 0.03)": (W4_LLM_ASYM, ["gptq"]),
    "asym GPTQ refit": (W4_LLM_ASYM, [{"name": "gptq", "damp": 0.01, "refit": True}]),
    "asym GPTQ damp 0.03, refit": (W4_LLM_ASYM, [{"name": "gptq", "damp": 0.03, "refit": True}]),
    "asym GPTQ damp 0.05": (W4_LLM_ASYM, [{"name": "gptq", "damp": 0.05}]),
    "asym GPTQ damp 0.1": (W4_LLM_ASYM, [{"name": "gptq", "damp": 0.1}]),
    "asym GPTQ act_order False": (W4_LLM_ASYM, [{"name": "gptq", "act_order": False}]),
    "asym GPTQ float_targets": (W4_LLM_ASYM, [{"name": "gptq", "float_targets": True}]),
    "asym AWQ (defaults)": (W4_LLM_ASYM, ["awq"]),
}


class Logits(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits


def one_llm_method(method: str, n_calib: int) -> dict:
    """SmolLM2-135M-Instruct w4a16: perplexity on 16 evaluation chunks of 256 tokens after calibrating
    on `n_calib` calibration chunks (batches of 4); bias_correction is a no-op here (no linear has a bias)."""
    from qcompile.llm import perplexity
    from qcompile.testing.llm import load_smollm2, token_chunks

    torch.set_num_threads(1)
    lm, tok = load_smollm2()
    evaluation = token_chunks(tok, "evaluation", 256, 16)
    calib = token_chunks(tok, "calibration", 256, n_calib)
    model = Logits(lm).eval()
    recipe, algorithms = LLM_METHODS[method]
    t, algo_seconds = time.perf_counter(), None
    if recipe is not None:
        prepared = qc.prepare(model, (calib[:2],), recipe=recipe, algorithms=algorithms)
        qc.calibrate(prepared, [(calib[i:i + 4],) for i in range(0, n_calib, 4)], progress=False)
        model = qc.convert(prepared)
        algo_seconds = sum(r.seconds for r in prepared.meta["qcompile"].records if r.name == "gptq") or None
    return dict(method=method, perplexity=perplexity(model, evaluation), seconds=time.perf_counter() - t,
                algorithm_seconds=algo_seconds)


def llm_table(n_calib: int, methods=None) -> str:
    lines = [f"\n### SmolLM2-135M-Instruct w4a16 (int4 g{GROUP}, lm_head FP32): perplexity on 16 x 256 evaluation "
             f"tokens, {n_calib} x 256 calibration tokens\n", "| method | perplexity | GPTQ pass s |", "|---|---:|---:|"]
    for m in methods or LLM_METHODS:
        log(f"SmolLM2: {m}")
        proc = subprocess.run([sys.executable, __file__, "--one-llm", m, "--llm-calib", str(n_calib)],
                              capture_output=True, text=True)
        out = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not out:
            lines.append(f"| {m} | failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1][:160]} | |")
            continue
        r = json.loads(out[-1])
        algo = "-" if r["algorithm_seconds"] is None else f"{r['algorithm_seconds']:.0f}"
        lines.append(f"| {m} | {r['perplexity']:.3f} | {algo} |")
    return "\n".join(lines)


def whole_model_table(n_calib: int, n_eval: int, rounds: int, methods=None) -> str:
    results = {m: [] for m in (methods or METHODS)}
    for r in range(rounds):
        for m in results:
            log(f"whole model: {m} (round {r + 1}/{rounds})")
            proc = subprocess.run([sys.executable, __file__, "--one", m, "--calib", str(n_calib), "--eval", str(n_eval)],
                                  capture_output=True, text=True)
            out = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode or not out:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                results[m].append({"error": tail[:200]})
            else:
                results[m].append(json.loads(out[-1]))
    lines = [f"\n### Whole model: w4a16 (int4 g{GROUP}; symmetric unless 'asym') and nf4, {n_calib} calibration / "
             f"{n_eval} evaluation sentences (from {eval_offset(n_calib)}), medians of {rounds} run(s)\n",
             "| method | mean cosine to FP32 | min cosine | algorithm pass s | total s (prepare + calibrate + convert; "
             "torchao: NF4Tensor.from_tensor on the 36 linears) | peak RSS MB (before quantizing) |",
             "|---|---:|---:|---:|---:|---:|"]
    for m, runs in results.items():
        ok = [x for x in runs if "error" not in x]
        if not ok:
            lines.append(f"| {m} | failed: {runs[0]['error']} | | | | |")
            continue
        med = lambda k: statistics.median(x[k] for x in ok)  # noqa: E731
        algo = "-" if ok[0]["algorithm_seconds"] is None else f"{med('algorithm_seconds'):.1f}"
        lines.append(f"| {m} | {med('cosine'):.5f} | {med('min_cosine'):.4f} | {algo} | {med('seconds'):.1f} | "
                     f"{med('rss_peak_mb'):.0f} ({med('rss_before_mb'):.0f}) |")
    return "\n".join(lines)


def torchao_table() -> str:
    lines = ["\n### torchao 0.18 on this CPU\n", "| algorithm | status |", "|---|---|"]
    try:
        from torchao.prototype.awq import AWQConfig
        from torchao.prototype.gptq.api import GPTQConfig
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except Exception as e:
        return "\n".join(lines + [f"| all | import failed: {type(e).__name__}: {e} |"])
    cases = {
        "AWQ (Int4WeightOnlyConfig g128)": lambda: (AWQConfig(Int4WeightOnlyConfig(group_size=GROUP), step="prepare"),
                                                   AWQConfig(Int4WeightOnlyConfig(group_size=GROUP), step="convert")),
        "GPTQ (Int4WeightOnlyConfig g128)": lambda: (
            GPTQConfig(step="observe", base_config=Int4WeightOnlyConfig(group_size=GROUP)),
            GPTQConfig(step="convert", base_config=Int4WeightOnlyConfig(group_size=GROUP))),
    }
    for name, make in cases.items():
        try:
            model = nn.Sequential(nn.Linear(384, 384)).eval()
            prepare_cfg, convert_cfg = make()
            quantize_(model, prepare_cfg)
            model(torch.randn(16, 384))
            quantize_(model, convert_cfg)
            model(torch.randn(4, 384))
            lines.append(f"| {name} | runs |")
        except Exception as e:
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:160]
            lines.append(f"| {name} | does not run on CPU here: {msg} |")
    lines.append("| NF4 (NF4Tensor, block 64, scaler block 256) | runs: the 'torchao NF4' row of the whole-model table |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--one", choices=list(METHODS))
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), help="whole-model methods to run (default: all)")
    ap.add_argument("--smollm2", action="store_true", help="only the SmolLM2-135M perplexity table")
    ap.add_argument("--llm-methods", nargs="+", choices=list(LLM_METHODS))
    ap.add_argument("--llm-calib", type=int, default=16, help="SmolLM2 calibration chunks of 256 tokens")
    ap.add_argument("--one-llm", choices=list(LLM_METHODS))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_method(args.one, args.calib, args.eval)))
        return
    if args.one_llm:
        print(json.dumps(one_llm_method(args.one_llm, args.llm_calib)))
        return
    if args.smollm2:
        print(llm_table(args.llm_calib, args.llm_methods), flush=True)
        return
    torch.set_num_threads(1)
    if not args.skip_layers:
        encoder = load_sentence_encoder()
        calib = batches(docstring_sentences(args.calib, 0))
        evaluation = batches(docstring_sentences(args.eval, eval_offset(args.calib)))
        print(per_layer_table(encoder, calib, evaluation), flush=True)
    if not args.skip_model:
        print(whole_model_table(args.calib, args.eval, args.rounds, args.methods), flush=True)
    print(torchao_table())
    import torchao
    import transformers

    print(f"\ntorch {torch.__version__}, torchao {torchao.__version__}, transformers {transformers.__version__}, "
          f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, 1 torch thread")


if __name__ == "__main__":
    main()
