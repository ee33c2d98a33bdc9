"""The zoo table: every architecture of qcompile.testing.zoo through every stage, and for the CNNs
onnxruntime's speed of qcompile's file against the FP32 file and onnxruntime's own quantize_static.

    python benchmarks/zoo.py [--models resnet18,bert] [--json out.json] [--runs 20]

Per model: the stages (w8a8 prepare -> calibrate -> convert with target="ort-cpu", the reference
graph's mean cosine to FP32, export_onnx in onnxruntime, qc.lower(backend="torch"), w8a8-dynamic,
w4a16), GEMM/conv weights quantized / all, the integer ops of onnxruntime's optimized model
(QLinearConv against float Conv, QLinearAdd against float Add), and for the CNNs the median latency
(batch 8, 2 threads, spinning off, interleaved rounds) of FP32 ONNX, qcompile w8a8 and
quantize_static (QDQ, per-channel int8 weights, uint8 activations, calibrated on the same batches),
with their cosines to FP32.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import onnxruntime as ort  # noqa: E402
import transformers  # noqa: E402

import qcompile as qc  # noqa: E402
from qcompile.testing import zoo  # noqa: E402


def ort_static(fp32_path, out_path, calibration):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": x.numpy()} for x in calibration])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def timed_cnn(entry, model, calibration, evaluation, quantized, qc_path, workdir, runs):
    x8 = entry.inputs(torch.Generator().manual_seed(7), 8)
    fp32 = os.path.join(workdir, f"{entry.name}.fp32.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x8,), fp32, input_names=["x"], dynamo=True, opset_version=20, verbose=False)
    static = os.path.join(workdir, f"{entry.name}.ort_static.onnx")
    ort_static(fp32, static, [torch.cat([c, c]) for c in calibration])
    qc.export_onnx(quantized, qc_path, example_inputs=x8)   # static batch 8, like the other two files
    sessions = {"fp32": zoo.ort_session(fp32), "qcompile": zoo.ort_session(qc_path), "ort_static": zoo.ort_session(static)}
    feeds = {k: {s.get_inputs()[0].name: x8.numpy()} for k, s in sessions.items()}
    with torch.no_grad():
        ref = model(x8)
    times = {k: [] for k in sessions}
    for _ in range(3):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    for _ in range(runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(time.perf_counter() - t)
    out = {}
    for k, s in sessions.items():
        y = torch.from_numpy(s.run(None, feeds[k])[0])
        out[k] = dict(ms=1e3 * statistics.median(times[k]), cosine=zoo.cosine(ref, y))
    counts = zoo.ort_integer_counts(static, workdir)
    out["ort_static"]["qlinearconv"] = counts.get("QLinearConv", 0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="")
    ap.add_argument("--json", default="")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, transformers {transformers.__version__}, "
          f"timm {getattr(zoo.import_timm(), '__version__', None)}")
    names = [n for n in args.models.split(",") if n] or [e.name for e in zoo.ZOO]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            entry = zoo.zoo_entry(name)
            start = time.perf_counter()
            row = zoo.run_model(entry, workdir)
            record = dict(name=name, kind=entry.kind, cosine=row.cosine, onnx_cosine=row.onnx_cosine,
                          lower_cosine=row.lower_cosine,
                          weights=list(row.weights), float_weights=row.float_weights,
                          stages={s: dict(ok=r.ok, raw=r.raw, error=r.error, seconds=r.seconds) for s, r in row.stages.items()},
                          ort_ops={k: v for k, v in row.ort_ops.items()
                                   if k in ("QLinearConv", "Conv", "FusedConv", "QLinearAdd", "Add", "QLinearMul",
                                            "MatMulIntegerToFloat", "QGemm", "Gemm", "MatMul", "FusedMatMul")})
            if entry.kind == "cnn" and not args.no_timing and row.passed("w8a8"):
                model, _, calibration, evaluation = zoo.build(entry)
                prepared = qc.prepare(model, calibration[0], "w8a8", target="ort-cpu")
                qc.calibrate(prepared, calibration, progress=False)
                try:
                    record["timing"] = timed_cnn(entry, model, calibration, evaluation, qc.convert(prepared),
                                                 os.path.join(workdir, f"{name}.b8.onnx"), workdir, args.runs)
                except Exception as e:  # noqa: BLE001 - a baseline that fails is reported, not fatal
                    record["timing_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            record["seconds"] = time.perf_counter() - start
            rows.append(record)
            print(json.dumps(record), flush=True)
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def table(rows) -> str:
    head = ("| model | w8a8 | cos FP32 | ONNX (cos ref) | lower (cos ref) | w8a8-dyn | w4a16 | weights q/all | ORT int convs | "
            "ORT int adds | ms FP32 / qc / ort static | qc x FP32 | qc x ort static |")
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    mark = lambda r: "ok" if r["ok"] else ("RAW" if r["raw"] else "fail")  # noqa: E731
    for r in rows:
        st = r["stages"]
        get = lambda s: mark(st[s]) if s in st else "-"  # noqa: E731
        ops = r["ort_ops"]
        convs = ops.get("QLinearConv", 0)
        float_convs = ops.get("Conv", 0) + ops.get("FusedConv", 0)
        adds = ops.get("QLinearAdd", 0)
        t = r.get("timing")
        speed = ratio = ratio2 = ""
        if t:
            speed = f"{t['fp32']['ms']:.2f} / {t['qcompile']['ms']:.2f} / {t['ort_static']['ms']:.2f}"
            ratio = f"{t['fp32']['ms'] / t['qcompile']['ms']:.2f}"
            ratio2 = f"{t['ort_static']['ms'] / t['qcompile']['ms']:.2f}"
        onnx = get("onnx") + (f" ({r['onnx_cosine']:.4f})" if st.get("onnx", {}).get("ok") else "")
        lines.append(f"| {r['name']} | {get('w8a8')} | {r['cosine']:.4f} | {onnx} | {get('lower')} ({r['lower_cosine']:.4f}) | {get('w8a8-dynamic')} | "
                     f"{get('w4a16')} | {r['weights'][0]}/{r['weights'][1]} | "
                     f"{convs}/{convs + float_convs} | {adds}/{adds + ops.get('Add', 0)} | {speed} | {ratio} | {ratio2} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
