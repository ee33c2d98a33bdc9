"""qc.compare: per-node float-vs-quantized error, checked against float64 hand computations and
against a planted bad scale, which must show up as the first diverging node of its layer."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import qcompile as qc
from qcompile.debug.compare import compare
from qcompile.errors import InvalidModelError
from qcompile.testing.tolerances import U32

qops = torch.ops.qcompile


@pytest.fixture(scope="module")
def w8a8(digits, one_thread):
    model, (x_train, *_) = digits
    calib = [x_train[i:i + 64] for i in range(0, 512, 64)]
    prepared = qc.prepare(model, calib[0], recipe="w8a8")
    qc.calibrate(prepared, calib, progress=False)
    return model, prepared, qc.convert(prepared), calib


def _sqnr(f: torch.Tensor, q: torch.Tensor) -> float:
    f, q = f.double(), q.double()
    return 10 * math.log10(float((f * f).sum()) / float(((q - f) ** 2).sum()))


def test_rows_agree_with_float64(w8a8):
    model, prepared, quantized, calib = w8a8
    report = compare(model, quantized, calib[:2])
    # the input row: x against dequantize(quantize(x)) written out here with the graph's own qparams
    # (the codes in float32 as the reference graph rounds them; the sums in float64)
    q0 = next(n for n in quantized.graph.nodes if n.target == qops.quantize.default and n.args[0].op == "placeholder")
    s, z = getattr(quantized, q0.args[1].target).float(), getattr(quantized, q0.args[2].target).float()
    xs = torch.cat(calib[:2])
    dq = (torch.clamp(torch.round(xs / s) + z, 0, 255) - z) * s
    row = report[q0.name]
    assert row.kind == "activation" and row.module == "stem.0"
    assert row.sqnr_db == pytest.approx(_sqnr(xs, dq), abs=1e-6)
    assert row.max_err_scales <= 0.5 + 4 * U32 * 255
    # the head's weight (no BatchNorm folded into it): dequantized codes against the FP32 weight
    w = model.head.weight.detach()
    wrow = next(r for r in report.rows if r.kind == "weight" and r.module == "head")
    codes = getattr(quantized, wrow.name).double()
    ws = getattr(quantized, wrow.name + "_scale").double()
    assert wrow.sqnr_db == pytest.approx(_sqnr(w, codes * ws[:, None]), abs=1e-6)
    assert wrow.clipped_fraction == 0.0 and wrow.max_err_scales <= 0.5 + 4 * U32 * 127
    # the output summary: a direct run of both graphs (the float one has BatchNorm folded, as the
    # quantized graph does; a copy, since running it feeds its observers)
    direct = torch.cat([quantized(b) for b in calib[:2]]).detach()
    float_graph = copy.deepcopy(prepared)
    ref = torch.cat([float_graph(b) for b in calib[:2]]).detach()
    assert report.output.sqnr_db == pytest.approx(_sqnr(ref, direct), abs=1e-6)
    assert report.first_divergence() is None  # INT8 everywhere: no node below 20 dB
    assert [r.module for r in report.rows if r.kind == "weight"] == ["stem.0", "block.0", "branch.0", "head"]


@pytest.mark.parametrize("plant", ["activation", "weight"])
def test_planted_bad_scale_is_the_first_divergence(w8a8, plant):
    model, prepared, quantized, calib = w8a8
    bad = copy.deepcopy(quantized)
    if plant == "activation":
        # the scale of block.0's input shrunk 20x: most of that tensor clips
        q = next(n for n in bad.graph.nodes if n.target == qops.quantize.default and
                 any(u.target == torch.ops.aten.conv2d.default and u.meta["nn_module_stack"] and
                     list(u.meta["nn_module_stack"].values())[-1][0] == "block.0"
                     for d in n.users for u in d.users))
        getattr(bad, q.args[1].target).mul_(0.05)
        layer = "block.0"
    else:
        getattr(bad, "qc_w_branch_0_weight_scale").mul_(30.0)  # the codes now mean 30x larger weights
        layer = "branch.0"
    good_report = compare(prepared, quantized, calib[:2])
    bad_report = compare(prepared, bad, calib[:2])
    first = bad_report.first_divergence()
    assert first is not None and first.module == layer and first.kind == plant
    # every row before it is untouched by the plant
    i = [r.name for r in bad_report.rows].index(first.name)
    for g, b in zip(good_report.rows[:i], bad_report.rows[:i]):
        assert (g.name, g.sqnr_db) == (b.name, b.sqnr_db)
    assert good_report[first.name].sqnr_db > 30.0 > 20.0 > first.sqnr_db
    if plant == "activation":
        assert first.clipped_fraction > 0.1 > good_report[first.name].clipped_fraction
    assert bad_report.output.sqnr_db < good_report.output.sqnr_db - 10


def test_compare_refuses_a_quantized_reference(w8a8):
    model, prepared, quantized, calib = w8a8
    with pytest.raises(InvalidModelError, match="float model"):
        compare(quantized, quantized, calib[:1])
    with pytest.raises(InvalidModelError, match="qc.convert"):
        compare(model, prepared, calib[:1])
