#!/usr/bin/env python
"""Mixed precision evidence: training with FP32 master weights and loss scaling, and the precision pass.

    python benchmarks/mixed_precision.py [--epochs 20] [--n-eval 400] [--rounds 5] [--skip-training]

1. The digits CNN (qcompile.testing.models) trained three ways with the same seed, data, optimizer
   (Adam, one-cycle LR) and schedule as `train_digits_cnn`: FP32; BF16 storage + FP32 master weights;
   FP16 storage + FP32 master weights + DynamicLossScaler. Forward and backward run in the storage
   dtype; test accuracy is measured in that dtype too.
2. all-MiniLM-L6-v2 through `prepare_precision` (bf16, fp16, fp8 E4M3 with calibrated delayed
   scaling): mean cosine of the sentence embeddings to FP32 eager on `docstring_sentences(n_eval, 200)`,
   and the float casts in the graph before / after the cleanup pass.
3. The fp16 graph exported with torch.onnx.export(dynamo=True, opset 20) and run by onnxruntime's CPU
   provider: cosine, FP16 initializers and Cast nodes; the calibrated fp8 graph frozen (`freeze_fp8`)
   and exported at opset 21 (Cast to FLOAT8E4M3FN); FP32 ONNX for comparison; latency of one
   8 x 64 batch, median of `--rounds` interleaved runs (each round runs every method once).

Markdown tables and library versions go to stdout, progress to stderr.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import pathlib
import platform
import statistics
import sys
import tempfile
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

from qcompile.amp import DynamicLossScaler, MasterWeights
from qcompile.capture import capture
from qcompile.passes.precision import PRECISION, freeze_fp8, prepare_precision, set_fp8_calibrating
from qcompile.testing.minilm import batches, embed, load_sentence_encoder, mean_cosine
from qcompile.testing.models import DigitsCNN, accuracy, digits_data, train_digits_cnn
from qcompile.testing.text import docstring_sentences

logging.getLogger("torchao").setLevel(logging.ERROR)
THREADS = 2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_low_precision(dtype, epochs=20, seed=0, width=32, batch_size=32):
    """`train_digits_cnn` with the model stored in `dtype` and FP32 masters; loss scaling for FP16."""
    torch.manual_seed(seed)
    data = digits_data(seed)
    x_train, y_train = data[0], data[1]
    mw = MasterWeights(DigitsCNN(width), torch.optim.Adam, dtype=dtype, lr=2e-3)
    steps = epochs * -(-len(x_train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(mw.optimizer, max_lr=2e-3, total_steps=steps)
    scaler = DynamicLossScaler(enabled=dtype == torch.float16)
    for _ in range(epochs):
        mw.model.train()
        for idx in torch.randperm(len(x_train)).split(batch_size):
            mw.zero_grad()
            logits = mw.model(x_train[idx].to(dtype)).float()       # the loss in float32
            scaler.scale(nn.functional.cross_entropy(logits, y_train[idx])).backward()
            scaler.step(mw)
            scaler.update()
            sched.step()
    mw.model.eval()
    return (lambda x: mw.model(x.to(dtype)).float()), data, scaler


def training_table(epochs: int) -> None:
    rows = []
    t = time.perf_counter()
    model, data = train_digits_cnn(epochs=epochs)
    fp32 = accuracy(model, data[2], data[3])
    rows.append(("FP32", fp32, "", time.perf_counter() - t))
    log(f"fp32 {fp32:.2f}%")
    for name, dtype in (("BF16 + FP32 masters", torch.bfloat16), ("FP16 + FP32 masters + loss scaling", torch.float16)):
        t = time.perf_counter()
        fn, data, scaler = train_low_precision(dtype, epochs=epochs)
        acc = accuracy(fn, data[2], data[3])
        note = (f"final scale 2^{int(torch.log2(torch.tensor(scaler.get_scale())))}, "
                f"{scaler.skipped_steps} skipped of {len(scaler.history)} steps") if scaler.is_enabled() else ""
        rows.append((name, acc, note, time.perf_counter() - t))
        log(f"{name} {acc:.2f}%")
    print(f"\n### Digits CNN training ({epochs} epochs, seed 0, Adam + one-cycle)\n")
    print("| training | test accuracy % | vs FP32 (points) | loss scaler | train s |")
    print("|---|---|---|---|---|")
    for name, acc, note, secs in rows:
        print(f"| {name} | {acc:.2f} | {acc - fp32:+.2f} | {note} | {secs:.0f} |")


def _ort_session(path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _export(gm, example, path, opset=20):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(gm, example, dynamo=True, opset_version=opset, verbose=False)
    import onnx
    model = prog.model_proto
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    fp16 = sum(1 for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16)
    ops["Cast to FLOAT8E4M3FN"] = sum(1 for n in model.graph.node if n.op_type == "Cast"
                                      for a in n.attribute if a.name == "to" and a.i == onnx.TensorProto.FLOAT8E4M3FN)
    sess = _ort_session(path)
    names = [i.name for i in sess.get_inputs()]

    def run(ids, mask):
        return torch.from_numpy(sess.run(None, {names[0]: ids.numpy(), names[1]: mask.numpy()})[0]).float()
    return run, ops, fp16


def minilm_tables(n_eval: int, rounds: int) -> None:
    encoder = load_sentence_encoder()
    evaluation = batches(docstring_sentences(n_eval, 200))
    calibration = batches(docstring_sentences(64, 0))
    ref = embed(encoder, evaluation)
    methods, casts, notes = {"FP32 eager": encoder}, {}, {}
    for recipe in ("bf16", "fp16", "fp8"):
        log(f"prepare {recipe}")
        gm = capture(encoder, evaluation[0])
        prepare_precision(gm, recipe)
        if recipe == "fp8":
            embed(gm, calibration)                 # fills the amax histories (delayed scaling)
            set_fp8_calibrating(gm, False)
        summary = gm.meta[PRECISION]
        if "remove_redundant_casts" in summary:
            casts[recipe] = summary["remove_redundant_casts"]
            notes[recipe] = (f"{summary['precision']['low']} low ops, {summary['precision']['fp32']} fp32 ops, "
                             f"{summary['precision']['weights_converted']} weights stored {recipe}")
        else:
            notes[recipe] = (f"{summary['fp8_fake_quant']['weights_fp8']} weights on the E4M3 grid, "
                             f"{summary['fp8_fake_quant']['activation_fake_quants']} activation fake-quants")
        methods[f"qcompile {recipe} graph"] = gm
    onnx_notes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, recipe in (("ONNX FP32 (ORT CPU)", None), ("ONNX fp16 graph (ORT CPU)", "fp16"),
                              ("ONNX fp8 graph, frozen, opset 21 (ORT CPU)", "fp8")):
            log(f"export {label}")
            gm = capture(encoder, evaluation[0])
            if recipe:
                prepare_precision(gm, recipe)
            if recipe == "fp8":
                embed(gm, calibration)
                freeze_fp8(gm)                      # constant scales, float8 casts
            try:
                run, ops, fp16 = _export(gm, evaluation[0], pathlib.Path(tmp) / f"{recipe or 'fp32'}.onnx",
                                         opset=21 if recipe == "fp8" else 20)
            except Exception as e:                  # report, do not crash the other rows
                onnx_notes[label] = f"export failed: {type(e).__name__}: {str(e)[:120]}"
                continue
            methods[label] = run
            onnx_notes[label] = (f"{fp16} FP16 initializers, {ops['Cast']} Cast ({ops['Cast to FLOAT8E4M3FN']} to "
                                 f"FLOAT8E4M3FN), {ops['MatMul']} MatMul nodes")
        log("evaluate")
        cos = {name: mean_cosine(embed(fn, evaluation), ref) for name, fn in methods.items()}
        log("time")
        times = collections.defaultdict(list)
        one = evaluation[0]
        with torch.no_grad():
            for fn in methods.values():
                fn(*one)                            # warm-up
            for _ in range(rounds):
                for name, fn in methods.items():
                    t = time.perf_counter()
                    fn(*one)
                    times[name].append(1e3 * (time.perf_counter() - t))
    print(f"\n### all-MiniLM-L6-v2, {len(evaluation) * 8} sentences (docstring_sentences({n_eval}, 200)), 8 x 64 tokens\n")
    print("| method | mean cosine to FP32 | median ms / batch | min ms | notes |")
    print("|---|---|---|---|---|")
    for name in methods:
        recipe = name.split()[1] if name.startswith("qcompile") else None
        note = notes.get(recipe, onnx_notes.get(name, ""))
        print(f"| {name} | {cos[name]:.7f} | {statistics.median(times[name]):.1f} | {min(times[name]):.1f} | {note} |")
    for label, note in onnx_notes.items():
        if label not in methods:
            print(f"| {label} | - | - | - | {note} |")
    print("\n### Float casts in the MiniLM graph (the model itself has none)\n")
    print("| recipe | after precision pass | after cleanup | merged duplicates | folded exact chains | no-op casts |")
    print("|---|---|---|---|---|---|")
    for recipe, s in casts.items():
        print(f"| {recipe} | {s['casts_before']} | {s['casts_after']} | {s['merged_duplicates']} | "
              f"{s['folded_chains']} | {s['removed_noop']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--n-eval", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    import onnxruntime
    import transformers
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, transformers {transformers.__version__}, "
          f"python {platform.python_version()}, {THREADS} threads, load average {os.getloadavg()[0]:.1f}")
    if not args.skip_training:
        training_table(args.epochs)
    if not args.skip_minilm:
        minilm_tables(args.n_eval, args.rounds)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
