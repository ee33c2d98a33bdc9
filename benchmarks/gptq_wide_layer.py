#!/usr/bin/env python
"""Peak memory of GPTQ on one wide layer: the largest stage of a sequential LLM run is its lm_head
(TinyLlama-1.1B: 32000 x 2048, 262 MB in FP32), where the pass's N x K copies add up.

    python benchmarks/gptq_wide_layer.py [--rows 32000] [--cols 2048] [--tokens 1024]

A model of one nn.Linear(cols, rows, bias=False) with random weights, quantized `w4a16` with GPTQ
(defaults) through qc.prepare / calibrate / convert on random calibration rows, in this process.
Peak RSS is the kernel's high-water mark (ru_maxrss); "above the start" subtracts the high-water
mark reached before prepare (torch, qcompile, the model, the calibration data), so it is what
the quantization itself added, in units of the weight's size.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

_REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, _REPO)

import torch  # noqa: E402

import qcompile as qc  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32000)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, python {platform.python_version()}, qcompile at {os.path.abspath(_REPO)}")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(args.cols, args.rows, bias=False)).eval()
    batches = list(torch.randn(args.tokens, args.cols).split(256))
    weight_mb = model[0].weight.numel() * 4 / 2**20
    start = peak_mb()
    t = time.perf_counter()
    prepared = qc.prepare(model, batches[0], "w4a16", algorithms=["gptq"])
    qc.calibrate(prepared, batches, progress=False)
    quantized = qc.convert(prepared)
    seconds = time.perf_counter() - t
    peak = peak_mb()
    assert quantized is not None
    print(f"Linear({args.cols} -> {args.rows}), weight {weight_mb:.0f} MB FP32: peak RSS {peak:.0f} MB, "
          f"{peak - start:.0f} MB above the start ({(peak - start) / weight_mb:.2f} x the weight), {seconds:.0f} s")


if __name__ == "__main__":
    main()
