"""Issue 20, export: a weight shared by several ops (ALBERT applies one layer N times) reached them
through one DequantizeLinear -> Transpose after the exporter's CSE, and onnxruntime fused 1 of
ALBERT's 13 linears; `weight_dq_per_consumer` gives each consumer its own. And T5 with SDPA fails
inside the dynamo exporter: the ExportError now says to use eager attention.
"""
from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile as qc

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")


class SharedLayer(nn.Module):
    """One linear applied three times (ALBERT's weight sharing), with a LayerNorm between."""

    def __init__(self):
        super().__init__()
        self.fc, self.ln = nn.Linear(16, 16), nn.LayerNorm(16)

    def forward(self, x):
        for _ in range(3):
            x = self.ln(x + self.fc(x))
        return x


def optimized_counts(path, tmp_path) -> Counter:
    out = tmp_path / "opt.onnx"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(out)).graph.node)


def test_shared_weight_gets_a_dequantize_per_consumer_and_all_linears_fuse(tmp_path):
    torch.manual_seed(0)
    model = SharedLayer().eval()
    x = torch.randn(2, 5, 16)
    prepared = qc.prepare(model, x, "w8a8", target="ort-cpu")
    qc.calibrate(prepared, [torch.randn(2, 5, 16) for _ in range(3)], progress=False)
    quantized = qc.convert(prepared)
    proto = qc.export_onnx(quantized, tmp_path / "m.onnx")
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                 and n.input[0] in {i.name for i in proto.graph.initializer} and n.input[0].startswith("qc_w")]
    assert len(weight_dq) == 3 and len({n.input[0] for n in weight_dq}) == 1   # one tensor, three readers
    counts = optimized_counts(tmp_path / "m.onnx", tmp_path)
    assert counts["MatMulIntegerToFloat"] == 3 and counts["MatMul"] == 0 and counts["Gemm"] == 0
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = quantized(x)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert float(F.cosine_similarity(got.flatten(), want.flatten(), dim=0)) > 0.999


class SDPAttention(nn.Module):
    """T5's attention tail: SDPA, then transpose(1, 2).contiguous().view(b, -1, d)."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.qkv, self.o, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).contiguous().view(b, -1, d))


def test_sdpa_export_failure_says_to_use_eager_attention(tmp_path):
    torch.manual_seed(0)
    model = SDPAttention().eval()
    x = torch.randn(2, 6, 32)
    prepared = qc.prepare(model, x, "w8a8")
    qc.calibrate(prepared, [torch.randn(2, 6, 32) for _ in range(2)], progress=False)
    quantized = qc.convert(prepared)
    try:
        qc.export_onnx(quantized, tmp_path / "m.onnx")
    except qc.ExportError as e:
        assert "scaled_dot_product_attention" in str(e) and "attn_implementation='eager'" in str(e)
    else:
        pytest.skip("this torch exports this SDPA pattern; the hint is checked on T5 in tests/test_zoo.py")
