"""Target profiles (qcompile/targets.py, backends/onnx/targets.py): the recipe a target derives, the
attention selection of the outlier split, and, on a static-shape transformer block, that
onnxruntime fuses every quantized linear of the `ort-cpu` export into MatMulIntegerToFloat
(without the [1, N] bias rewrite its MatMulAddFusion makes them float Gemms: the control case).
"""
from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import qcompile as qc
from qcompile.errors import RecipeError
from qcompile.graph import STATE
from qcompile.targets import recipe_for_target
from qcompile.testing.tolerances import seeded

pytestmark = pytest.mark.usefixtures("one_thread")
Q = torch.ops.qcompile.quantize.default
D, HEADS, T = 32, 2, 16
QKV_OUTLIER, FFN_OUTLIER = 3, 5


class TinyEncoderBlock(nn.Module):
    """A post-LN BERT layer (embedding LayerNorm, eager attention, FFN), as in all-MiniLM-L6-v2.
    LayerNorm gains plant one outlier channel in the q/k/v input and one in the FFN input."""

    def __init__(self, gen):
        super().__init__()
        self.ln0, self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        with torch.no_grad():
            for lin in (self.q, self.k, self.v, self.o, self.fc1, self.fc2):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) / lin.in_features ** 0.5)
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) * 0.1)
            self.ln0.weight[QKV_OUTLIER] = 20.0
            self.ln1.weight[FFN_OUTLIER] = 20.0
            for lin, channel in ((self.q, QKV_OUTLIER), (self.k, QKV_OUTLIER), (self.v, QKV_OUTLIER),
                                 (self.fc1, FFN_OUTLIER)):
                lin.weight[:, channel] /= 20.0   # the outliers stay in their input, not in what follows

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln0(x)
        heads = lambda y: y.view(b, t, HEADS, d // HEADS).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
        probs = (torch.matmul(q, k.transpose(-1, -2)) * (d // HEADS) ** -0.5).softmax(-1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, d)
        h1 = self.ln1(h + self.o(ctx))
        return self.ln2(h1 + self.fc2(F.gelu(self.fc1(h1))))


@pytest.fixture(scope="module")
def block():
    gen = seeded("tiny encoder block")
    model = TinyEncoderBlock(gen).eval()
    batches = [torch.randn(2, T, D, generator=gen) for _ in range(8)]
    return model, batches


def quantize(model, batches, **prepare_kwargs):
    prepared = qc.prepare(model, batches[0], **prepare_kwargs)
    qc.calibrate(prepared, batches, progress=False)
    return prepared, qc.convert(prepared)


# --------------------------------------------------------------------------------------------------
# the recipe a target derives
# --------------------------------------------------------------------------------------------------

def test_ort_cpu_drops_activation_matmuls_and_puts_its_algorithms_first():
    r = recipe_for_target(qc.recipes["w8a8"].replace(algorithms=["gptq"]), "ort-cpu")
    assert r.name == "w8a8@ort-cpu"
    assert "matmul" not in r.ops and set(r.ops) == set(qc.recipes["w8a8"].ops) - {"matmul"}
    assert [name for name, _ in r.algorithms] == ["outlier_split", "smoothquant", "gptq"]
    assert dict(r.algorithms[0][1]) == {"select": "attention"}
    assert (r.weight, r.activation) == (qc.recipes["w8a8"].weight, qc.recipes["w8a8"].activation)
    # the user's own options win: no second smoothquant, theirs keeps its alpha
    mine = recipe_for_target(qc.recipes["w8a8"].replace(algorithms=[{"name": "smoothquant", "alpha": 0.5}]), "ort-cpu")
    assert [(n, dict(o)) for n, o in mine.algorithms] == [("outlier_split", {"select": "attention"}),
                                                         ("smoothquant", {"alpha": 0.5})]


def test_torch_cpu_keeps_the_families_with_onednn_kernels_and_puts_its_algorithms_first():
    r = recipe_for_target(qc.recipes["w8a8"].replace(algorithms=["gptq"]), "torch-cpu")
    assert r.name == "w8a8@torch-cpu" and r.ops == ("linear", "conv")
    assert [(n, dict(o)) for n, o in r.algorithms] == [("outlier_split", {"select": "attention"}), ("smoothquant", {}),
                                                      ("gptq", {})]
    assert (r.weight, r.activation, r.quantize_outputs) == (qc.recipes["w8a8"].weight, qc.recipes["w8a8"].activation,
                                                            qc.recipes["w8a8"].quantize_outputs)


def test_weight_only_and_dynamic_recipes_pass_through():
    for name in ("w8a16", "w4a16", "w8a8-dynamic", "nf4"):
        for target in ("ort-cpu", "torch-cpu", "tensorrt"):
            assert recipe_for_target(name, target) == qc.recipes[name]


def test_tensorrt_makes_activations_symmetric_int8():
    r = recipe_for_target("w8a8", "tensorrt")
    assert r.activation.dtype == "int8" and r.activation.symmetric and not r.quantize_outputs
    assert r.activation.observer == qc.recipes["w8a8"].activation.observer
    assert r.ops == qc.recipes["w8a8"].ops and r.algorithms == ()


def test_unknown_target_is_a_recipe_error(block):
    model, batches = block
    with pytest.raises(RecipeError, match="unknown target 'ort-gpu'.*ort-cpu, torch-cpu, tensorrt"):
        qc.prepare(model, batches[0], target="ort-gpu")


# --------------------------------------------------------------------------------------------------
# the outlier split's attention selection
# --------------------------------------------------------------------------------------------------

def test_select_attention_splits_q_k_v_and_not_the_ffn(block):
    model, batches = block
    split_by = {}
    for select in ("all", "attention"):
        prepared = qc.prepare(model, batches[0], recipe=qc.recipes["w8a8"].replace(ops=("linear",)),
                              algorithms=[{"name": "outlier_split", "select": select}])
        qc.calibrate(prepared, batches, progress=False)
        report = prepared.meta[STATE].algorithm_reports["outlier_split"]
        split_by[select] = {name: entry["outlier_channels"] for name, entry in report.items()
                            if entry.get("outlier_channels")}
    assert split_by["all"] == {"q": [QKV_OUTLIER], "k": [QKV_OUTLIER], "v": [QKV_OUTLIER], "fc1": [FFN_OUTLIER]}
    assert split_by["attention"] == {"q": [QKV_OUTLIER], "k": [QKV_OUTLIER], "v": [QKV_OUTLIER]}


def test_select_attention_on_a_model_without_attention_changes_nothing():
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 8)).eval()
    with torch.no_grad():
        model[0].weight[2] = 30.0
    xs = [torch.randn(4, 16, generator=seeded("no attention", i)) for i in range(4)]
    _, plain = quantize(model, xs, recipe="w8a8")
    prepared, q = quantize(model, xs, recipe="w8a8", algorithms=[{"name": "outlier_split", "select": "attention"}])
    assert "skipped" in prepared.meta[STATE].algorithm_reports["outlier_split"]["1"]
    assert torch.equal(q(xs[0]), plain(xs[0]))


def test_select_must_be_known():
    with pytest.raises(RecipeError, match="select must be one of"):
        qc.prepare(nn.Linear(4, 4), torch.randn(2, 4), algorithms=[{"name": "outlier_split", "select": "qkv"}])


# --------------------------------------------------------------------------------------------------
# prepare(target=...) end to end, and what onnxruntime fuses from the export
# --------------------------------------------------------------------------------------------------

def ort_optimized_counts(path, out):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(out)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(out)).graph.node)


