"""The default job: train a small CNN on scikit-learn's digits, quantize it to W8A8 with qcompile,
print accuracy, size and latency before and after and the quantized graph's report, then export
QDQ ONNX and check onnxruntime against the reference graph tensor by tensor.

    make demo          # or: python examples/digits_ptq.py
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

import qcompile as qc
from qcompile.testing.models import accuracy, train_digits_cnn


def size_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer: int8 weights count one byte per element."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def median_latency_ms(modules: dict, x: torch.Tensor, runs: int = 30) -> dict:
    """Median of interleaved runs, so load on this shared machine hits every module alike."""
    times = {name: [] for name in modules}
    with torch.no_grad():
        for _ in range(runs):
            for name, m in modules.items():
                start = time.perf_counter()
                m(x)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    torch.set_num_threads(2)
    print("training the digits CNN in FP32 ...")
    model, (x_train, _, x_test, y_test) = train_digits_cnn()
    prepared = qc.prepare(model, x_train[:128], recipe="w8a8")
    qc.calibrate(prepared, [x_train[i:i + 128] for i in range(0, 1024, 128)])
    quantized = qc.convert(prepared)

    rows = {"FP32": model, "W8A8 (reference QDQ graph)": quantized}
    latency = median_latency_ms(rows, x_test[:128])
    print(f"\n{'model':<28} {'accuracy':>9} {'size':>10} {'latency (batch 128)':>20}")
    for name, m in rows.items():
        print(f"{name:<28} {accuracy(m, x_test, y_test):>8.2f}% {size_bytes(m) / 1024:>8.1f}KB {latency[name]:>17.2f} ms")
    print("\nThe reference graph simulates integer arithmetic with float ops (quantize -> dequantize ->\n"
          "float conv): it is the exact golden model that backends are checked against, not the fast path.\n")
    print(qc.inspect(quantized))

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "digits_w8a8.onnx")
        qc.export_onnx(quantized, path)
        print(f"\nQDQ ONNX: {os.path.getsize(path) / 1024:.1f} KB; onnxruntime vs the reference graph:")
        print(qc.verify(quantized, path, [x_test[i:i + 128] for i in range(0, 384, 128)]))


if __name__ == "__main__":
    main()
