#!/usr/bin/env python
"""onnxruntime latency / size / accuracy: FP32 ONNX vs qcompile QDQ ONNX vs onnxruntime's quantize_static.

    python benchmarks/onnx_runtime.py [--rounds 20] [--n-eval 400] [--skip-minilm] [--skip-digits]

all-MiniLM-L6-v2, sequence 128, batch 1 and 8: calibration on ``docstring_sentences(200, 0)``,
evaluation (mean / min cosine of the sentence embeddings to the FP32 ONNX embeddings) on
``docstring_sentences(n_eval, 200)`` at batch 8.  Every ONNX file is exported with a dynamic batch
dimension so that the same file serves batch 1 and 8.

Digits CNN (``train_digits_cnn``): test accuracy, latency at batch 128 (static shapes).

Methods: FP32 ONNX (dynamo exporter, opset 20); qcompile ``w8a8`` (alone, with SmoothQuant, with
the outlier split on every linear), ``w8a8`` with ``target="ort-cpu"`` (the profile picks the ops
and algorithms; also as a static batch-8 file) and ``w8a8-dynamic`` (``qc.export_onnx``); onnxruntime ``quantize_static`` in QDQ format, per-channel int8 weights,
uint8 activations, MinMax calibration on the same calibration data: (a) all MatMuls (MiniLM) / all
default op types (CNN), (b) MiniLM only: the best config of ``benchmarks/minilm_ptq.py`` (the 30
Linear MatMuls except the 6 FFN down-projections).

Latency: median (and min) of ``--rounds`` interleaved runs (each round runs every method once),
onnxruntime with 2 intra-op threads, spinning off, default graph optimizations (ORT_ENABLE_ALL);
MiniLM rows marked "SkipLayerNormFusion off" run the same file with that one transformer disabled.
The markdown tables and versions go to stdout, progress to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import pathlib
import statistics
import sys
import tempfile
import time
import traceback
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_REPO = pathlib.Path(__file__).resolve().parent.parent
for p in (str(_REPO), str(_REPO / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np
import torch

from minilm_ptq import _calib_reader, _versions, log, one_line  # reuse: same reader / versions
from qcompile.testing.minilm import batches, load_sentence_encoder
from qcompile.testing.text import docstring_sentences

THREADS = 2
SEQ_LEN = 128
N_CALIB = 200


def session(path: str, disabled_optimizers=()):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers))


NO_SKIP_LN = ("SkipLayerNormFusion",)


def without_skip_layer_norm(m: "Method") -> "Method":
    """The same file in a session without onnxruntime's SkipLayerNormFusion (its fused kernel was
    slower than Add + LayerNorm on this machine's CPU)."""
    twin = Method(f"{m.name}, SkipLayerNormFusion off")
    twin.path, twin.static_batch = m.path, m.static_batch
    if m.sess is not None:
        twin.sess = session(m.path, NO_SKIP_LN)
    twin.notes.append("same file" if m.sess is not None else "no file")
    return twin


class Method:
    def __init__(self, name: str):
        self.name = name
        self.path: str | None = None
        self.sess = None
        self.notes: list[str] = []
        self.metric: float | None = None
        self.metric_min: float | None = None
        self.lat: dict[str, tuple[float, float]] = {}
        self.static_batch: int | None = None   # a file exported with a fixed batch size runs only that one

    @property
    def size_mb(self):
        """The .onnx file plus the external-data files it references (the dynamo exporter writes
        large FP32 weights next to the model as `<name>.onnx.data`)."""
        if self.path is None or not os.path.exists(self.path):
            return None
        import onnx

        size = os.path.getsize(self.path)
        model = onnx.load(self.path, load_external_data=False)
        folder = os.path.dirname(self.path)
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        return (size + sum(os.path.getsize(os.path.join(folder, loc)) for loc in locations)) / 1e6


