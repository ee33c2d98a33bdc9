"""The public flow prepare -> calibrate -> convert -> inspect: what it returns, what it leaves alone, the
inputs it takes, the graphs it builds (op counts), recipes, pass dumps and pass failures."""
from __future__ import annotations

import json
import operator
import re
from collections import Counter

import pytest
import torch
from torch import fx, nn

import qcompile as qc
from qcompile.capture import capture
from qcompile.passes import Annotate, FoldBatchNorm, Pass, PassManager, PassResult
from qcompile.testing.models import DigitsCNN

qops = torch.ops.qcompile
Q, DQ, CHOOSE = qops.quantize.default, qops.dequantize.default, qops.choose_qparams_per_token.default
LINEAR = torch.ops.aten.linear.default
PREPARE_PASSES = ["functionalize_inplace", "fold_constant_weights", "gemm_to_linear", "untie_weights", "fold_bn",
                  "annotate", "share_qparams", "insert_observers"]


def record(gm, name):
    return next(r for r in gm.meta["qcompile"].records if r.name == name)


# ----------------------------------------------------------------------------------------------------------
# tiny models and helpers
# ----------------------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """Linear-ReLU-Linear. Under w8a8: 2 activations (x, relu) and 2 weights are quantized."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.relu = nn.ReLU()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.relu(self.fc1(x)))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(6, 4)

    def forward(self, x, y):
        return self.a(x) * self.b(y)


class SharedInput(nn.Module):
    """One tensor feeding three quantized linears, as q/k/v projections do."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def batches(n=3, shape=(4, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def counts(gm: fx.GraphModule) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def linear_of(gm: fx.GraphModule, module: str) -> fx.Node:
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == LINEAR and owner(n) == module]
    return node


def dq_inputs(node: fx.Node) -> int:
    return sum(isinstance(a, fx.Node) and a.target == DQ for a in node.args)


def quantized(model, x, recipe="w8a8", data=None):
    prepared = qc.prepare(model, x, recipe=recipe)
    if prepared.meta["qcompile"].observers:
        qc.calibrate(prepared, data if data is not None else batches(shape=tuple(x.shape)), progress=False)
    return prepared, qc.convert(prepared)


def table_rows(report: str) -> list[list[str]]:
    """Rows of the first table of a qc.inspect report (cells split on runs of 2+ spaces)."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    end = lines.index("", start)
    return [re.split(r"\s{2,}", line) for line in lines[start:end]]


def pass_log(report: str) -> list[str]:
    lines = report.splitlines()
    start = lines.index("") + 3  # blank line, header, dashes
    end = lines.index("", start) if "" in lines[start:] else len(lines)   # the weight coverage follows
    return [line.split()[0] for line in lines[start:end]]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: bits(v).clone() for k, v in model.state_dict().items()},
        "modules": {n: (m.training, sorted(vars(m)), sorted(m._parameters), sorted(m._buffers))
                    for n, m in model.named_modules()},
    }


# ----------------------------------------------------------------------------------------------------------
# prepare / convert never touch the user's model and return new modules
# ----------------------------------------------------------------------------------------------------------

def test_prepare_calibrate_convert_leave_a_train_mode_model_untouched():
    torch.manual_seed(0)
    model = DigitsCNN(width=8).train()   # BatchNorm in train mode: any forward on it would move running stats
    before = snapshot(model)
    x = torch.rand(4, 1, 8, 8)
    prepared = qc.prepare(model, x)
    qc.calibrate(prepared, [torch.rand(4, 1, 8, 8) for _ in range(2)], progress=False)
    quantized = qc.convert(prepared)

    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert all(training for training, *_ in after["modules"].values())
    assert after["state"].keys() == before["state"].keys()
    for key in before["state"]:
        assert torch.equal(after["state"][key], before["state"][key]), key
    assert int(model.stem[1].num_batches_tracked) == 0

    assert prepared is not model and quantized is not prepared and quantized is not model
    assert isinstance(prepared, fx.GraphModule) and isinstance(quantized, fx.GraphModule)
    # captured in eval mode (BN folded with the running stats) although the model was in train mode
    assert record(prepared, "fold_bn").stats["folded"] == 2
    assert counts(prepared)[torch.ops.aten.batch_norm.default] == 0
    # no tensor of the new modules aliases the user's parameters
    user = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers() if b.numel()}
    for gm in (prepared, quantized):
        ours = {t.data_ptr() for t in list(gm.parameters()) + list(gm.buffers()) if t.numel()}
        assert not user & ours


