"""Outlier split (qcompile/passes/outliers.py): the planted outlier channels are the ones found, the
split is the same function in float, the graph shows both paths, the original linear keeps its
annotation and quantization (now on the inlier channels), and quantization error drops.

"Same function in float": within 1e-5 of the output's magnitude (the split only reorders a float32
sum: ~1e-7 relative; a wrong channel or weight column is O(1))."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

import qcompile as qc
from qcompile.errors import RecipeError
from qcompile.graph import ANNOTATION, STATE
from qcompile.graph.recorder import observers_disabled
from qcompile.passes import PassManager
from qcompile.passes.algorithm import make_algorithm
from qcompile.testing.tolerances import seeded

aten = torch.ops.aten
pytestmark = pytest.mark.usefixtures("one_thread")
PLANTED = (5, 17, 40)


class OutlierLayer(nn.Module):
    """A LayerNorm whose gains plant outlier input channels, then a linear (and a second linear on
    the same input, as q/k/v share theirs)."""

    def __init__(self, d=64, out=32, channels=PLANTED, gain=40.0, gen=None, second=False):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(d), nn.Linear(d, out)
        self.fc2 = nn.Linear(d, out) if second else None
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(out, d, generator=gen) / d ** 0.5)
            if second:
                self.fc2.weight.copy_(torch.randn(out, d, generator=gen) / d ** 0.5)
            self.ln.bias.copy_(torch.randn(d, generator=gen) * 0.1)
            self.ln.weight[list(channels)] = gain

    def forward(self, x):
        h = self.ln(x)
        y = self.fc(h)
        return y if self.fc2 is None else y + torch.relu(self.fc2(h))


def data(key, n=4, shape=(4, 16, 64)):
    g = seeded("outliers", key)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def split(prepared, batches, **options):
    pm = PassManager([make_algorithm("outlier_split", options).with_batches(batches)])
    pm(prepared)
    return pm.records[0]


def float_outputs(prepared, batches):
    with torch.no_grad(), observers_disabled(prepared):
        return [prepared(x) for x in batches]


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic"])
@pytest.mark.parametrize("second", [False, True])
def test_split_finds_the_planted_channels_and_is_exact_in_float(recipe, second):
    model = OutlierLayer(gen=seeded("layer", second), second=second).eval()
    xs = data("calib")
    prepared = qc.prepare(model, xs[0], recipe=recipe)
    before = float_outputs(prepared, xs)
    w = model.fc.weight.detach()
    record = split(prepared, xs)
    for b, a in zip(before, float_outputs(prepared, xs)):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    n = 2 if second else 1
    assert record.stats == {"split linears": n, "outlier channels": 3, "skipped": 0}
    # both paths in the graph: the inlier mask and the outlier selection shared by the group, a float
    # linear and an add per linear
    assert record.nodes_after - record.nodes_before == Counter(
        {"aten.mul.Tensor": 1, "aten.index_select": 1, "aten.linear": n, "aten.add.Tensor": n})
    report = prepared.meta[STATE].algorithm_reports["outlier_split"]
    assert report["fc"]["outlier_channels"] == list(PLANTED)
    assert min(report["fc"]["outlier_absmax"]) > 6.0 >= report["fc"]["inlier_absmax"]
    inliers = [c for c in range(64) if c not in PLANTED]
    lins = [nd for nd in prepared.graph.nodes if nd.target == aten.linear.default]
    quantized = [nd for nd in lins if ANNOTATION in nd.meta]
    floats = [nd for nd in lins if ANNOTATION not in nd.meta]
    assert len(quantized) == len(floats) == n
    fc = quantized[0]
    # the original node keeps its annotation and reads the input with the outliers zeroed (through
    # its observer); its weight keeps the inlier columns and zeros elsewhere
    x = fc.args[0] if recipe == "w8a8-dynamic" else fc.args[0].args[0]
    assert x.target == aten.mul.Tensor and x.args[1].op == "get_attr"
    assert getattr(prepared, x.args[1].target).nonzero().flatten().tolist() == inliers
    assert getattr(prepared, x.args[1].target).sum() == 64 - len(PLANTED)
    fc_w = getattr(prepared, fc.args[1].target.split(".")[0]).weight
    assert torch.equal(fc_w[:, inliers], w[:, inliers]) and not fc_w[:, list(PLANTED)].any()
    f = floats[0]
    assert getattr(prepared, f.args[0].args[2].target).tolist() == list(PLANTED)
    assert torch.equal(getattr(prepared, f.args[1].target), w[:, list(PLANTED)])
    assert len(f.args) == 2  # the bias is added once, by the quantized path
    (add,) = fc.users
    assert add.target == aten.add.Tensor and set(add.args) == {fc, f}


def test_static_observer_sees_only_the_inliers():
    model = OutlierLayer(gen=seeded("layer")).eval()
    xs = data("calib")
    prepared = qc.prepare(model, xs[0], recipe="w8a8", algorithms=["outlier_split"])
    qc.calibrate(prepared, xs, progress=False)
    report = prepared.meta[STATE].algorithm_reports["outlier_split"]["fc"]
    (obs,) = [m for name, m in prepared.named_modules() if name.startswith("qc_observer_")]
    assert max(abs(obs.seen_min), abs(obs.seen_max)) == pytest.approx(report["inlier_absmax"], rel=1e-6)
    quantized = qc.convert(prepared)
    (row,) = [r for r in quantized.meta[STATE].qparams if r["kind"] == "weight"]
    assert row["tensor"] == "fc.weight" and tuple(row["scale"].shape) == (32,)  # per-channel, as before


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic"])
def test_quantization_error_is_lower_with_the_split(recipe):
    model = OutlierLayer(gen=seeded("layer")).eval()
    calib, test = data("calib", 8), data("test", 4)

    def error(algorithms):
        prepared = qc.prepare(model, calib[0], recipe=recipe, algorithms=algorithms)
        qc.calibrate(prepared, calib, progress=False)
        quantized = qc.convert(prepared)
        with torch.no_grad():
            ref = torch.cat([model(x) for x in test])
            out = torch.cat([quantized(x) for x in test])
        return float((out - ref).norm() / ref.norm())

    plain, with_split = error(None), error(["outlier_split"])
    print(f"planted outlier channels, {recipe} relative error: plain {plain:.5f}, outlier split {with_split:.5f}")
    # the three outlier channels set the per-tensor (or per-token) scale without the split
    assert with_split < 0.5 * plain


class TwoBlocks(nn.Module):
    """Two LayerNorm -> linear blocks with planted outliers: two split groups."""

    def __init__(self, gen=None):
        super().__init__()
        self.first, self.second = OutlierLayer(out=64, gen=gen), OutlierLayer(gen=gen)

    def forward(self, x):
        return self.second(self.first(x))


def test_modules_option_splits_only_the_matching_linears():
    model = TwoBlocks(gen=seeded("two blocks")).eval()
    xs = data("calib")
    prepared = qc.prepare(model, xs[0], recipe="w8a8")
    before = float_outputs(prepared, xs)
    record = split(prepared, xs, modules=["second.*"])
    assert record.stats == {"split linears": 1, "outlier channels": 3, "skipped": 1}
    report = prepared.meta[STATE].algorithm_reports["outlier_split"]
    assert report["second.fc"]["outlier_channels"] == list(PLANTED)
    assert "not matched by modules" in report["first.fc"]["skipped"]
    for b, a in zip(before, float_outputs(prepared, xs)):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    with pytest.raises(RecipeError, match=r"match no quantized linear.*first\.fc"):
        split(qc.prepare(model, xs[0], recipe="w8a8"), xs, modules=["decoder.*"])
    with pytest.raises(RecipeError, match="list of module-name patterns"):
        qc.prepare(model, xs[0], algorithms=[{"name": "outlier_split", "modules": "second.*"}])


def test_threshold_option_all_outliers_and_bad_input():
    model = OutlierLayer(gen=seeded("layer")).eval()
    xs = data("calib")
    prepared = qc.prepare(model, xs[0], recipe="w8a8")
    record = split(prepared, xs, threshold=1e-3)  # every channel is above: nothing left to quantize
    assert record.stats["split linears"] == 0 and record.nodes_after == record.nodes_before
    assert "every input channel" in prepared.meta[STATE].algorithm_reports["outlier_split"]["fc"]["skipped"]
    prepared = qc.prepare(model, xs[0], recipe="w8a8")
    split(prepared, xs, threshold=1e6)  # nothing above: the graph is left alone, the report says so
    assert prepared.meta[STATE].algorithm_reports["outlier_split"]["fc"]["outlier_channels"] == []
    for bad in (0, -1.0, "6", None):
        with pytest.raises(RecipeError, match="threshold"):
            qc.prepare(model, xs[0], algorithms=[{"name": "outlier_split", "threshold": bad}])


@pytest.mark.parametrize("algorithm", ["outlier_split", "smoothquant"])
def test_rewritten_graph_exports_to_onnx_and_agrees_in_onnxruntime(algorithm, tmp_path):
    pytest.importorskip("onnxruntime")
    from qcompile.backends.onnx import ort_session
    from qcompile.backends.onnx.verify import ort_run

    model = OutlierLayer(gen=seeded("layer")).eval()
    calib = data("calib")
    prepared = qc.prepare(model, calib[0], recipe="w8a8", algorithms=[algorithm])
    qc.calibrate(prepared, calib, progress=False)
    quantized = qc.convert(prepared)
    proto = qc.export_onnx(quantized, tmp_path / "m.onnx")   # runs onnx.checker
    ops = Counter(n.op_type for n in proto.graph.node)
    if algorithm == "outlier_split":
        # the inlier mask and the outlier selection (the float path's MatMul/Gemm is there too)
        assert ops["Mul"] == 1 and ops["Gather"] == 1
    else:
        assert ops["Mul"] == 0  # the LayerNorm absorbed 1/s: nothing extra to run
    out = torch.from_numpy(ort_run(ort_session(tmp_path / "m.onnx"), quantized, calib[1])[0])
    with torch.no_grad():
        ref = quantized(calib[1])
    # onnxruntime may round an input code the other way at a tie: one activation step times the
    # largest row sum of |W| bounds the output change; the rest is float32 roundoff
    (act,) = [r for r in quantized.meta[STATE].qparams if r["kind"] == "activation"]
    w = prepared.get_parameter("fc.weight").detach()
    bound = float(act["scale"]) * float(w.abs().sum(1).max()) + 1e-5 * float(ref.abs().max())
    diff = float((out - ref).abs().max())
    print(f"{algorithm}: onnxruntime vs reference max |diff| {diff:.3g} (bound {bound:.3g})")
    assert diff <= bound


def test_weights_with_qparams_fixed_by_an_earlier_algorithm_are_not_split():
    model = OutlierLayer(gen=seeded("layer")).eval()
    xs = data("calib")
    prepared = qc.prepare(model, xs[0], recipe="w8a8")
    prepared.meta[STATE].weight_qparams["fc.weight"] = (torch.ones(32), torch.zeros(32, dtype=torch.int32))
    record = split(prepared, xs)
    assert record.stats["split linears"] == 0 and record.nodes_after == record.nodes_before
    assert "list outlier_split before it" in prepared.meta[STATE].algorithm_reports["outlier_split"]["fc"]["skipped"]
