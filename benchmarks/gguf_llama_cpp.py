#!/usr/bin/env python
"""GGUF files of SmolLM2-135M-Instruct in llama.cpp: qcompile's codes (RTN, AWQ, GPTQ) against
llama.cpp's own quantizer at the same types.

    python benchmarks/gguf_llama_cpp.py [--phase quality|speed|table|all] [--n-eval 32] [--n-calib 16]
        [--types q4_0 q8_0 q4_1] [--methods rtn gptq awq] [--rounds 3] [--files DIR] [--results FILE]

Quality (run it under `nice`): every file's perplexity measured IN llama.cpp (llama-cpp-python in a
child process, F32 KV cache, 2 threads) on held-out text, ``token_chunks(tok, "evaluation", 256,
n_eval)``, each chunk evaluated from an empty context; and PyTorch FP32's perplexity on the same
chunks (``qc.llm.perplexity``). Files:
- ``float-f32`` / ``float-f16``: ``qc.export_gguf`` of the float model;
- ``llama.cpp-<type>``: ``llama_cpp.llama_model_quantize`` (the llama-quantize tool's function, its
  default mix for the type) of the F16 file;
- ``qcompile-<type>-<method>``: the issue's flow, ``qc.prepare(model, ids, "gguf-<type>",
  algorithms=...)`` on the LLaMA model itself (its KV-cache step graph), ``qc.calibrate`` on
  ``token_chunks(tok, "calibration", 256, n_calib)`` (disjoint from the evaluation text), one chunk
  per batch, ``qc.convert``, ``qc.export_gguf``. RTN: no algorithm (the recipe's fp16-first codes);
  GPTQ: defaults but damp 0.01; AWQ: ``fold_only`` (a GGUF file has no place for the multiply AWQ would put before
  o_proj, so that group is left out).

Speed (the script takes the shared CPU lock /tmp/qcompile-cpu.lock, as `flock` does, for the whole
phase; ``--speed-threads``, default 1): prompt processing (one 256-token chunk per call) and
generation (token by token after it) in llama.cpp, rounds that visit every file in turn; ratios against the F16 file timed in the same
round, medians over rounds.

Every measurement is appended to ``--results`` (benchmarks/results/gguf.jsonl) as it is made; a rerun
skips what is there for the same settings (resume), and ``--phase table`` prints the markdown table
from it. Files live in ``--files`` (kept between runs; a file is only reused with its record).

Note on this model: SmolLM2-135M-Instruct is shipped as a llama.cpp Q4_1 file (groups of 32,
asymmetric), so its FP32 weights lie on a Q4_1 grid: any Q4_1 quantizer that finds each block's
min and max reproduces them almost exactly. The Q4_1 rows are near-lossless by construction, not
by merit of a quantizer; Q8_0 and Q4_0 are the informative rows.
"""
from __future__ import annotations

import argparse
import fcntl
import gc
import json
import logging
import os
import pathlib
import platform
import statistics
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

import numpy as np
import torch

import qcompile as qc
from qcompile.backends.gguf.runtime import llama_cpp_quantize, run_llama_cpp
from qcompile.llm import perplexity
from qcompile.testing.llm import load_smollm2, token_chunks

SEQ = 256
# GPTQ at damp 0.01 and without float_targets, the pass's defaults when these rows were measured (Q4_0:
# 52 min under load; damp is 0.03 since, which on symmetric int4 SmolLM2 measured no better, and
# float_targets on: README "Weight-only INT4")
ALGORITHMS = {"rtn": None, "gptq": [{"name": "gptq", "damp": 0.01, "float_targets": False}],
              "awq": [{"name": "awq", "fold_only": True}]}
LOCK = "/tmp/qcompile-cpu.lock"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tensor_types(path: pathlib.Path) -> str:
    """The types of the token embedding / output and of the layer matrices, e.g. 'Q8_0 emb, 210 Q4_0'."""
    from collections import Counter

    import gguf

    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    layers = Counter(v for k, v in types.items() if k.startswith("blk.") and not k.endswith("norm.weight"))
    head = types["token_embd.weight"] + " emb" + (f", {types['output.weight']} out" if "output.weight" in types else "")
    return head + ", " + ", ".join(f"{n} {t}" for t, n in layers.most_common())


