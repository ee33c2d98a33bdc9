"""qc.sensitivity and the budgeted per-layer recipe: a ranking that does not depend on which
sample of the data measured it, a greedy plan checked by hand, and a budget met exactly as the
saved (ONNX) model counts it."""
from __future__ import annotations

import onnx
import pytest
import torch

import qcompile as qc
from qcompile.debug.sensitivity import (
    LayerSensitivity, SensitivityReport, auto_recipe, average_bits, plan_precision, plan_to_recipe, quantize,
    sensitivity, weight_bits,
)
from qcompile.errors import RecipeError
from qcompile.testing.models import accuracy

CANDIDATES = ["w4a8", "w8a8"]   # INT4 / INT8 per-channel weights; both quantize every conv of the CNN


def _sample(x, seed, n=256, batch=64):
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return [x[idx[i:i + batch]] for i in range(0, n, batch)]


@pytest.fixture(scope="module")
def measured(digits, one_thread):
    model, (x_train, *_) = digits
    return {seed: sensitivity(model, _sample(x_train, seed), CANDIDATES, progress=False) for seed in (0, 1)}


def test_ranking_is_stable_across_two_samples(measured):
    print(measured[0], measured[1], sep="\n")
    # the ranking the plan starts from (the cheapest candidate) is the same on both samples
    assert [r.layer for r in measured[0].ranking("w4a8")] == [r.layer for r in measured[1].ranking("w4a8")]
    # at INT8 every layer is close to float; layers whose errors differ by more than 3 dB (2x) on one
    # sample keep their order on the other
    for c in CANDIDATES:
        for a in measured[0].layers:
            for b in measured[0].layers:
                if measured[0].get(a, c).rel_mse > 2 * measured[0].get(b, c).rel_mse:
                    assert measured[1].get(a, c).rel_mse > measured[1].get(b, c).rel_mse, (c, a, b)
    # INT4 costs more than INT8 on every layer, by a wide margin (about 6 dB per bit)
    for r in measured[0].ranking("w4a8"):
        assert measured[0].get(r.layer, "w8a8").sqnr_db > r.sqnr_db + 12


def test_one_layer_recipes_quantize_only_that_layer(measured):
    report = measured[0]
    for layer in report.layers:
        assert report.get(layer, "w4a8").bits == 4 and report.get(layer, "w8a8").bits == 8
    assert {r.numel for r in report.rows} == {32 * 9, 32 * 32 * 9, 32 * 32, 10 * 64}


def _onnx_weight_bits(path) -> tuple[int, int]:
    """(sum of bits, elements) of the Conv/Gemm/MatMul weights of an ONNX file, read from its initializers."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8,
            onnx.TensorProto.FLOAT: 32}
    total_bits = total = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        w = node.input[1]
        if w in producer and producer[w].op_type == "DequantizeLinear":
            w = producer[w].input[0]
        t = inits[w]
        numel = 1
        for d in t.dims:
            numel *= d
        total_bits += bits[t.data_type] * numel
        total += numel
    return total_bits, total


def test_budgeted_recipe_meets_the_budget_in_the_saved_model(digits, measured, tmp_path):
    model, (x_train, _, x_test, y_test) = digits
    calib = _sample(x_train, 0)
    recipe = auto_recipe(model, calib, budget_bits=5.0, candidates=CANDIDATES, report=measured[0])
    assert qc.Recipe.from_json(recipe.to_json()) == recipe   # readable, saveable, editable
    plan = plan_precision(measured[0], budget_bits=5.0)
    quantized = quantize(model, qc.Recipe.from_json(recipe.to_json()), calib)
    qc.export_onnx(quantized, tmp_path / "auto.onnx", calib[0])
    bits, n = _onnx_weight_bits(tmp_path / "auto.onnx")
    assert n == sum(r.numel for r in measured[0].ranking("w4a8"))
    assert bits / n == pytest.approx(plan.bits, rel=1e-12) and bits / n <= 5.0
    assert average_bits(weight_bits(quantized)) == pytest.approx(plan.bits, rel=1e-12)
    assert 4.0 < plan.bits  # it did spend some of the budget on the sensitive layers
    auto = accuracy(quantized, x_test, y_test, 64)
    int4 = accuracy(quantize(model, "w4a8", calib), x_test, y_test, 64)
    print(f"digits: auto {plan.bits:.3f} bits {auto:.2f}%, w4a8 {int4:.2f}%")
    assert auto > int4


def _synthetic():
    rows = [LayerSensitivity("a", "int4", 4, 100, 0.10), LayerSensitivity("a", "int8", 8, 100, 0.010),
            LayerSensitivity("b", "int4", 4, 100, 0.05), LayerSensitivity("b", "int8", 8, 100, 0.001),
            LayerSensitivity("c", "int4", 4, 200, 0.02), LayerSensitivity("c", "int8", 8, 200, 0.002)]
    return SensitivityReport(rows, ["a", "b", "c"], ["int4", "int8"], 1)


def test_greedy_plan_by_hand():
    report = _synthetic()
    # 4 bits everywhere = 4.0 average; upgrading a or b costs 1 bit of average, c 2 bits.
    # error saved per average bit: a 0.09, b 0.049, c 0.009 -> a first, then b.
    plan = plan_precision(report, budget_bits=5.0)
    assert plan.choice == {"a": "int8", "b": "int4", "c": "int4"} and plan.bits == 5.0
    plan = plan_precision(report, budget_bits=6.0)
    assert plan.choice == {"a": "int8", "b": "int8", "c": "int4"} and plan.bits == 6.0
    assert plan.predicted_error == pytest.approx(0.010 + 0.001 + 0.02)
    plan = plan_precision(report, max_error=0.05)   # 0.17 -> 0.08 (a) -> 0.031 (b): stop
    assert plan.choice == {"a": "int8", "b": "int8", "c": "int4"}
    with pytest.raises(RecipeError, match="cheapest"):
        plan_precision(report, budget_bits=3.5)
    with pytest.raises(RecipeError, match="exactly one"):
        plan_precision(report)


def test_plan_to_recipe_uses_overrides_and_exclude():
    from qcompile.debug.sensitivity import Plan

    recipe = plan_to_recipe(Plan({"stem.0": "w8a8", "block.0": "w4a8", "branch.0": "w4a8", "head": None}, 5.0, 0.0))
    assert recipe.weight == qc.recipes["w4a8"].weight
    assert recipe.overrides == (("stem.0", "w8a8"),) and recipe.exclude == ("head",)
    assert recipe.recipe_for("stem.0").name == "w8a8" and recipe.recipe_for("head") is None