def test_convert_twice_gives_independent_modules_and_later_calibration_leaves_them_alone():
    model, x = mlp(), torch.randn(4, 8)
    prepared = qc.prepare(model, x)
    qc.calibrate(prepared, batches(), progress=False)
    q1, q2 = qc.convert(prepared), qc.convert(prepared)
    assert q1 is not q2 and q1 is not prepared
    assert torch.equal(q1(x), q2(x))
    y1 = q1(x)

    # the two quantized modules share no storage: an edit to one does not reach the other
    ptrs = lambda gm: {t.data_ptr() for t in list(gm.parameters()) + list(gm.buffers())}
    assert not ptrs(q1) & ptrs(q2)
    with torch.no_grad():
        q2.qc_act0_scale.mul_(4)
    assert torch.equal(q1(x), y1) and not torch.equal(q2(x), y1)

    # the prepared module keeps its observers after convert and can go on calibrating
    assert sum(n.op == "call_module" for n in prepared.graph.nodes) == 2
    qc.calibrate(prepared, [10 * b for b in batches()], progress=False)
    assert prepared.meta["qcompile"].calibration_batches == 6
    assert q1.meta["qcompile"].calibration_batches == 3
    assert torch.equal(q1(x), y1)                                     # the first result did not move
    q3 = qc.convert(prepared)
    assert q3.qc_act0_scale > 5 * q1.qc_act0_scale                    # ... while a new convert sees the 10x data