def test_ort_cpu_block_fuses_every_linear_into_matmul_integer_to_float(block, tmp_path):
    pytest.importorskip("onnxruntime")

    model, batches = block
    prepared, quantized = quantize(model, batches, recipe="w8a8", target="ort-cpu")
    state = quantized.meta[STATE]
    assert state.target == "ort-cpu" and state.recipe.name == "w8a8@ort-cpu"
    # q/k/v share one quantized input, o, fc1 and fc2 have one each; the attention matmuls stay float
    assert len([n for n in quantized.graph.nodes if n.target == Q]) == 4
    path = tmp_path / "block.onnx"
    proto = qc.export_onnx(quantized, path, dynamic_shapes=False)   # static shapes: [2, 16, 32]
    inits = {i.name: i for i in proto.graph.initializer}
    bias_shapes = sorted(tuple(inits[n.input[1]].dims) for n in proto.graph.node
                         if n.op_type == "Add" and n.input[1] in inits and n.input[1].endswith("_row"))
    assert bias_shapes == sorted([(1, D)] * 5 + [(1, 4 * D)])
    counts = ort_optimized_counts(path, tmp_path / "block.opt.onnx")
    print(f"ort-cpu block, onnxruntime-optimized: {dict(sorted(counts.items()))}")
    assert counts["MatMulIntegerToFloat"] == 6 and counts["Gemm"] == 0 and counts["QGemm"] == 0
    assert counts["QLinearMatMul"] == 0       # attention matmuls: float, not quantized
    # Control: the same file with [N] biases. onnxruntime's MatMulAddFusion takes every linear into
    # a float Gemm on the dequantized weight before its QDQ fusion looks.
    control = onnx.load(str(path))
    for init in control.graph.initializer:
        if init.name.endswith("_row"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).reshape(-1), init.name))
    onnx.save(control, str(tmp_path / "control.onnx"))
    control_counts = ort_optimized_counts(tmp_path / "control.onnx", tmp_path / "control.opt.onnx")
    assert control_counts["MatMulIntegerToFloat"] == 0 and control_counts["Gemm"] == 6
    # the rewrite changes no value: onnxruntime's codes of every quantized tensor (fused integer
    # kernels) are the reference graph's, but for rounding ties
    report = qc.verify(quantized, path, batches)
    print(report)
    assert report.first_divergence is None
    assert all(t.equal_fraction >= 0.999 and t.max_diff <= 1 for t in report.tensors), report