def build(method: Method, fn) -> None:
    t0 = time.perf_counter()
    try:
        fn()
        method.sess = session(method.path)
        method.notes.append(f"build {time.perf_counter() - t0:.0f}s")
    except Exception as e:  # report, never crash the benchmark
        log(f"{method.name} failed:\n{traceback.format_exc()}")
        method.notes.append(f"error: {one_line(e)}")
        method.sess = None
    log(f"{method.name}: {method.notes}")


def time_interleaved(methods: list[Method], feeds: dict, key: str, rounds: int) -> None:
    batch = len(next(iter(feeds.values())))
    live = [m for m in methods if m.sess is not None and m.static_batch in (None, batch)]
    for m in live:
        for _ in range(3):
            m.sess.run(None, feeds)
    times = {m.name: [] for m in live}
    for _ in range(rounds):
        for m in live:
            t0 = time.perf_counter()
            m.sess.run(None, feeds)
            times[m.name].append(time.perf_counter() - t0)
    for m in live:
        m.lat[key] = (1e3 * statistics.median(times[m.name]), 1e3 * min(times[m.name]))


def qcompile_export(model, example, calib, recipe, path: str, dynamic_shapes="batch", algorithms=(),
                    target=None) -> None:
    import qcompile as qc

    prepared = qc.prepare(copy.deepcopy(model), example, recipe=recipe, dynamic_shapes=dynamic_shapes,
                          algorithms=list(algorithms), target=target)
    qc.calibrate(prepared, calib)
    qc.export_onnx(qc.convert(prepared), path)


def _f(x, spec):
    return "—" if x is None else format(x, spec)


# --------------------------------------------------------------------------- MiniLM