class TiedHead(nn.Module):
    """An embedding whose table is also the output linear's weight: read in float by the lookup,
    quantized for the linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.embed(ids))))


def test_convert_shares_no_tensor_with_prepared_and_leaves_it_as_it_was():
    """convert reads the weights it quantizes from `prepared` without copying them first (a copy of
    a whole model's float weights was its peak memory): the result still shares no storage with
    `prepared`, also for a tied weight that stays float for another reader, and `prepared` keeps
    its values."""
    torch.manual_seed(0)
    ids = [torch.randint(0, 16, (2, 5)) for _ in range(3)]
    for model, example, data in ((mlp(), torch.randn(4, 8), batches()), (TiedHead().eval(), ids[0], ids)):
        prepared = qc.prepare(model, example)
        qc.calibrate(prepared, data, progress=False)
        before = {k: v.clone() for k, v in prepared.state_dict().items()}
        quantized = qc.convert(prepared)
        after = prepared.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        ptrs = lambda gm: {t.untyped_storage().data_ptr() for t in list(gm.parameters()) + list(gm.buffers())}  # noqa: E731
        assert not ptrs(quantized) & ptrs(prepared)
        weights = [n for n in quantized.graph.nodes if n.op == "get_attr" and n.target.startswith("qc_w_")
                   and n.target.endswith("_weight")]
        assert len(weights) == 2   # the int8 codes of both linears
        assert torch.equal(quantized(example), qc.convert(prepared)(example))


# ----------------------------------------------------------------------------------------------------------
# example inputs and calibration batches: tensor, tuple, dict
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["tensor", "tuple", "dict"])
def test_tensor_tuple_and_dict_inputs_give_the_same_quantized_model(form):
    wrap = {"tensor": lambda t: t, "tuple": lambda t: (t,), "dict": lambda t: {"x": t}}[form]
    model, x = mlp(), torch.randn(4, 8)
    prepared = qc.prepare(model, wrap(x))
    qc.calibrate(prepared, [wrap(b) for b in batches()], progress=False)
    assert prepared.meta["qcompile"].calibration_batches == 3
    q = qc.convert(prepared)

    _, reference = quantized(mlp(), x)                 # the tensor form, as the reference
    assert torch.equal(q.qc_act0_scale, reference.qc_act0_scale)
    assert torch.equal(q.qc_act1_scale, reference.qc_act1_scale)
    y = q(**wrap(x)) if form == "dict" else q(*((x,) if form == "tensor" else wrap(x)))
    assert torch.equal(y, reference(x))
    assert not torch.equal(y, model(x))                # it is quantized ...
    torch.testing.assert_close(y, model(x), atol=0.1, rtol=0)   # ... and close to float (outputs ~0.5)


@pytest.mark.parametrize("form", ["tuple", "dict", "dict-reversed"])
def test_several_inputs_reach_their_own_observers(form):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(2, 8, generator=g), 20 * torch.randn(2, 6, generator=g)) for _ in range(3)]
    wrap = {
        "tuple": lambda x, y: (x, y),
        "dict": lambda x, y: {"x": x, "y": y},
        "dict-reversed": lambda x, y: {"y": y, "x": x},
    }[form]
    prepared = qc.prepare(model, wrap(*data[0]))
    qc.calibrate(prepared, [wrap(*d) for d in data], progress=False)
    q = qc.convert(prepared)
    scales = {n.args[0].name: float(getattr(q, n.args[1].target)) for n in q.graph.nodes if n.target == Q}
    # 5 quantized activations: the inputs x and y, both linear outputs (mul inputs) and the mul output
    assert sorted(scales) == ["linear", "linear_1", "mul", "x", "y"]
    assert 10 < scales["y"] / scales["x"] < 40                # y (20x wider) went to y's observer
    x, y = data[0]
    out = q(**wrap(x, y)) if form.startswith("dict") else q(x, y)
    torch.testing.assert_close(out, model(x, y), atol=0.5, rtol=0.05)


# ----------------------------------------------------------------------------------------------------------
# the quantized graph
# ----------------------------------------------------------------------------------------------------------

def test_quantized_graph_reexports_with_torch_export_bit_identically():
    model, x = mlp(), torch.randn(4, 8)
    _, q = quantized(model, x)
    # w8a8 on Linear-ReLU-Linear: activations x and relu (quantize + dequantize each),
    # weights fc1 and head (stored as int8, one dequantize each); the head's output stays float.
    assert counts(q)[Q] == 2 and counts(q)[DQ] == 4 and counts(q)[LINEAR] == 2
    assert q.qc_w_fc1_weight.dtype == torch.int8 and q.qc_w_fc1_weight.shape == (16, 8)
    assert q.qc_act0_zero_point.dtype == torch.int32

    ep = torch.export.export(q, (x,))
    exported = Counter(n.target for n in ep.graph.nodes if n.op == "call_function")
    assert exported[Q] == 2 and exported[DQ] == 4 and exported[LINEAR] == 2
    run = ep.module()
    for b in [x] + batches(seed=7):
        assert torch.equal(run(b), q(b))


def test_recipe_json_round_trip():
    custom = qc.Recipe(
        "custom",
        weight=qc.QuantSpec("int4", qc.PerGroup(32), symmetric=True),
        activation=qc.QuantSpec("uint8", qc.PerTensor(), symmetric=False, observer="percentile", percentile=99.9),
        ops=("linear", "conv", "add"),
        exclude=("head", "stem.*"),
        overrides=(("block.*", "w8a16"), ("branch", "w4a16")),
        quantize_outputs=True,
    )
    for recipe in list(qc.recipes.values()) + [custom]:
        text = recipe.to_json()
        assert json.loads(text)["name"] == recipe.name
        back = qc.Recipe.from_json(text)
        assert back == recipe and back.to_json() == text
    back = qc.Recipe.from_json(custom.to_json())
    assert back.exclude == ("head", "stem.*")
    assert back.overrides == (("block.*", "w8a16"), ("branch", "w4a16"))
    assert back.weight.granularity == qc.PerGroup(32) and back.activation.percentile == 99.9
    assert back != custom.replace(exclude=("head",))


def test_named_recipes():
    assert {"w8a8", "w8a8-dynamic", "w8a16", "w4a16"} <= set(qc.recipes)
    r = qc.recipes
    assert r["w8a8"].weight.granularity == qc.PerChannel(0) and r["w8a8"].weight.symmetric
    assert r["w8a8"].activation.granularity == qc.PerTensor() and not r["w8a8"].activation.dynamic
    assert r["w8a8-dynamic"].activation.dynamic and r["w8a8-dynamic"].activation.granularity == qc.PerToken()
    assert r["w8a16"].weight_only and r["w4a16"].weight_only
    assert r["w4a16"].weight.dtype == "int4" and isinstance(r["w4a16"].weight.granularity, qc.PerGroup)


@pytest.mark.parametrize("pattern", ["head", "h*"])
def test_excluded_module_keeps_its_linear_in_float(pattern):
    model, x = mlp(), torch.randn(4, 8)
    _, q = quantized(model, x, recipe=qc.recipes["w8a8"].replace(exclude=(pattern,)))
    head, fc1 = linear_of(q, "head"), linear_of(q, "fc1")
    assert dq_inputs(head) == 0
    assert head.args[1].op == "get_attr" and head.args[1].target == "head.weight"
    assert q.get_parameter("head.weight").dtype == torch.float32
    assert dq_inputs(fc1) == 2
    assert counts(q)[Q] == 1 and counts(q)[DQ] == 2              # only x and fc1.weight
    assert [row[0] for row in table_rows(qc.inspect(q))] == ["group 0", "fc1.weight"]


def test_override_makes_a_module_weight_only():
    model, x = mlp(), torch.randn(4, 8)
    _, q = quantized(model, x, recipe=qc.recipes["w8a8"].replace(overrides=(("head", "w8a16"),)))
    head, fc1 = linear_of(q, "head"), linear_of(q, "fc1")
    assert head.args[0].target == torch.ops.aten.relu.default     # float activation into the head
    assert head.args[1].target == DQ and q.qc_w_head_weight.dtype == torch.int8
    assert dq_inputs(head) == 1 and dq_inputs(fc1) == 2
    assert counts(q)[Q] == 1 and counts(q)[DQ] == 3
    assert sorted(row[0] for row in table_rows(qc.inspect(q))) == ["fc1.weight", "group 0", "head.weight"]


def test_a_tensor_feeding_several_quantized_linears_is_quantized_once():
    """x -> q/k/v projections: one observer and one quantize for x, not one per consumer."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    _, q = quantized(SharedInput().eval(), x)
    quantizes = [n for n in q.graph.nodes if n.target == Q]
    assert sum(n.args[0].name == "x" for n in quantizes) == 1
    assert len({n.args[0] for n in quantizes}) == len(quantizes)      # no tensor is quantized twice
    x_users = {linear_of(q, m).args[0].args[0] for m in ("q", "k", "v")}
    assert len(x_users) == 1 and next(iter(x_users)).target == Q      # the three linears read one Q/DQ
    activation_rows = [r for r in table_rows(qc.inspect(q)) if r[1] == "activation"]
    assert len(activation_rows) == 2                                   # x, and the cat with its inputs


# ----------------------------------------------------------------------------------------------------------
# qc.inspect
# ----------------------------------------------------------------------------------------------------------

def test_inspect_rows_pass_log_and_printed_scales():
    model, x = mlp(), torch.randn(4, 8)
    prepared = qc.prepare(model, x)
    report = qc.inspect(prepared)
    assert report.startswith("qcompile prepared module, recipe 'w8a8', 0 calibration batches")
    rows = table_rows(report)
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [("group 0", "linear", "uint8", "mse"),
                                                        ("group 1", "linear_1", "uint8", "mse"),
                                                        ("fc1.weight", "linear", "int8", "weight minmax"),
                                                        ("head.weight", "linear_1", "int8", "weight minmax")]
    assert [r[-1] for r in rows] == ["-", "-", "at convert", "at convert"]  # nothing observed yet
    assert pass_log(report) == PREPARE_PASSES

    qc.calibrate(prepared, batches(), progress=False)
    observed = table_rows(qc.inspect(prepared))
    assert observed[1][-1].startswith("[0, ")                # the ReLU output: observed min is 0

    q = qc.convert(prepared)
    report = qc.inspect(q)
    assert report.startswith("qcompile quantized module, recipe 'w8a8', 3 calibration batches")
    rows = {r[0]: r for r in table_rows(report)}
    assert list(rows) == ["group 0", "group 1", "fc1.weight", "head.weight"]   # 2 activations + 2 weights
    assert pass_log(report) == PREPARE_PASSES + ["convert_qdq"]
    # the printed qparams are the buffers the graph computes with
    for gid in (0, 1):
        row = rows[f"group {gid}"]
        assert row[1] == "activation"
        assert row[5] == format(getattr(q, f"qc_act{gid}_scale").item(), ".4g")
        assert row[6] == str(int(getattr(q, f"qc_act{gid}_zero_point")))
    for name, n_out in (("fc1", 16), ("head", 4)):
        row, scale = rows[f"{name}.weight"], getattr(q, f"qc_w_{name}_weight_scale")
        assert row[1:5] == ["weight", "linear" if name == "fc1" else "linear_1", "int8", "PerChannel(axis=0)"]
        assert row[5] == f"[{scale.min().item():.4g} .. {scale.max().item():.4g}] x{n_out}"
        assert row[6] == f"[0 .. 0] x{n_out}"
    # and they are the qparams the quantize nodes read
    q_scales = [getattr(q, n.args[1].target) for n in q.graph.nodes if n.target == Q]
    assert [format(s.item(), ".4g") for s in q_scales] == [rows["group 0"][5], rows["group 1"][5]]


def test_inspect_of_a_prepared_module_has_a_row_per_quantized_weight_too():
    rows = table_rows(qc.inspect(qc.prepare(mlp(), torch.randn(4, 8))))
    assert len(rows) == 4


# ----------------------------------------------------------------------------------------------------------
# pass dumps
# ----------------------------------------------------------------------------------------------------------

# no in-place ops, computed weights, parameter GEMMs or tied weights here: 001-004 change nothing (no diff)
UNCHANGED_FRONT = ["001_functionalize_inplace.txt", "002_fold_constant_weights.txt", "003_gemm_to_linear.txt",
                   "004_untie_weights.txt"]
PREPARE_DUMP_CONV_BN = ["000_input.txt", *UNCHANGED_FRONT, "005_fold_bn.diff", "005_fold_bn.txt", "006_annotate.txt",
                        "007_share_qparams.txt", "008_insert_observers.diff", "008_insert_observers.txt"]


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_dump_dir_writes_numbered_files_and_diffs_only_for_changes(tmp_path):
    torch.manual_seed(0)
    prepared = qc.prepare(DigitsCNN(width=8).eval(), torch.rand(4, 1, 8, 8), dump_dir=tmp_path)
    assert _names(tmp_path) == ["prepare"]
    assert _names(tmp_path / "prepare") == PREPARE_DUMP_CONV_BN
    before = (tmp_path / "prepare" / "000_input.txt").read_text()
    after = (tmp_path / "prepare" / "005_fold_bn.txt").read_text()
    assert before.count("aten.batch_norm") > 0 and after.count("aten.batch_norm") == 0
    diff = (tmp_path / "prepare" / "005_fold_bn.diff").read_text().splitlines()
    assert diff[:2] == ["--- before", "+++ after fold_bn"]
    assert sum(line.startswith("-") and "aten.batch_norm.default(" in line for line in diff) == 2
    assert not any(line.startswith("+") and "batch_norm" in line for line in diff)
    # the insert_observers diff adds exactly the observer calls the prepared graph holds
    observers = (tmp_path / "prepare" / "008_insert_observers.diff").read_text().splitlines()
    calls = sum(n.op == "call_module" for n in prepared.graph.nodes)
    assert calls == record(prepared, "insert_observers").stats["observer calls"] >= 5
    assert sum(line.startswith("+") and "= self.qc_observer_" in line for line in observers) == calls
    assert not any(line.startswith("-") and "qc_observer" in line for line in observers)

    qc.calibrate(prepared, [torch.rand(4, 1, 8, 8)], progress=False)
    qc.convert(prepared, dump_dir=tmp_path)
    assert _names(tmp_path / "convert") == ["000_input.txt", "001_convert_qdq.diff", "001_convert_qdq.txt"]
    assert "qcompile.quantize" in (tmp_path / "convert" / "001_convert_qdq.txt").read_text()


def test_dump_dir_without_batch_norm_has_no_fold_bn_diff(tmp_path):
    qc.prepare(mlp(), torch.randn(4, 8), dump_dir=tmp_path)
    assert _names(tmp_path / "prepare") == ["000_input.txt", *UNCHANGED_FRONT, "005_fold_bn.txt", "006_annotate.txt",
                                            "007_share_qparams.txt", "008_insert_observers.diff",
                                            "008_insert_observers.txt"]


def test_dump_dir_from_the_environment(tmp_path, monkeypatch):
    env_dir, arg_dir = tmp_path / "env", tmp_path / "arg"
    monkeypatch.setenv("QCOMPILE_DUMP_DIR", str(env_dir))
    torch.manual_seed(0)
    model, x = DigitsCNN(width=8).eval(), torch.rand(4, 1, 8, 8)
    prepared = qc.prepare(model, x)
    assert _names(env_dir / "prepare") == PREPARE_DUMP_CONV_BN
    qc.calibrate(prepared, [x], progress=False)
    qc.convert(prepared)
    assert _names(env_dir / "convert") == ["000_input.txt", "001_convert_qdq.diff", "001_convert_qdq.txt"]
    # an explicit argument wins over the variable
    qc.prepare(model, x, dump_dir=arg_dir)
    assert _names(arg_dir / "prepare") == PREPARE_DUMP_CONV_BN
    assert _names(env_dir) == ["convert", "prepare"]
    monkeypatch.delenv("QCOMPILE_DUMP_DIR")
    qc.prepare(model, x)
    assert _names(tmp_path) == ["arg", "env"]


# ----------------------------------------------------------------------------------------------------------
# pass failures
# ----------------------------------------------------------------------------------------------------------

class Broken(Pass):
    name = "broken"

    def call(self, gm):
        raise RuntimeError("boom: a deliberate failure")


class DanglingGetAttr(Pass):
    """Leaves a graph that reads an attribute nobody registered."""
    name = "dangling"

    def call(self, gm):
        first = next(iter(gm.graph.nodes))
        with gm.graph.inserting_after(first):
            node = gm.graph.get_attr("no_such_buffer")
        with gm.graph.inserting_after(node):
            gm.graph.call_function(torch.ops.aten.relu.default, (node,))
        return PassResult(gm, modified=True)


class Copying(Pass):
    """Breaks the in-place contract: returns a different GraphModule."""
    name = "copying"

    def call(self, gm):
        return PassResult(fx.GraphModule(gm, gm.graph), modified=False)


def _captured_conv_bn():
    torch.manual_seed(0)
    return capture(DigitsCNN(width=8).eval(), (torch.rand(2, 1, 8, 8),))


def test_a_failing_pass_is_reported_with_the_passes_before_it():
    gm = _captured_conv_bn()
    pm = PassManager([FoldBatchNorm(), Annotate(qc.recipes["w8a8"]), Broken()])
    with pytest.raises(qc.PassError) as info:
        pm(gm)
    msg = str(info.value)
    assert msg.startswith("pass 'broken' failed after the passes ['fold_bn', 'annotate']: "
                          "RuntimeError: boom: a deliberate failure.")
    assert "dump_dir" in msg and "QCOMPILE_DUMP_DIR" in msg
    assert isinstance(info.value.__cause__, RuntimeError)
    assert [r.name for r in pm.records] == ["fold_bn", "annotate"]
    assert pm.records[0].stats["folded"] == 2

    with pytest.raises(qc.PassError, match=r"^pass 'broken' failed after the passes \[\]: RuntimeError"):
        PassManager([Broken(), FoldBatchNorm()])(_captured_conv_bn())


def test_a_pass_that_leaves_a_broken_graph_is_caught_by_the_verifier():
    with pytest.warns(UserWarning, match="get_attr"):
        with pytest.raises(qc.PassError, match=r"^pass 'dangling' failed after the passes \['fold_bn'\]: "
                                               r"RuntimeError: .*nonexistent attribute no_such_buffer"):
            PassManager([FoldBatchNorm(), DanglingGetAttr()])(_captured_conv_bn())


def test_a_pass_that_returns_a_new_module_is_named_with_the_passes_before_it():
    with pytest.raises(qc.PassError, match=r"pass 'copying' failed after the passes \['fold_bn'\]"):
        PassManager([FoldBatchNorm(), Copying()])(_captured_conv_bn())


# ----------------------------------------------------------------------------------------------------------
# dynamic activation quantization
# ----------------------------------------------------------------------------------------------------------

def test_w8a8_dynamic_needs_no_calibration_and_quantizes_per_token():
    model = mlp()
    x = torch.randn(2, 5, 8)
    prepared = qc.prepare(model, x, recipe="w8a8-dynamic")
    assert prepared.meta["qcompile"].observers == {}
    assert not any(n.op == "call_module" for n in prepared.graph.nodes)
    q = qc.convert(prepared)                                  # no qc.calibrate
    c = counts(q)
    assert c[CHOOSE] == 2                                      # one per linear input
    assert c[Q] == 2 and c[DQ] == 4 and c[operator.getitem] == 4
    for name in ("fc1", "head"):
        act = linear_of(q, name).args[0]
        assert act.target == DQ and act.args[0].target == Q and act.args[0].args[1].args[0].target == CHOOSE
    rows = table_rows(qc.inspect(q))
    assert sorted(r[1] for r in rows) == ["dynamic", "dynamic", "weight", "weight"]

    y = q(x)
    torch.testing.assert_close(y, model(x), atol=0.02, rtol=0)
    # per token: making one token 100x larger changes no other token's output
    x2 = x.clone()
    x2[0, 0] *= 100
    y2 = q(x2)
    assert torch.equal(y2[0, 1:], y[0, 1:]) and torch.equal(y2[1], y[1])
    assert not torch.equal(y2[0, 0], y[0, 0])