def test_export_defaults_to_the_prepare_target(block, tmp_path):
    model, batches = block
    _, quantized = quantize(model, batches, recipe="w8a8", target="tensorrt")
    proto = qc.export_onnx(quantized, None)
    zero_points = {i.name: i for i in proto.graph.initializer}
    q_nodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert all(zero_points[n.input[2]].data_type == onnx.TensorProto.INT8 for n in q_nodes)
    # TensorRT placement: q/k/v's shared input gets a Q/DQ pair per consumer (3 for that tensor)
    assert len(q_nodes) == len([n for n in quantized.graph.nodes if n.target == Q]) + 2
    assert not any(i.name.endswith("_row") for i in proto.graph.initializer)


def test_dynamic_batch_export_keeps_n_biases_and_still_fuses(block, tmp_path):
    """MatMulAddFusion skips inputs of unknown size, so a dynamic-batch file needs no rewrite; its
    [N] biases keep onnxruntime's BiasGelu fusion."""
    pytest.importorskip("onnxruntime")
    model, batches = block
    _, quantized = quantize(model, batches, recipe="w8a8", target="ort-cpu",
                            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    path = tmp_path / "block_dynamic.onnx"
    proto = qc.export_onnx(quantized, path)
    assert not any(i.name.endswith("_row") for i in proto.graph.initializer)
    counts = ort_optimized_counts(path, tmp_path / "block_dynamic.opt.onnx")
    assert counts["MatMulIntegerToFloat"] == 6 and counts["Gemm"] == 0 and counts["BiasGelu"] == 1


def test_dynamic_batch_and_sequence_export_runs_any_shape(block, tmp_path):
    """Batch and sequence dims asked for at prepare stay symbolic in the file, and onnxruntime's
    codes match the reference graph's at shapes other than the captured one."""
    pytest.importorskip("onnxruntime")
    model, batches = block
    dims = {0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("seq", min=2, max=512)}
    _, quantized = quantize(model, batches, recipe="w8a8", target="ort-cpu", dynamic_shapes=(dims,))
    path = tmp_path / "block_dynamic_seq.onnx"
    proto = qc.export_onnx(quantized, path)
    shape = proto.graph.input[0].type.tensor_type.shape.dim
    assert shape[0].dim_param and shape[1].dim_param and shape[2].dim_value == D
    gen = seeded("other shapes")
    others = [torch.randn(b, t, D, generator=gen) for b, t in ((1, 7), (3, 16), (5, 40))]
    report = qc.verify(quantized, path, others)
    assert report.first_divergence is None
    assert all(t.equal_fraction >= 0.999 and t.max_diff <= 1 for t in report.tensors), report
    counts = ort_optimized_counts(path, tmp_path / "block_dynamic_seq.opt.onnx")
    assert counts["MatMulIntegerToFloat"] == 6 and counts["Gemm"] == 0


class NoQuantizedKernel(nn.Module):
    """conv -> GroupNorm -> Hardswish -> conv -> mean -> linear: GroupNorm and Hardswish have no
    quantized kernel in onnxruntime (nor an annotation rule here)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.norm, self.act, self.head = nn.GroupNorm(2, 8), nn.Hardswish(), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv2(self.act(self.norm(self.conv1(x)))).mean((2, 3)))


def test_an_op_without_a_quantized_kernel_exports_and_stays_float(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = NoQuantizedKernel().eval()
    xs = [torch.randn(2, 3, 8, 8, generator=seeded("no kernel", i)) for i in range(4)]
    _, quantized = quantize(model, xs, recipe="w8a8", target="ort-cpu")
    path = tmp_path / "no_kernel.onnx"
    proto = qc.export_onnx(quantized, path)
    producer = {out: n for n in proto.graph.node for out in n.output}
    hardswish = [n for n in proto.graph.node if n.op_type == "HardSwish"]
    assert len(hardswish) == 1, Counter(n.op_type for n in proto.graph.node)
    # float in, float out: it reads the GroupNorm's float output and its own output is what conv2's
    # input QuantizeLinear quantizes
    assert producer[hardswish[0].input[0]].op_type != "DequantizeLinear"
    consumers = [n for n in proto.graph.node if hardswish[0].output[0] in n.input]
    assert [n.op_type for n in consumers] == ["QuantizeLinear"]
    assert Counter(n.op_type for n in proto.graph.node)["Conv"] == 2
    # onnxruntime runs it (its QDQ Conv fusion needs a QuantizeLinear on the conv's output, which a
    # conv feeding a float op does not get: those convs run in float on dequantized int8 weights)
    report = qc.verify(quantized, path, xs)
    assert report.first_divergence is None


def test_torch_cpu_target_compiles_in_one_call_with_every_linear_on_onednn(block, tmp_path):
    """prepare(target="torch-cpu") -> calibrate -> qc.compile: the outlier split found q/k/v in the
    graph, the six linears run on oneDNN, the batch stays dynamic, and the compiled module agrees
    with the lowered eager one up to float roundoff (inductor fuses LayerNorm/softmax and rounds them
    differently; a code flipped at a tie would cost about 1e-2 of the output's range)."""
    from qcompile.api import CompiledModule
    from qcompile.backends.torch_cpu import lowering_report

    model, batches = block
    prepared = qc.prepare(model, batches[0][:1], target="torch-cpu")
    qc.calibrate(prepared, batches, progress=False)
    split = prepared.meta[STATE].algorithm_reports["outlier_split"]
    assert sorted(name for name, e in split.items() if e.get("outlier_channels")) == ["k", "q", "v"]
    fast = qc.compile(prepared)
    assert isinstance(fast, CompiledModule) and prepared.meta[STATE].stage == "calibrated"   # converted a copy
    kernels = [k.split()[0] for _, k in lowering_report(fast.lowered).lowered if k.startswith("qcompile.onednn")]
    assert kernels == ["qcompile.onednn_int8_linear"] * 6
    x = torch.randn(5, T, D, generator=seeded("torch-cpu compile"))
    with torch.no_grad():
        eager, reference, float_out = fast.lowered(x), qc.convert(prepared)(x), model(x)
    got = fast(x)
    assert got.shape == (5, T, D) and not got.requires_grad
    # measured: compiled vs eager 1e-6 of the output's range, cosine to FP32 0.99983, eager vs reference 0.9999998
    assert (got - eager).abs().max() <= 1e-3 * eager.abs().max()
    assert F.cosine_similarity(got.flatten(1), float_out.flatten(1)).min() >= 0.999
    assert F.cosine_similarity(eager.flatten(1), reference.flatten(1)).min() >= 0.99999
    # the same module exported: the default ONNX placement (torch-cpu is not an ONNX runtime)
    proto = qc.export_onnx(qc.convert(prepared), tmp_path / "torch_cpu.onnx")
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    with pytest.raises(qc.ExportError, match="ONNX files are placed for: ort-cpu, tensorrt"):
        qc.export_onnx(qc.convert(prepared), None, target="torch-cpu")
