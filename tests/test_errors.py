"""Every input a user can get wrong: a `qc.QCompileError` subclass whose message says what was wrong and
what to do, and the user's model exactly as it was before the call (weights, buffers, mode, attributes)."""
from __future__ import annotations

import importlib.util
import inspect
import textwrap

import pytest
import torch
from torch import nn

import qcompile as qc


# ----------------------------------------------------------------------------------------------------------
# tiny models and the "untouched" check
# ----------------------------------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.5)
        self.relu = nn.ReLU()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.relu(self.drop(self.fc1(x))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture it
            return self.fc(x)
        return -x


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: (v.dtype, tuple(v.shape), _bits(v).clone()) for k, v in model.state_dict().items()},
        "modules": {
            name: (m.training, sorted(vars(m)), sorted(m._parameters), sorted(m._buffers), sorted(m._modules),
                   len(m._forward_hooks), len(m._forward_pre_hooks))
            for name, m in model.named_modules()
        },
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"], "mode, attributes, submodules or hooks of the model changed"
    assert after["state"].keys() == before["state"].keys()
    for key, (dtype, shape, bits) in before["state"].items():
        new_dtype, new_shape, new_bits = after["state"][key]
        assert (new_dtype, new_shape) == (dtype, shape), key
        assert torch.equal(new_bits, bits), f"{key} changed in place"


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    model = MLP().train()  # train mode on purpose: it must stay in train mode
    return model, snapshot(model)


@pytest.fixture
def prepared(mlp):
    model, before = mlp
    return qc.prepare(model, torch.randn(4, 8)), model, before


def _line_of(func, text: str) -> int:
    lines, start = inspect.getsourcelines(func)
    return start + next(i for i, line in enumerate(lines) if text in line)


# ----------------------------------------------------------------------------------------------------------
# prepare: model, example inputs, capture, recipe
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("not_a_model, type_name", [
    (lambda x: x * 2, "function"),
    ({"fc1.weight": torch.zeros(16, 8)}, "dict"),         # a state_dict instead of the module
    ("resnet18", "str"),
])
def test_prepare_rejects_objects_that_are_not_modules(not_a_model, type_name):
    with pytest.raises(qc.InvalidModelError, match=rf"torch\.nn\.Module.*got {type_name}$"):
        qc.prepare(not_a_model, torch.randn(4, 8))


@pytest.mark.parametrize("inputs, expected", [
    ("an image", r"must be a tensor, a tuple of positional arguments or a dict of keyword arguments, got str"),
    (["a", "b"], r"hold no tensor; pass the tensors the model's forward takes"),
    (None, r"must be a tensor, a tuple .* got NoneType"),
    (7, r"must be a tensor, a tuple .* got int"),
])
def test_prepare_rejects_example_inputs_that_are_not_tensors(mlp, inputs, expected):
    model, before = mlp
    with pytest.raises(qc.InvalidInputsError, match=expected):
        qc.prepare(model, inputs)
    assert_untouched(model, before)


def test_prepare_reports_example_inputs_the_model_rejects():
    torch.manual_seed(0)
    model = ConvNet().train()
    before = snapshot(model)
    with pytest.raises(qc.InvalidInputsError) as info:
        qc.prepare(model, torch.randn(2, 1, 8, 8))        # 1 channel, the conv wants 3
    msg = str(info.value)
    assert "the model rejects the example inputs" in msg
    assert "expected input[2, 1, 8, 8] to have 3 channels, but got 1" in msg   # what was wrong
    assert "Pass inputs with the shapes and dtypes its forward expects" in msg  # what to do
    assert isinstance(info.value.__cause__, RuntimeError)
    assert_untouched(model, before)  # the rejected forward ran on a copy: BN running stats unchanged


def test_prepare_rejects_keyword_inputs_with_unknown_names(mlp):
    model, before = mlp
    with pytest.raises(qc.InvalidInputsError, match=r"rejects the example inputs: TypeError: .*'inp'"):
        qc.prepare(model, {"inp": torch.randn(4, 8)})
    assert_untouched(model, before)