def minilm(tmp: str, rounds: int, n_eval: int) -> list[Method]:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    calib_sents = docstring_sentences(N_CALIB, 0)
    eval_sents = docstring_sentences(n_eval, N_CALIB)
    calib = batches(calib_sents, 8, SEQ_LEN)
    evalb = batches(eval_sents, 8, SEQ_LEN)
    encoder = load_sentence_encoder()
    batch = torch.export.Dim("batch", min=1, max=64)
    dyn = {"input_ids": {0: batch}, "attention_mask": {0: batch}}

    fp32, qw8a8, qsq, qsplit, qprof, qstatic, qdyn, ort_all, ort_best = methods = [
        Method("FP32 ONNX"), Method("qcompile w8a8"), Method("qcompile w8a8 + smoothquant"),
        Method("qcompile w8a8 + outlier_split + smoothquant"),
        Method("qcompile w8a8, target='ort-cpu'"), Method("qcompile w8a8, target='ort-cpu', static batch 8"),
        Method("qcompile w8a8-dynamic"),
        Method("ORT quantize_static, all MatMuls, per-channel"),
        Method("ORT quantize_static, best config (30 Linear MatMuls)")]
    fp32.path = os.path.join(tmp, "minilm_fp32.onnx")

    def export_fp32():
        torch.onnx.export(encoder, calib[0], fp32.path, opset_version=20, dynamo=True, optimize=True,
                          verbose=False, dynamic_shapes=dyn, input_names=["input_ids", "attention_mask"],
                          output_names=["sentence_embedding"])
    build(fp32, export_fp32)
    fp32.notes.append("dynamo exporter, opset 20")

    for i, (m, recipe, algorithms, target) in enumerate((
            (qw8a8, "w8a8", (), None), (qsq, "w8a8", ("smoothquant",), None),
            (qsplit, "w8a8", ("outlier_split", "smoothquant"), None),
            (qprof, "w8a8", (), "ort-cpu"), (qstatic, "w8a8", (), "ort-cpu"),
            (qdyn, "w8a8-dynamic", (), None))):
        m.path = os.path.join(tmp, f"minilm_{i}.onnx")
        shapes = None if m is qstatic else "batch"     # prepare's default: a dynamic batch
        build(m, lambda m=m, recipe=recipe, algorithms=algorithms, target=target, shapes=shapes: qcompile_export(
            encoder, calib[0], calib, recipe, m.path, shapes, algorithms, target))
    qstatic.static_batch = 8
    qstatic.notes.append("static shapes: the file onnxruntime's MatMulAddFusion would turn into float Gemms "
                         "without the [1, N] bias rewrite")
    qprof.notes.append("the profile's recipe: linears (matmuls of attention float), outlier_split "
                       "select='attention' (q/k/v), smoothquant")

    if fp32.sess is not None:
        model = onnx.load(fp32.path)
        shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
        matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
        const_b = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in shapes]
        cfg = encoder.bert.config
        down = {n.name for n in model.graph.node if n.op_type == "MatMul"
                and shapes.get(n.input[1]) == (cfg.intermediate_size, cfg.hidden_size)}
        del model
        common = dict(quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"], per_channel=True,
                      activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        for m, nodes, note in (
                (ort_all, matmuls, f"QDQ, MinMax, u8 act, {len(matmuls)} MatMuls (attention too)"),
                (ort_best, [n for n in const_b if n not in down],
                 f"QDQ, MinMax, u8 act, {len(const_b) - len(down)} of {len(const_b)} Linear MatMuls; "
                 f"{len(down)} FFN down-proj FP32")):
            m.path = os.path.join(tmp, f"minilm_{len(m.name)}_static.onnx")
            build(m, lambda m=m, nodes=nodes: quantize_static(
                fp32.path, m.path, _calib_reader(calib), nodes_to_quantize=nodes, **common))
            m.notes.append(note)
    else:
        for m in (ort_all, ort_best):
            m.notes.append("needs the FP32 ONNX file")

    methods += [without_skip_layer_norm(m) for m in (fp32, qprof, qstatic, ort_best)]

    def run(m, b):
        return m.sess.run(None, {"input_ids": b[0].numpy(), "attention_mask": b[1].numpy()})[0]

    if fp32.sess is not None:
        t0 = time.perf_counter()
        ref = np.concatenate([run(fp32, b) for b in evalb])
        for m in methods:
            if m.sess is None:
                continue
            try:
                got = np.concatenate([run(m, b) for b in evalb]).astype(np.float64)
                cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
                m.metric, m.metric_min = float(cos.mean()), float(cos.min())
            except Exception as e:
                m.notes.append(f"error at evaluation: {one_line(e)}")
                m.sess = None
        log(f"MiniLM cosine evaluation took {time.perf_counter() - t0:.0f}s")

    for bs in (1, 8):
        ids, mask = evalb[0][0][:bs], evalb[0][1][:bs]
        time_interleaved(methods, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, f"b{bs}", rounds)
    return methods


# --------------------------------------------------------------------------- digits CNN

def digits(tmp: str, rounds: int) -> list[Method]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from qcompile.testing.models import train_digits_cnn

    model, (x_train, _, x_test, y_test) = train_digits_cnn()
    bs = 128
    calib = [x_train[i:i + bs] for i in range(0, len(x_train) - bs + 1, bs)]
    fp32, qw8a8, qprof, qstatic, qdyn, ort_pc = methods = [
        Method("FP32 ONNX"), Method("qcompile w8a8"), Method("qcompile w8a8, target='ort-cpu'"),
        Method("qcompile w8a8, target='ort-cpu', static batch 128"),
        Method("qcompile w8a8-dynamic"), Method("ORT quantize_static, per-channel")]
    fp32.path = os.path.join(tmp, "cnn_fp32.onnx")
    build(fp32, lambda: torch.onnx.export(model, (calib[0],), fp32.path, opset_version=20, dynamo=True,
                                          optimize=True, verbose=False, input_names=["x"]))
    for i, (m, recipe, target) in enumerate(((qw8a8, "w8a8", None), (qprof, "w8a8", "ort-cpu"),
                                             (qstatic, "w8a8", "ort-cpu"), (qdyn, "w8a8-dynamic", None))):
        m.path = os.path.join(tmp, f"cnn_{i}_{recipe}_{target}.onnx")
        shapes = None if m is qstatic else "batch"
        build(m, lambda m=m, recipe=recipe, target=target, shapes=shapes: qcompile_export(
            model, calib[0], calib, recipe, m.path, shapes, target=target))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"x": b.numpy()}

    ort_pc.path = os.path.join(tmp, "cnn_ort_static.onnx")
    if fp32.sess is not None:
        build(ort_pc, lambda: quantize_static(fp32.path, ort_pc.path, Reader(), quant_format=QuantFormat.QDQ,
                                              per_channel=True, activation_type=QuantType.QUInt8,
                                              weight_type=QuantType.QInt8))
        ort_pc.notes.append("QDQ, MinMax, u8 act, default op types")

    xs = torch.cat([x_test, x_test.new_zeros(-len(x_test) % bs, *x_test.shape[1:])])
    for m in methods:
        if m.sess is None:
            continue
        name = m.sess.get_inputs()[0].name
        logits = np.concatenate([m.sess.run(None, {name: xs[i:i + bs].numpy()})[0]
                                 for i in range(0, len(xs), bs)])[:len(x_test)]
        m.metric = 100.0 * float((logits.argmax(1) == y_test.numpy()).mean())
    live = [m for m in methods if m.sess is not None]
    # input names differ between the exports only if an exporter renamed them; feed by position
    feeds_x = xs[:bs].numpy()
    for m in live:
        m._feeds = {m.sess.get_inputs()[0].name: feeds_x}
    for m in live:
        for _ in range(3):
            m.sess.run(None, m._feeds)
    times = {m.name: [] for m in live}
    for _ in range(rounds):
        for m in live:
            t0 = time.perf_counter()
            m.sess.run(None, m._feeds)
            times[m.name].append(time.perf_counter() - t0)
    for m in live:
        m.lat[f"b{bs}"] = (1e3 * statistics.median(times[m.name]), 1e3 * min(times[m.name]))
    return methods