class Results:
    """The JSONL file: one record per measurement, appended as made."""

    def __init__(self, path: pathlib.Path, settings: dict):
        self.path, self.settings = path, settings
        self.records = []
        if path.is_file():
            self.records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def find(self, kind: str, name: str) -> dict | None:
        for r in self.records:
            if r["kind"] == kind and r["name"] == name and all(r.get(k) == v for k, v in self.settings.items()):
                return r
        return None

    def add(self, record: dict) -> None:
        record = {**record, **self.settings, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.records.append(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def plan(args) -> list[dict]:
    """The files in the order they are made (the goal's rows first)."""
    rows = [{"name": "float-f32", "source": "float", "type": "F32", "method": ""},
            {"name": "float-f16", "source": "float", "type": "F16", "method": ""}]
    for t in args.types:
        rows.append({"name": f"llama.cpp-{t}", "source": "llama.cpp", "type": t.upper(), "method": "llama-quantize"})
        rows += [{"name": f"qcompile-{t}-{m}", "source": "qcompile", "type": t.upper(), "method": m.upper()}
                 for m in args.methods]
    return rows


def quality(args, results: Results, files: pathlib.Path) -> None:
    state = {}

    def model_and_tokenizer():
        if "model" not in state:
            state["model"], state["tok"] = load_smollm2()
        return state["model"], state["tok"]

    model, tok = model_and_tokenizer()
    eval_ids = token_chunks(tok, "evaluation", SEQ, args.n_eval)
    if results.find("quality", "pytorch-fp32") is None:
        t0 = time.perf_counter()
        ppl = perplexity(model, eval_ids, batch_size=1)
        results.add({"kind": "quality", "name": "pytorch-fp32", "source": "pytorch", "type": "FP32", "method": "",
                     "ppl": ppl})
        log(f"PyTorch FP32 perplexity {ppl:.4f} ({time.perf_counter() - t0:.0f} s)")
    calib = token_chunks(tok, "calibration", SEQ, args.n_calib)
    batches = [calib[i:i + 1] for i in range(len(calib))]
    for row in plan(args):
        if results.find("quality", row["name"]) is not None:
            continue
        path = files / f"{row['name']}.gguf"
        t0 = time.perf_counter()
        if row["source"] == "float":
            qc.export_gguf(model, path, tokenizer=tok, float_type=row["type"].lower(), pre="smollm")
        elif row["source"] == "llama.cpp":
            source = files / "float-f16.gguf"
            if not source.is_file():   # its record can outlive the file (--files is a cache: /tmp by default)
                qc.export_gguf(model, source, tokenizer=tok, float_type="f16", pre="smollm")
            tmp = path.with_suffix(".tmp")
            llama_cpp_quantize(source, tmp, row["type"])
            tmp.replace(path)
        else:
            method = row["method"].lower()
            prepared = qc.prepare(model, batches[0], f"gguf-{row['type'].lower()}", algorithms=ALGORITHMS[method])
            if ALGORITHMS[method]:
                qc.calibrate(prepared, batches, progress=False)
            quantized = qc.convert(prepared)
            qc.export_gguf(quantized, path, tokenizer=tok, pre="smollm")
            del prepared, quantized
            gc.collect()
        seconds = time.perf_counter() - t0
        run = run_llama_cpp(path, eval_ids)
        rec = {**row, "kind": "quality", "ppl": run.perplexity(SEQ), "size_mib": path.stat().st_size / 2 ** 20,
               "tensor_types": tensor_types(path), "make_seconds": seconds}
        results.add(rec)
        log(f"{row['name']}: perplexity {rec['ppl']:.4f}, {rec['size_mib']:.1f} MiB, {rec['tensor_types']}, made in {seconds:.0f} s")


def speed(args, results: Results, files: pathlib.Path) -> None:
    model, tok = None, None
    _, tok = load_smollm2()
    ids = token_chunks(tok, "evaluation", SEQ, args.speed_chunks)
    rows = [r for r in plan(args) if (files / f"{r['name']}.gguf").is_file() and results.find("quality", r["name"])]
    with open(LOCK, "w") as lock:
        log(f"waiting for {LOCK}")
        fcntl.flock(lock, fcntl.LOCK_EX)
        log("lock held")
        for r in range(args.rounds):
            round_id = f"{time.time():.0f}-{r}"
            for row in rows:
                run = run_llama_cpp(files / f"{row['name']}.gguf", ids, gen_tokens=args.gen_tokens,
                                    threads=args.speed_threads)
                results.add({"kind": "speed", "name": row["name"], "round": round_id, "threads": args.speed_threads,
                             "prompt_tok_s": SEQ / float(np.median(run.seconds)),
                             "gen_tok_s": 1.0 / float(np.median(run.decode_seconds))})
            log(f"speed round {r + 1}/{args.rounds} done")


def table(args, results: Results) -> str:
    import gguf  # noqa: F401
    import llama_cpp
    import transformers
    from importlib.metadata import version

    quality_rows = {r["name"]: r for r in results.records if r["kind"] == "quality"
                    and all(r.get(k) == v for k, v in results.settings.items())}
    speeds: dict[str, dict[str, dict]] = {}
    for r in results.records:
        # only rounds at this thread count (the first rounds, 2 threads on shared cores, recorded none:
        # llama.cpp's spinning threads collapsed to 0.3 tokens/s whenever another job took a core)
        if r["kind"] == "speed" and r.get("threads") == args.speed_threads:
            speeds.setdefault(r["round"], {})[r["name"]] = r

    def ratio(name, key):
        vals = [rnd[name][key] / rnd["float-f16"][key] for rnd in speeds.values() if name in rnd and "float-f16" in rnd]
        absolute = [rnd[name][key] for rnd in speeds.values() if name in rnd]
        return (statistics.median(absolute) if absolute else None, statistics.median(vals) if vals else None,
                len(vals))

    lines = [f"SmolLM2-135M-Instruct; perplexity in llama.cpp (llama-cpp-python {llama_cpp.__version__}, 2 threads, "
             f"F32 KV cache) on {args.n_eval} x {SEQ} held-out tokens (token_chunks 'evaluation'); calibration "
             f"{args.n_calib} x {SEQ} (token_chunks 'calibration'); torch {torch.__version__}, transformers "
             f"{transformers.__version__}, gguf {version('gguf')}, {platform.machine()} {os.cpu_count()} cores "
             f"({_cpu_name()})", ""]
    if "pytorch-fp32" in quality_rows:
        lines += [f"PyTorch FP32 perplexity on the same chunks: {quality_rows['pytorch-fp32']['ppl']:.4f}", ""]
    lines += ["| file | tensor types | perplexity (llama.cpp) | MiB | prompt tok/s | x F16 | generation tok/s | x F16 | made in s |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    n_rounds = 0
    for row in plan(args):
        q = quality_rows.get(row["name"])
        if q is None:
            continue
        label = {"float": f"float {row['type']} (qc.export_gguf)", "llama.cpp": f"llama.cpp {row['type']} (llama-quantize of F16)",
                 "qcompile": f"qcompile {row['type']} {row['method']}"}[row["source"]]
        pp, ppr, n_rounds_row = ratio(row["name"], "prompt_tok_s")
        tg, tgr, _ = ratio(row["name"], "gen_tok_s")
        n_rounds = max(n_rounds, n_rounds_row)
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {label} | {q['tensor_types']} | {q['ppl']:.4f} | {q['size_mib']:.1f} | {fmt(pp, '.0f')} | "
                     f"{fmt(ppr, '.2f')} | {fmt(tg, '.1f')} | {fmt(tgr, '.2f')} | {q['make_seconds']:.0f} |")
    lines += ["", f"Speed: medians over {n_rounds} interleaved rounds, {args.speed_threads} llama.cpp thread(s) (prompt: a "
              f"{SEQ}-token chunk per call; generation: {args.gen_tokens} tokens one by one), ratios against the F16 "
              f"file in the same round, under {LOCK}."]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", choices=["quality", "speed", "table", "all"], default="all")
    p.add_argument("--files", default="/tmp/qcompile-gguf-bench")
    p.add_argument("--results", default=str(_REPO / "benchmarks" / "results" / "gguf.jsonl"))
    p.add_argument("--n-eval", type=int, default=32)
    p.add_argument("--n-calib", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--speed-chunks", type=int, default=2)
    p.add_argument("--gen-tokens", type=int, default=32)
    # one thread by default: on cores shared with other jobs, llama.cpp's spin-waiting threads stall
    p.add_argument("--speed-threads", type=int, default=1)
    p.add_argument("--types", nargs="+", default=["q4_0", "q8_0", "q4_1"], choices=["q8_0", "q4_0", "q4_1"])
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"], choices=list(ALGORITHMS))
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("torchao").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    files = pathlib.Path(args.files)
    files.mkdir(parents=True, exist_ok=True)
    results = Results(pathlib.Path(args.results), {"n_eval": args.n_eval, "n_calib": args.n_calib, "seq": SEQ})
    if args.phase in ("quality", "all"):
        quality(args, results, files)
    if args.phase in ("speed", "all"):
        speed(args, results, files)
    print(table(args, results))


if __name__ == "__main__":
    main()