def test_capture_failure_names_the_data_dependent_branch_and_suggests_torch_cond():
    torch.manual_seed(0)
    model = Branchy().train()
    before = snapshot(model)
    with pytest.raises(qc.CaptureError) as info:
        qc.prepare(model, torch.randn(4, 8))
    msg = str(info.value)
    line = _line_of(Branchy.forward, "if x.sum() > 0")
    assert f"{__file__}:{line} in forward: if x.sum() > 0:" in msg      # where: this file, this line
    assert "data-dependent" in msg
    assert "torch.cond" in msg and "exclude" in msg                     # what to do
    assert_untouched(model, before)


def test_capture_failure_location_for_a_model_under_a_directory_named_qcompile(tmp_path):
    path = tmp_path / "qcompile-experiments" / "branchy_model.py"
    path.parent.mkdir()
    path.write_text("import torch\nfrom torch import nn\n\n\n" + textwrap.dedent(inspect.getsource(Branchy)))
    spec = importlib.util.spec_from_file_location("branchy_model_under_qcompile_dir", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(qc.CaptureError) as info:
        qc.prepare(module.Branchy(), torch.randn(4, 8))
    line = _line_of(module.Branchy.forward, "if x.sum() > 0")
    assert f"{path}:{line} in forward" in str(info.value)


def test_unknown_recipe_lists_known_recipes_and_suggests_the_close_match(mlp):
    model, before = mlp
    with pytest.raises(qc.RecipeError) as info:
        qc.prepare(model, torch.randn(4, 8), recipe="w8a9")
    msg = str(info.value)
    assert msg.startswith("unknown recipe 'w8a9'; known recipes: ")
    for name in ("w8a8", "w8a8-dynamic", "w8a16", "w4a16"):
        assert name in msg
    assert "Did you mean 'w8a8'" in msg
    assert_untouched(model, before)


def test_recipe_of_the_wrong_type(mlp):
    model, before = mlp
    with pytest.raises(qc.RecipeError, match=r"name from qcompile\.recipes or a qcompile\.Recipe, got dict"):
        qc.prepare(model, torch.randn(4, 8), recipe={"weight": "int8"})
    assert_untouched(model, before)


@pytest.mark.parametrize("field, value", [
    ("exclude", ("decoder.*",)),
    ("overrides", (("lm_head", "w8a16"),)),
])
def test_module_pattern_that_matches_nothing(mlp, field, value):
    model, before = mlp
    recipe = qc.recipes["w8a8"].replace(**{field: value})
    pattern = value[0] if field == "exclude" else value[0][0]
    with pytest.raises(qc.RecipeError) as info:
        qc.prepare(model, torch.randn(4, 8), recipe=recipe)
    msg = str(info.value)
    assert f"the module pattern {pattern!r} matches no module of the model" in msg
    assert "model.named_modules(), e.g. fc1, drop, relu, head" in msg   # the names it could have matched
    assert_untouched(model, before)


def test_a_shipped_override_may_match_nothing_also_in_a_renamed_recipe(mlp):
    """w4a16's *lm_head override is a default for language models: a model without one, under a
    recipe derived from w4a16 and renamed, prepares (the user's own patterns still must match)."""
    model, before = mlp
    recipe = qc.recipes["w4a16"].replace(name="my-w4a16")
    prepared = qc.prepare(model, torch.randn(4, 8), recipe=recipe)
    assert prepared.meta["qcompile"].recipe.overrides == (("*lm_head", "w8a16"),)
    assert_untouched(model, before)


def test_override_naming_an_unknown_recipe(mlp):
    model, before = mlp
    recipe = qc.recipes["w8a8"].replace(overrides=(("head", "w8a61"),))
    with pytest.raises(qc.RecipeError) as info:
        qc.prepare(model, torch.randn(4, 8), recipe=recipe)
    msg = str(info.value)
    assert "unknown recipe 'w8a61'" in msg
    assert "Did you mean 'w8a16'" in msg
    assert_untouched(model, before)


# ----------------------------------------------------------------------------------------------------------
# calibrate
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batches", [[], (), iter([]), (b for b in [])], ids=["list", "tuple", "iterator", "generator"])
def test_calibrate_with_no_batches(prepared, batches):
    gm, model, before = prepared
    with pytest.raises(qc.CalibrationError, match=r"got no batches; pass a non-empty iterable of representative"):
        qc.calibrate(gm, batches, progress=False)
    assert gm.meta["qcompile"].calibration_batches == 0
    with pytest.raises(qc.ConvertError, match="calibrat"):  # still needs calibration
        qc.convert(gm)
    assert_untouched(model, before)


@pytest.mark.parametrize("batches", [None, 3])
def test_calibrate_with_batches_that_are_not_iterable(prepared, batches):
    gm, _, _ = prepared
    with pytest.raises(qc.CalibrationError, match="iterable"):
        qc.calibrate(gm, batches, progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_calibrate_rejects_non_finite_batches(prepared, bad):
    gm, model, before = prepared
    poisoned = torch.randn(4, 8)
    poisoned[1, 3] = bad
    poisoned[2, 0] = bad
    with pytest.raises(qc.CalibrationError) as info:
        qc.calibrate(gm, [torch.randn(4, 8), poisoned], progress=False)
    msg = str(info.value)
    assert "calibration batch 1, input 'x' holds 2 NaN/inf values" in msg   # which batch, which input, how many
    assert "Clean or drop that batch" in msg
    assert gm.meta["qcompile"].calibration_batches == 0
    assert_untouched(model, before)


def test_calibrate_rejects_nan_for_sequential_models():
    gm = qc.prepare(nn.Sequential(nn.Linear(8, 4), nn.ReLU()), torch.randn(4, 8))
    with pytest.raises(qc.CalibrationError, match="NaN/inf"):
        qc.calibrate(gm, [torch.full((4, 8), float("nan"))], progress=False)


@pytest.mark.parametrize("batch, expected", [
    (torch.randn(4, 8, 1), r"input 'x' has rank 3 \(shape \(4, 8, 1\)\), captured with rank 2"),
    (torch.randn(8), r"input 'x' has rank 1 \(shape \(8,\)\), captured with rank 2"),
    (torch.randn(4, 9), r"input 'x' has size 9 in dim 1 \(shape \(4, 9\)\), captured as \(any, 8\)"),
    (torch.randn(4, 8, dtype=torch.float64), r"input 'x' has dtype torch\.float64, captured with torch\.float32"),
    (torch.ones(4, 8, dtype=torch.int64), r"input 'x' has dtype torch\.int64, captured with torch\.float32"),
    ({"inp": torch.randn(4, 8)}, r"calibration batch 0 does not match the model's arguments"),
    ("text", r"calibration batch 0 must be a tensor, a tuple of positional arguments or a dict"),
], ids=["rank3", "rank1", "features", "float64", "int64", "kwarg-name", "str"])
def test_calibrate_rejects_batches_unlike_the_example_inputs(prepared, batch, expected):
    gm, model, before = prepared
    with pytest.raises(qc.InvalidInputsError, match=expected):
        qc.calibrate(gm, [batch], progress=False)
    assert gm.meta["qcompile"].calibration_batches == 0
    assert_untouched(model, before)


def test_calibrate_rejects_wrong_channel_count():
    torch.manual_seed(0)
    model = ConvNet().train()
    before = snapshot(model)
    gm = qc.prepare(model, torch.randn(2, 3, 8, 8))
    with pytest.raises(qc.InvalidInputsError,
                       match=r"calibration batch 0, input 'x' has size 1 in dim 1 \(shape \(2, 1, 8, 8\)\), "
                             r"captured as \(any, 3, 8, 8\)"):
        qc.calibrate(gm, [torch.randn(2, 1, 8, 8)], progress=False)
    assert_untouched(model, before)


@pytest.mark.parametrize("batch, remedy", [
    (torch.randn(4, 8, 1), r"reshape|shaped like|same rank|example input"),
    (torch.randn(4, 8, dtype=torch.float64), r"\.to\(|\.float\(\)|cast|convert"),
], ids=["rank", "dtype"])
def test_rank_and_dtype_errors_say_what_to_do(prepared, batch, remedy):
    gm, _, _ = prepared
    with pytest.raises(qc.InvalidInputsError, match=remedy):
        qc.calibrate(gm, [batch], progress=False)


def test_batch_size_hint_works_dynamic_shapes_accepts_other_batch_sizes(mlp):
    model, before = mlp
    gm = qc.prepare(model, torch.randn(4, 8), dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}})
    qc.calibrate(gm, [torch.randn(5, 8), torch.randn(3, 8)], progress=False)  # the fix the message suggests
    assert gm.meta["qcompile"].calibration_batches == 2
    assert qc.convert(gm)(torch.randn(7, 8)).shape == (7, 4)
    assert_untouched(model, before)


