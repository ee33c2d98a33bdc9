"""ONNX target profiles (Q/DQ placement), provider selection, and export of a QAT model."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import qcompile as qc
from qcompile.backends.onnx import ort_session
from qcompile.backends.onnx.providers import choose_providers
from qcompile.testing.models import DigitsCNN

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cnn_and_input():
    torch.manual_seed(0)
    return DigitsCNN(8).eval(), torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _quantized(model, x, recipe):
    prepared = qc.prepare(model, (x,), recipe)
    qc.calibrate(prepared, [x], progress=False)
    return qc.convert(prepared)


def _activation_pairs(proto):
    """(QuantizeLinear count, consumers per activation DequantizeLinear)."""
    consumers = Counter()
    producers = {o: n for n in proto.graph.node for o in n.output}
    for n in proto.graph.node:
        for i in n.input:
            p = producers.get(i)
            if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in producers:
                consumers[p.name] += 1
    return sum(n.op_type == "QuantizeLinear" for n in proto.graph.node), consumers


def test_tensorrt_target_gives_each_consumer_its_own_symmetric_pair(cnn_and_input, tmp_path):
    model, x = cnn_and_input
    quantized = _quantized(model, x, "w8a8-tensorrt")
    ort_cpu = qc.export_onnx(quantized, tmp_path / "ort.onnx")
    trt = qc.export_onnx(quantized, tmp_path / "trt.onnx", target="tensorrt")
    q_ort, consumers_ort = _activation_pairs(ort_cpu)
    q_trt, consumers_trt = _activation_pairs(trt)
    # DigitsCNN: the stem's output feeds the block conv and the residual add; the add's output feeds
    # two pools... The ort-cpu file shares those pairs, the tensorrt file splits them.
    assert max(consumers_ort.values()) >= 2
    assert set(consumers_trt.values()) == {1}
    assert q_trt - q_ort == sum(c - 1 for c in consumers_ort.values())
    inits = {init.name: init for init in trt.graph.initializer}
    zero_points = {n.input[2] for n in trt.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert zero_points and all(np.all(_array(inits[z]) == 0) and inits[z].data_type == 3 for z in zero_points)  # INT8 0
    session = ort_session(tmp_path / "trt.onnx")
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(out, quantized(x), rtol=0, atol=_one_code_at_the_head(quantized))


def _array(init):
    import onnx.numpy_helper

    return onnx.numpy_helper.to_array(init)


def test_tensorrt_target_refuses_asymmetric_and_dynamic_graphs(cnn_and_input, tmp_path):
    model, x = cnn_and_input
    with pytest.raises(qc.ExportError, match="symmetric int8 activations"):
        qc.export_onnx(_quantized(model, x, "w8a8"), tmp_path / "a.onnx", target="tensorrt")
    lin = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    dyn = _quantized(lin, torch.randn(4, 8), "w8a8-dynamic")
    with pytest.raises(qc.ExportError, match="per-token"):
        qc.export_onnx(dyn, tmp_path / "b.onnx", target="tensorrt")
    with pytest.raises(qc.ExportError, match="unknown export target"):
        qc.export_onnx(dyn, tmp_path / "c.onnx", target="openvino")


def test_provider_selection():
    cpu_only = ["CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(None, cpu_only) == cpu_only
    assert choose_providers("auto", cpu_only) == cpu_only
    assert choose_providers("auto", gpu) == gpu
    assert choose_providers("cuda", gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("tensorrt", gpu) == gpu
    with pytest.raises(qc.QCompileError, match="onnxruntime-gpu"):
        choose_providers("cuda", cpu_only)
    with pytest.raises(qc.QCompileError, match="unknown provider"):
        choose_providers("rocm", gpu)
    import onnxruntime as ort  # this machine: the CPU provider only, and "auto" must pick it

    session = ort_session(_tiny_onnx(), providers="auto")
    assert session.get_providers() == choose_providers("auto", ort.get_available_providers())


def _tiny_onnx() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]).SerializeToString()


def test_qat_model_exports_and_runs_in_onnxruntime(cnn_and_input, tmp_path):
    model, x = cnn_and_input
    qat = qc.prepare_qat(model, (x,), "w4a8")
    opt = torch.optim.SGD(qat.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        qat(x).square().mean().backward()
        opt.step()
    quantized = qc.convert(qat.eval())
    proto = qc.export_onnx(quantized, tmp_path / "qat.onnx")
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["BatchNormalization"] == 0 and ops["QuantizeLinear"] == 7 and ops["Conv"] == 3
    session = ort_session(tmp_path / "qat.onnx")
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(out, quantized(x), rtol=0, atol=_one_code_at_the_head(quantized))


def _one_code_at_the_head(quantized) -> float:
    """The logits are float (the head's output is not quantized): if every input code of the head
    moved by one step, a logit moves by at most s_in * max_row sum|W|. The bound used is that."""
    from qcompile.graph import LINEAR, get_param, is_op

    head = next(n for n in quantized.graph.nodes if is_op(n, LINEAR))
    x_dq, w_dq = head.args[0], head.args[1]
    while x_dq.target != torch.ops.qcompile.dequantize.default:  # through flatten / pooling
        x_dq = x_dq.args[0]
    s_in = float(get_param(quantized, x_dq.args[1]))
    w = torch.ops.qcompile.dequantize(*[get_param(quantized, a) if isinstance(a, torch.fx.Node) else a
                                        for a in w_dq.args])
    return s_in * float(w.abs().sum(1).max())
