"""Precision recipes through the user's API: qc.prepare / calibrate / convert / export_onnx / inspect.

The passes themselves are tested in test_precision.py; here the API must give exactly what the
passes give (bit for bit), pick the ONNX opset the dtypes need, and refuse misuse with the fix.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qcompile as qc
from qcompile.capture import capture
from qcompile.passes.precision import freeze_fp8, prepare_precision, set_fp8_calibrating
from qcompile.testing.tolerances import seeded

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4)).eval()


def _batches(n=3):
    return [torch.randn(8, 16, generator=seeded(f"precision-api-{i}")) for i in range(n)]


@pytest.mark.parametrize("recipe", ["bf16", "fp16", "fp8"])
def test_api_equals_the_passes_bit_for_bit_and_leaves_the_model_alone(recipe):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    batches = _batches()
    prepared = qc.prepare(model, batches[0], recipe)
    qc.calibrate(prepared, batches, progress=False)
    converted = qc.convert(prepared)

    by_hand = capture(model, (batches[0],))
    prepare_precision(by_hand, recipe)
    set_fp8_calibrating(by_hand, True)
    with torch.no_grad():
        for b in batches:
            by_hand(b)
    set_fp8_calibrating(by_hand, False)
    if recipe == "fp8":
        freeze_fp8(by_hand)

    x = torch.randn(8, 16, generator=seeded("precision-api-eval")) * 2
    assert torch.equal(converted(x), by_hand(x))
    assert converted(x).dtype == torch.float32                     # outputs cast back to the model's dtype
    assert not torch.equal(converted(x), model(x))                 # and the precision really changed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert converted.meta["qcompile"].stage == "quantized"


@pytest.mark.parametrize("recipe,opset,low", [("fp16", 20, "float16"), ("fp8", 21, "fp8_e4m3")])
def test_export_picks_the_opset_and_inspect_lists_each_low_op(recipe, opset, low):
    onnx = pytest.importorskip("onnx")
    model = _model()
    batches = _batches()
    prepared = qc.prepare(model, batches[0], recipe)
    qc.calibrate(prepared, batches, progress=False)
    converted = qc.convert(prepared)
    proto = qc.export_onnx(converted, None)
    assert [o.version for o in proto.opset_import if o.domain == ""] == [opset]
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Gemm") == 2 and "QuantizeLinear" not in ops
    if recipe == "fp8":  # both inputs of the two linears: activations cast at run time, weights folded
        casts = [a.i for n in proto.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
        assert casts.count(onnx.TensorProto.FLOAT8E4M3FN) == 2
    else:
        assert sum(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer) == 4
    # onnxruntime runs it: fp16 Gemm accumulates in its own order (2 FP16 ulps of the output's
    # magnitude); fp8 computes in float32 on the same FP8 grid values (float32 roundoff only).
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = batches[1]
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    ref = converted(x)
    ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().max())) - (10 if recipe == "fp16" else 23))
    assert (got - ref).abs().max() <= 2 * ulp * (1 if recipe == "fp16" else 8)
    table = qc.inspect(converted)
    assert sum(line.split()[-1] == low for line in table.splitlines() if line.startswith("linear")) == 2


def test_fp8_qat_through_prepare_qat_trains_and_converts_to_its_eval_output():
    model = _model()
    batches = _batches()
    qat = qc.prepare_qat(model, batches[0], "fp8-qat")
    opt = torch.optim.SGD(qat.parameters(), lr=1e-2)
    weight_before = next(p for n, p in qat.named_parameters() if n.endswith("weight")).detach().clone()
    for b in batches:
        opt.zero_grad()
        qat(b).square().mean().backward()
        opt.step()
    weight_after = next(p for n, p in qat.named_parameters() if n.endswith("weight"))
    assert weight_after.dtype == torch.float32 and not torch.equal(weight_after, weight_before)
    qat.eval()
    set_fp8_calibrating(qat, False)
    x = torch.randn(8, 16, generator=seeded("precision-api-qat"))
    with torch.no_grad():
        want = qat(x)
    converted = qc.convert(qat)
    assert torch.equal(converted(x), want)


def test_misuse_is_refused_with_the_fix():
    model = _model()
    x = _batches(1)[0]
    with pytest.raises(qc.RecipeError, match="goes through qc.prepare_qat"):
        qc.prepare(model, x, "fp8-qat")
    with pytest.raises(qc.RecipeError, match="goes through qc.prepare$"):
        qc.prepare_qat(model, x, "fp16")
    with pytest.raises(qc.RecipeError, match="PTQ algorithms do not apply"):
        qc.prepare(model, x, "bf16", algorithms=["smoothquant"])
    with pytest.raises(qc.ConvertError, match="never saw data"):
        qc.convert(qc.prepare(model, x, "fp8"))
    with pytest.raises(qc.ConvertError, match="lower takes integer QDQ graphs"):
        qc.lower(qc.convert(qc.prepare(model, x, "bf16")))
    with pytest.raises(qc.RecipeError, match=r"precision recipes: bf16, fp16, fp8, fp8-qat\)\. Did you mean 'fp16'"):
        qc.prepare(model, x, "fp61")


# ----------------------------------------------------------------------------------------------------------
# QAT with a compute precision: INT4 fake-quant weights, BF16 linears, FP32 master weights
# ----------------------------------------------------------------------------------------------------------

def _digits_mlp():
    from qcompile.testing.models import digits_data

    x_train, y_train, x_test, y_test = digits_data()
    x_train, x_test = x_train.flatten(1), x_test.flatten(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_train), y_train).backward()
        opt.step()
    return model.eval(), (x_train, y_train, x_test, y_test)


def _train(qat, x, y, epochs=2, batch=32):
    opt = torch.optim.Adam(qat.parameters(), lr=1e-3)
    order = torch.randperm(len(x), generator=seeded("precision-api-order"))
    for _ in range(epochs):
        for idx in order[: len(x) // batch * batch].split(batch):   # captured with batch 32
            opt.zero_grad()
            nn.functional.cross_entropy(qat(x[idx]), y[idx]).backward()
            opt.step()
    return qat.eval()


def _acc(m, x, y, batch=32):
    n = len(x) // batch * batch
    with torch.no_grad():
        pred = torch.cat([m(x[i:i + batch]).argmax(1) for i in range(0, n, batch)])
    return 100.0 * float((pred == y[:n]).float().mean())


def test_bf16_qat_with_int4_weights_trains_fp32_masters_and_converts_bit_for_bit():
    model, (x_train, y_train, x_test, y_test) = _digits_mlp()
    x = x_train[:32]
    qat = qc.prepare_qat(model, x, "w4a8", precision="bf16")
    linears = [n for n in qat.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert len(linears) == 2 and all(n.meta["qcompile_precision"] == torch.bfloat16 for n in linears)
    assert all(p.dtype == torch.float32 for p in qat.parameters())      # masters
    # the forward is the BF16 linear of the FP32 fake-quant values, cast once each
    qc.calibrate(qat, [x], progress=False)
    qc.freeze_observers(qat)
    qat.eval()
    first = model[0]
    xq = qat.get_submodule("qc_observer_0")(x)
    wq = qat.get_submodule("qc_weight_fq_0")(first.weight)
    hidden = nn.functional.linear(xq.bfloat16(), wq.bfloat16(), first.bias.bfloat16())
    got = {}
    hook = qat.get_submodule("qc_observer_1").register_forward_hook(lambda m, i, o: got.update(seen=i[0]))
    with torch.no_grad():
        qat(x)
    hook.remove()
    assert torch.equal(got["seen"], hidden.relu().float())
    qc.freeze_observers(qat, False)
    # training reaches the FP32-compute QAT accuracy, and convert keeps the eval output bit for bit
    qat = _train(qat.train(), x_train, y_train)
    fp32_qat = _train(qc.prepare_qat(model, x, "w4a8").train(), x_train, y_train)
    converted = qc.convert(qat)
    x_eval = x_test[:32]
    with torch.no_grad():
        assert torch.equal(converted(x_eval), qat(x_eval))
    casts = [n for n in converted.graph.nodes if n.target == torch.ops.aten.to.dtype and n.args[1] == torch.bfloat16]
    assert len(casts) == 6                                                 # x, W, b of each linear
    assert abs(_acc(converted, x_test, y_test) - _acc(fp32_qat, x_test, y_test)) <= 1.0
    assert _acc(converted, x_test, y_test) >= _acc(model, x_test, y_test) - 1.5


def test_precision_with_qat_refuses_fp8_and_batch_norm_folds():
    model = _model()
    x = _batches(1)[0]
    with pytest.raises(qc.RecipeError, match="recipe='fp8-qat' alone"):
        qc.prepare_qat(model, x, "w4a8", precision="fp8")
    conv_bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(qc.RecipeError, match="conv\\+BatchNorm pairs"):
        qc.prepare_qat(conv_bn, torch.randn(2, 1, 8, 8), "w8a8", precision="bf16")