# ----------------------------------------------------------------------------------------------------------
# convert, and calibrate after convert
# ----------------------------------------------------------------------------------------------------------

def test_convert_before_any_calibration(prepared):
    gm, model, before = prepared
    with pytest.raises(qc.ConvertError) as info:
        qc.convert(gm)
    msg = str(info.value)
    assert "convert() needs calibration first" in msg
    assert "call qc.calibrate(prepared, batches)" in msg
    # the failed convert left the prepared module usable
    assert gm.meta["qcompile"].stage == "prepared"
    qc.calibrate(gm, [torch.randn(4, 8)], progress=False)
    assert qc.convert(gm)(torch.randn(4, 8)).shape == (4, 4)
    assert_untouched(model, before)


@pytest.mark.parametrize("what", ["user model", "exported module", "state_dict", "None"])
def test_convert_rejects_modules_that_qc_prepare_did_not_return(mlp, what):
    model, before = mlp
    x = torch.randn(4, 8)
    obj = {
        "user model": model,
        "exported module": torch.export.export(MLP().eval(), (x,)).module(),
        "state_dict": model.state_dict(),
        "None": None,
    }[what]
    with pytest.raises(qc.InvalidModelError,
                       match=rf"convert takes the module that qc\.prepare returned, got {type(obj).__name__}$"):
        qc.convert(obj)
    assert_untouched(model, before)


def test_convert_and_calibrate_reject_an_already_quantized_module(prepared):
    gm, model, before = prepared
    qc.calibrate(gm, [torch.randn(4, 8)], progress=False)
    quantized = qc.convert(gm)
    scale = quantized.qc_act0_scale.clone()
    with pytest.raises(qc.CalibrationError,
                       match=r"already quantized; calibrate the prepared module before convert"):
        qc.calibrate(quantized, [torch.randn(4, 8)], progress=False)
    with pytest.raises(qc.ConvertError, match="already quantized"):
        qc.convert(quantized)
    assert torch.equal(quantized.qc_act0_scale, scale)
    assert quantized.meta["qcompile"].calibration_batches == 1
    assert_untouched(model, before)


def test_calibrate_and_inspect_reject_modules_that_qc_prepare_did_not_return(mlp):
    model, before = mlp
    with pytest.raises(qc.InvalidModelError, match=r"calibrate takes the module that qc\.prepare returned, got MLP"):
        qc.calibrate(model, [torch.randn(4, 8)], progress=False)
    with pytest.raises(qc.InvalidModelError, match=r"inspect takes a module from qc\.prepare or qc\.convert, got MLP"):
        qc.inspect(model)
    assert_untouched(model, before)