# --------------------------------------------------------------------------- main

def table(methods: list[Method], keys: list[str], metric: str, fmt: str) -> None:
    base = methods[0]
    head = " | ".join(f"{k} ms median (min) | {k} speedup" for k in keys)
    print(f"| method | {head} | file MB | {metric} | notes |")
    print("|---|" + "---:|---:|" * len(keys) + "---:|---:|---|")
    for m in methods:
        cells = []
        for k in keys:
            if k in m.lat:
                med, mn = m.lat[k]
                sp = base.lat[k][0] / med if k in base.lat else None
                cells += [f"{med:.2f} ({mn:.2f})", f"{_f(sp, '.2f')}x"]
            else:
                cells += ["—", "—"]
        met = _f(m.metric, fmt) + ("" if m.metric_min is None else f" (min {m.metric_min:.4f})")
        notes = "; ".join(m.notes).replace("|", "\\|")
        print(f"| {m.name} | {' | '.join(cells)} | {_f(m.size_mb, '.3f')} | {met} | {notes} |")
    print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--n-eval", type=int, default=400)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-digits", action="store_true")
    args = ap.parse_args(argv)
    rounds = max(20, args.rounds)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnx_runtime_") as tmp:
        with contextlib.redirect_stdout(sys.stderr):
            mini = None if args.skip_minilm else minilm(tmp, rounds, args.n_eval)
            dig = None if args.skip_digits else digits(tmp, rounds)
        if mini:
            print(f"## all-MiniLM-L6-v2, sequence {SEQ_LEN}, onnxruntime CPU, {THREADS} threads\n")
            print(f"Calibration {N_CALIB} sentences, cosine to FP32 ONNX on {args.n_eval} other sentences; "
                  f"latency median (min) of {rounds} interleaved runs.\n")
            table(mini, ["b1", "b8"], "cosine to FP32 mean", ".4f")
        if dig:
            print(f"## digits CNN, batch 128, onnxruntime CPU, {THREADS} threads\n")
            table(dig, ["b128"], "test accuracy %", ".2f")
    print("| package | version |\n|---|---|")
    for name, ver in _versions():
        print(f"| {name} | {ver} |")
    log(f"total {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
