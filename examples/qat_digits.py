"""QAT on the digits CNN: PTQ vs QAT for W8A8, W4A8, W3A8 and W2A8, then ONNX export of a QAT model.

    python examples/qat_digits.py                 # the table, about two minutes on 2 cores
    python examples/qat_digits.py --epochs 5 --seed 1

W8A8 and W4A8 are the named recipes (per-channel symmetric weights, static uint8 activations).
W3A8 and W2A8 use per-tensor symmetric 3- and 2-bit weights, where round-to-nearest PTQ collapses
and QAT has real work to do; those rows train LSQ scales (`learn_scales=True`).
QAT starts from the pretrained FP32 model and from PTQ-calibrated ranges (qc.calibrate), trains with
Adam, freezes BatchNorm statistics for the last epoch, and is measured after qc.convert: the numbers
are those of the reference QDQ graph, not of the fake-quant model.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

import qcompile as qc
from qcompile.testing.models import accuracy, train_digits_cnn

BATCH = 32


def rows() -> list[tuple[str, qc.Recipe, bool]]:
    w8a8 = qc.recipes["w8a8"]
    per_tensor = lambda dtype: qc.QuantSpec(dtype, qc.PerTensor(), symmetric=True)
    return [
        ("W8A8", w8a8, False),
        ("W4A8", qc.recipes["w4a8"], False),
        ("W3A8", w8a8.replace(name="w3a8", weight=per_tensor("int3")), True),
        ("W2A8", w8a8.replace(name="w2a8", weight=per_tensor("int2")), True),
    ]


def batches(x: torch.Tensor, n: int = 8) -> list[torch.Tensor]:
    return [x[i:i + BATCH] for i in range(0, n * BATCH, BATCH)]


def qat(model, recipe, learn_scales, data, epochs, seed, lr):
    x_train, y_train = data[0], data[1]
    dims = ({0: torch.export.Dim("batch", min=2, max=1024)},)
    m = qc.prepare_qat(model, (x_train[:BATCH],), recipe, learn_scales=learn_scales, dynamic_shapes=dims)
    qc.calibrate(m, batches(x_train), progress=False)  # start from PTQ ranges
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    steps = epochs * (len(x_train) // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        if epoch == epochs - 1:
            qc.freeze_bn(m)
        m.train()
        for idx in torch.randperm(len(x_train), generator=gen).split(BATCH):
            if len(idx) < BATCH:
                continue
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x_train[idx]), y_train[idx]).backward()
            opt.step()
            sched.step()
    m.eval()
    return m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rows", default="W8A8,W4A8,W3A8,W2A8")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"torch {torch.__version__}, qcompile {qc.__version__}, seed {args.seed}, QAT epochs {args.epochs}")
    start = time.time()
    model, data = train_digits_cnn(seed=args.seed)
    x_train, _, x_test, y_test = data
    fp32 = accuracy(model, x_test, y_test)
    print(f"\n| model | PTQ | QAT ({args.epochs} epochs) | QAT eval before convert |\n|---|---|---|---|")
    print(f"| FP32 | {fp32:.2f} | | |")
    last_qat = None
    wanted = args.rows.split(",")
    for name, recipe, learn in rows():
        if name not in wanted:
            continue
        prepared = qc.prepare(model, (x_train[:128],), recipe)
        qc.calibrate(prepared, [x_train[i:i + 128] for i in range(0, 512, 128)], progress=False)
        ptq = accuracy(qc.convert(prepared), x_test, y_test)
        trained = qat(model, recipe, learn, data, args.epochs, args.seed, args.lr)
        eval_acc = accuracy(trained, x_test, y_test)
        last_qat = qc.convert(trained)
        converted = accuracy(last_qat, x_test, y_test)
        lsq = " (LSQ)" if learn else ""
        print(f"| {name}{lsq} | {ptq:.2f} | {converted:.2f} | {eval_acc:.2f} |", flush=True)
    if last_qat is not None:
        path = os.path.join(tempfile.mkdtemp(), "qat_digits.onnx")
        qc.export_onnx(last_qat, path)
        import onnxruntime as ort

        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        xb = x_test[:128]
        onnx_pred = sess.run(None, {name: xb.numpy()})[0].argmax(1)
        ref_pred = last_qat(xb).argmax(1).numpy()
        print(f"\nONNX export of the last QAT model: {path} ({os.path.getsize(path)} bytes); "
              f"onnxruntime and the reference graph agree on {100 * (onnx_pred == ref_pred).mean():.1f}% of 128 predictions")
    print(f"total {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
