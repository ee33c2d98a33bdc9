"""Perplexity of a quantized SmolLM2-135M-Instruct: one recipe, several calibration sizes.

    python benchmarks/llm_perplexity.py --calib 16 64 160          # w4a16 GPTQ, lm_head 8-bit, sequential
    python benchmarks/llm_perplexity.py --no-head-8bit --calib 160  # lm_head 4-bit too
    python benchmarks/llm_perplexity.py --driver memory --recipe w8a8-dynamic \
        --algorithms '[{"name": "smoothquant", "alpha": 0.5}]' --no-head-8bit --calib 16

The perplexity column of `benchmarks/llm.py` alone (no generation, no decode timing), for sweeps:
the same evaluation chunks (16 x 256 tokens of the evaluation docstrings, disjoint from the
calibration ones), FP32 first, each size in a fresh process. `--driver memory` runs
prepare -> calibrate -> convert and reads the reference graph as `benchmarks/llm.py` does (the same
numbers); `--driver sequential` runs `qc.quantize_sequential`, block by block. For GPTQ its codes
equal `convert`'s (tests/test_sequential.py). Both drivers run each node once per calibration batch
(GPTQ's in-memory pass resumes each layer group from the previous one's live values).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import subprocess
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEQ = 256


def perplexity(logits_of, chunks: torch.Tensor, batch: int = 8) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in chunks.split(batch):
            logits = logits_of(ids)
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                                             ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def one(args) -> dict:
    import qcompile as qc
    from qcompile.spec import get_recipe
    from qcompile.testing.llm import _cache_dir, load_smollm2, token_chunks

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_smollm2()
    evaluation = token_chunks(tok, "evaluation", SEQ, args.eval)
    if args.one == 0:
        return {"calib_chunks": 0, "perplexity": perplexity(lambda ids: model(ids).logits, evaluation)}
    recipe = get_recipe(args.recipe)
    # 8-bit: w8a16's codes for lm_head (w4a16's own default); off: lm_head quantized like every other
    # linear (the recipe without its shipped overrides)
    recipe = recipe.replace(overrides=(("lm_head", "w8a16"),) if args.head_8bit else ())
    calibration = token_chunks(tok, "calibration", SEQ, args.one)
    algorithms = json.loads(args.algorithms) or None
    if args.driver == "memory":
        from qcompile.llm import fold_weight_dequantize, prefill_logits

        t = time.perf_counter()
        prepared = qc.prepare(model, calibration[:1], recipe, algorithms=algorithms)
        qc.calibrate(prepared, list(calibration.split(8)), progress=False)
        quantized = fold_weight_dequantize(qc.convert(prepared))
        seconds = time.perf_counter() - t
        # how the GPTQ pass ran its calibration (resumed per group, and the live values' size)
        runs = prepared.meta["qcompile"].algorithm_reports.get("gptq_runs")
        del prepared
        ppl = perplexity(lambda ids: prefill_logits(quantized, ids), evaluation)
        return {"calib_chunks": args.one, "calib_tokens": args.one * SEQ, "perplexity": ppl, "quantize_s": seconds,
                "gptq_runs": runs}
    model = None   # the sequential run reads the weights from the file, block by block
    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        ckpt = qc.quantize_sequential(str(_cache_dir()), list(calibration.split(8)), pathlib.Path(folder) / "run",
                                      recipe, algorithms=algorithms, progress=False)
        seconds = time.perf_counter() - t
        quantized = ckpt.module()
        ppl = perplexity(lambda ids: quantized(input_ids=ids).logits, evaluation)
    return {"calib_chunks": args.one, "calib_tokens": args.one * SEQ, "perplexity": ppl, "quantize_s": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="w4a16")
    p.add_argument("--driver", choices=("sequential", "memory"), default="sequential")
    p.add_argument("--algorithms", default='["gptq"]', help="JSON list, as qc.prepare takes it")
    p.add_argument("--head-8bit", action=argparse.BooleanOptionalAction, default=True,
                   help="lm_head (SmolLM2's tied embedding) at w8a16, the LLM toolkits' usual choice and "
                        "w4a16's default; --no-head-8bit quantizes it like the other linears")
    p.add_argument("--calib", type=int, nargs="+", default=[16, 64, 160], help="calibration chunks of 256 tokens")
    p.add_argument("--eval", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)   # the child process
    args = p.parse_args(argv)
    if args.one is not None:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return 0
    import importlib.metadata as md

    print(json.dumps({k: md.version(k) for k in ("torch", "transformers")}), flush=True)
    print(f"{args.recipe} {args.algorithms} ({args.driver}), lm_head {'8-bit' if args.head_8bit else 'as the other linears'}; "
          f"evaluation {args.eval} x {SEQ} tokens", flush=True)
    fp32 = None
    for n in [0, *args.calib]:
        child = [sys.executable, __file__, "--one", str(n), "--recipe", args.recipe, "--algorithms", args.algorithms,
                 "--eval", str(args.eval), "--threads", str(args.threads), "--driver", args.driver,
                 "--head-8bit" if args.head_8bit else "--no-head-8bit"]
        proc = subprocess.run(child, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"calibration {n}: failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(line[len("RESULT "):])
        if n == 0:
            fp32 = r["perplexity"]
            print(f"FP32: perplexity {fp32:.3f}", flush=True)
        else:
            rel = f"{100 * (r['perplexity'] / fp32 - 1):+.2f}%" if fp32 else ""
            print(f"{n} chunks ({r['calib_tokens']} tokens): perplexity {r['perplexity']:.3f} {rel}, "
                  f"quantize {r['quantize_s']:.0f} s", flush=True)
            if r.get("gptq_runs"):
                print(f"  gptq: {r['gptq_runs']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
