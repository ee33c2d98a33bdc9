"""Precision as a property of the graph: a dtype per node from a policy, and the casts between them.

`AssignPrecision` gives every node that computes on floating tensors a compute dtype:

- "low" ops (matmul, linear, conv, attention) run in the recipe's low dtype (bfloat16 / float16);
- "fp32" ops (norms, softmax, reductions, exp/log/pow, losses) run in float32: they accumulate
  or amplify rounding error, and FP16's range overflows in exp and sums of squares;
- every other op "follows": it runs in the widest dtype of its floating inputs (the promotion rule
  `torch.autocast` applies to mixed inputs), so elementwise work between two linears stays low and
  an add with a float32 attention mask runs in float32;
- a user override (`{"pattern": "fp32" | "bf16" | "fp16"}`, fnmatch on module names) sets the
  dtype of the low ops inside the matching modules ("fp32" keeps a module entirely in float32).

Then it inserts one cast per edge whose producer dtype differs from its consumer's compute dtype (what
autocast does op by op), converts weights and biases read only by low ops to the low dtype in the
module's storage (no cast node: the graph then holds FP16/BF16 parameters), and casts the graph
outputs back to the dtypes the model returned. `RemoveRedundantCasts` (its own file) then removes
the casts that are duplicates, no-ops or exact round trips.

`InsertFp8FakeQuant` is the `fp8` recipe: E4M3 per-tensor fake-quant (s = amax / 448, saturating) of
both inputs of every low op, weights rounded once in storage, activations through a
`DelayedScalingFakeQuant` module whose amax history calibration fills; compute stays float32.
`fp8-qat` keeps the weights in float32 (latent weights, fake-quantized at every call with their own
amax, straight-through gradient) and fake-quantizes the gradient flowing back into each activation
with E5M2 and its own delayed scaling.

`prepare_precision(gm, recipe, overrides)` runs the recipe's passes on a freshly captured module;
`freeze_fp8(gm)` turns a calibrated FP8 module into plain ops with constant scales (for export).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx

from ..errors import RecipeError
from ..fp8 import FORMATS, CurrentScalingFakeQuant, DelayedScalingFakeQuant, fp8_round, fp8_scale
from ..graph import FROM_PASS, get_param, module_name, set_param, tensor_val
from .base import Pass, PassManager, PassRecord, PassResult
from .fold_bn import FoldBatchNorm
from .remove_redundant_casts import CAST_TARGETS, RemoveRedundantCasts, count_casts, is_float_cast

aten = torch.ops.aten
PRECISION = "qcompile_precision"        # node.meta: the node's compute dtype; GraphModule.meta: the summary

# Op families by ATen overload-packet name (every overload of an op gets the same treatment).
LOW_OPS = frozenset({
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "matmul", "mm", "bmm", "addmm", "addbmm", "baddbmm", "einsum", "scaled_dot_product_attention",
})
FP32_OPS = frozenset({
    "layer_norm", "native_layer_norm", "batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training",
    "group_norm", "native_group_norm", "instance_norm", "rms_norm",
    "softmax", "_softmax", "log_softmax", "_log_softmax", "logsumexp",
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "pow", "rsqrt", "sqrt", "reciprocal", "softplus",
    "acos", "asin", "cosh", "sinh", "tan", "erfinv",
    "sum", "mean", "var", "var_mean", "std", "std_mean", "norm", "linalg_vector_norm", "cumsum", "cumprod", "prod",
    "cosine_similarity", "cdist", "dist",
    "cross_entropy_loss", "nll_loss", "nll_loss2d", "nll_loss_forward", "mse_loss", "l1_loss", "smooth_l1_loss",
    "huber_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div",
})
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionRecipe:
    """A precision policy: which dtype each op family computes in, plus per-module overrides."""

    name: str
    low_dtype: torch.dtype = torch.bfloat16
    fp8: str | None = None                      # "e4m3": fake-quant the inputs of low ops to FP8
    fold_bn: bool = True                        # fold eval BatchNorm first: its FP32 island would cost two casts
    low_ops: frozenset = LOW_OPS
    fp32_ops: frozenset = FP32_OPS
    overrides: tuple = ()                       # ((module pattern, "fp32" | "bf16" | "fp16"), ...)
    history_len: int = 16                       # FP8 delayed-scaling amax history
    qat: bool = False                           # FP8 QAT: latent FP32 weights, E5M2 gradients

    def __post_init__(self):
        for pattern, dtype in self.overrides:
            if dtype not in DTYPES:
                raise RecipeError(f"precision override {pattern!r}: {dtype!r} is not a dtype name; use one of "
                                  f"{sorted(DTYPES)}")
        if set(self.low_ops) & set(self.fp32_ops):
            raise RecipeError(f"ops listed as both low and fp32: {sorted(set(self.low_ops) & set(self.fp32_ops))}")

    def with_overrides(self, overrides) -> "PrecisionRecipe":
        items = tuple(overrides.items()) if isinstance(overrides, dict) else tuple(tuple(o) for o in overrides)
        return dataclasses.replace(self, overrides=self.overrides + items)

    def override_for(self, module: str) -> torch.dtype | None:
        """The dtype of the last override whose pattern matches `module` or one of its parents."""
        found = None
        for pattern, dtype in self.overrides:
            if any(fnmatch.fnmatchcase(m, pattern) for m in _prefixes(module)):
                found = DTYPES[dtype]
        return found


PRECISION_RECIPES: dict[str, PrecisionRecipe] = {
    "bf16": PrecisionRecipe("bf16", torch.bfloat16),
    "fp16": PrecisionRecipe("fp16", torch.float16),
    "fp8": PrecisionRecipe("fp8", torch.float32, fp8="e4m3"),
    "fp8-qat": PrecisionRecipe("fp8-qat", torch.float32, fp8="e4m3", fold_bn=False, qat=True),
}


def get_precision_recipe(recipe: "str | PrecisionRecipe", overrides=None) -> PrecisionRecipe:
    if isinstance(recipe, PrecisionRecipe):
        found = recipe
    elif recipe in PRECISION_RECIPES:
        found = PRECISION_RECIPES[recipe]
    else:
        raise RecipeError(f"unknown precision recipe {recipe!r}; use one of {sorted(PRECISION_RECIPES)} "
                          f"or a qcompile.passes.precision.PrecisionRecipe")
    return found.with_overrides(overrides) if overrides else found


def _prefixes(module: str) -> list[str]:
    parts = module.split(".") if module else []
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _op_name(node: fx.Node) -> str:
    packet = getattr(node.target, "overloadpacket", None)
    return packet.__name__ if packet is not None else getattr(node.target, "__name__", "")


def _dtype_of(gm: fx.GraphModule, node) -> torch.dtype | None:
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        try:
            value = get_param(gm, node)
        except AttributeError:
            return None
        return value.dtype if isinstance(value, torch.Tensor) else None
    val = tensor_val(node)
    return val.dtype if val is not None else None


def _retype(val, dtype):
    """The recorded fake value of a node whose floating outputs now have `dtype`."""
    if isinstance(val, torch.Tensor):
        return val.to(dtype) if val.is_floating_point() else val
    if isinstance(val, (tuple, list)):
        return type(val)(_retype(v, dtype) for v in val)
    return val


def _is_float(dtype) -> bool:
    return dtype is not None and dtype.is_floating_point


def _insert_cast(gm: fx.GraphModule, src: fx.Node, dtype: torch.dtype, before: fx.Node, pass_name: str) -> fx.Node:
    with gm.graph.inserting_before(before):
        cast = gm.graph.call_function(aten.to.dtype, (src, dtype))
    cast.meta["val"] = _retype(src.meta.get("val"), dtype)
    cast.meta[FROM_PASS] = pass_name
    cast.meta[PRECISION] = dtype
    if "nn_module_stack" in before.meta:
        cast.meta["nn_module_stack"] = before.meta["nn_module_stack"]
    return cast


def check_override_patterns(gm: fx.GraphModule, recipe: PrecisionRecipe) -> None:
    names = {p for n in gm.graph.nodes for p in _prefixes(module_name(n))}
    for pattern, _ in recipe.overrides:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            sample = ", ".join(sorted(names)[:8]) + (", ..." if len(names) > 8 else "")
            raise RecipeError(f"the precision override pattern {pattern!r} matches no module of the model "
                              f"(fnmatch on names from model.named_modules(), e.g. {sample})")


class AssignPrecision(Pass):
    name = "precision"

    def __init__(self, recipe: PrecisionRecipe, *, keep_fp32_params: bool = False):
        self.recipe = recipe
        # Training (QAT with a precision): parameters stay FP32 masters and are cast in the graph,
        # so the optimizer updates FP32 values and the low-precision copy is made every step.
        self.keep_fp32_params = keep_fp32_params

    def kind(self, node: fx.Node) -> tuple[str, torch.dtype | None]:
        """('low' | 'fp32' | 'follow', dtype or None for follow) for a call_function node."""
        op = _op_name(node)
        if op in self.recipe.fp32_ops:
            return "fp32", torch.float32
        if op in self.recipe.low_ops:
            forced = self.recipe.override_for(module_name(node))
            return "low", forced if forced is not None else self.recipe.low_dtype
        return "follow", None

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        orig = {n: _dtype_of(gm, n) for n in graph.nodes}
        dt = dict(orig)                       # dtype of each node's (floating) output after the pass
        compute: dict[fx.Node, torch.dtype] = {}
        kinds = Counter()
        for n in graph.nodes:
            if n.op != "call_function":
                continue
            if n.target is operator.getitem:
                src = n.args[0]
                if _is_float(orig[n]) and src in compute:
                    dt[n] = compute[src]
                continue
            if n.target in CAST_TARGETS or n.target is aten._assert_tensor_metadata.default:
                continue                      # the model's own casts keep their dtype
            floats = [a for a in n.all_input_nodes if _is_float(dt.get(a))]
            if not floats:
                continue                      # factories (zeros, arange) and integer work keep their dtype
            kind, dtype = self.kind(n)
            if dtype is None:
                dtype = dt[floats[0]]
                for a in floats[1:]:
                    dtype = torch.promote_types(dtype, dt[a])
            kinds[kind] += 1
            compute[n] = dtype
            n.meta[PRECISION] = dtype
            if _is_float(orig[n]):
                dt[n] = dtype

        # Weights and biases read only by low ops of one dtype are stored in that dtype.
        converted = 0
        for n in graph.nodes:
            if self.keep_fp32_params or n.op != "get_attr" or not _is_float(orig[n]) or not n.users:
                continue
            wanted = {compute.get(u) for u in n.users}
            if len(wanted) == 1 and all(self.kind(u)[0] == "low" for u in n.users if u.op == "call_function"):
                (dtype,) = wanted
                if dtype is not None and dtype != orig[n]:
                    set_param(gm, n, get_param(gm, n).detach().to(dtype))
                    dt[n] = dtype
                    n.meta["val"] = _retype(n.meta.get("val"), dtype)
                    converted += 1

        inserted = 0
        for n in list(graph.nodes):
            if n in compute:
                for a in list(n.all_input_nodes):
                    if _is_float(dt.get(a)) and dt[a] != compute[n]:
                        n.replace_input_with(a, _insert_cast(gm, a, compute[n], n, self.name))
                        inserted += 1
                if dt[n] != orig[n]:
                    n.meta["val"] = _retype(n.meta.get("val"), dt[n])
            elif n.op == "call_function" and n.target is operator.getitem and dt[n] != orig[n]:
                n.meta["val"] = _retype(n.meta.get("val"), dt[n])
            elif n.op == "call_function" and n.target is aten._assert_tensor_metadata.default:
                a = n.args[0]
                if isinstance(a, fx.Node) and dt.get(a) != orig.get(a) and "dtype" in n.kwargs:
                    n.kwargs = {**n.kwargs, "dtype": dt[a]}
            elif n.op == "output":
                # the module keeps its interface: outputs come back in the dtypes the model returned
                for a in list(n.all_input_nodes):
                    if _is_float(dt.get(a)) and dt[a] != orig[a]:
                        n.replace_input_with(a, _insert_cast(gm, a, orig[a], n, self.name))
                        inserted += 1
        stats = {"low": kinds["low"], "fp32": kinds["fp32"], "follow": kinds["follow"],
                 "casts_inserted": inserted, "weights_converted": converted}
        return PassResult(gm, modified=bool(inserted or converted), stats=stats)


class InsertFp8FakeQuant(Pass):
    """E4M3 fake-quant of the inputs of low ops (weights in storage, activations via modules)."""

    name = "fp8_fake_quant"

    def __init__(self, recipe: PrecisionRecipe):
        self.recipe = recipe

    def call(self, gm: fx.GraphModule) -> PassResult:
        fmt = self.recipe.fp8
        weights, modules = 0, {}
        rounded = set()
        for n in list(gm.graph.nodes):
            if n.op != "call_function" or _op_name(n) not in self.recipe.low_ops:
                continue
            if self.recipe.override_for(module_name(n)) is not None:
                continue                                # an override keeps this module out of FP8
            n.meta[PRECISION] = f"fp8_{fmt}"
            n_inputs = 2                                # (activation, weight) or (a, b) of a matmul
            for a in list(n.args[:n_inputs]):
                if not isinstance(a, fx.Node) or not _is_float(_dtype_of(gm, a)):
                    continue
                if a.op == "get_attr" and self.recipe.qat:
                    if a not in modules:                # latent FP32 weight, fake-quantized per call
                        modules[a] = self._module(gm, a, CurrentScalingFakeQuant(fmt), "fp8_weight_fake_quant")
                        weights += 1
                    n.replace_input_with(a, modules[a])
                    continue
                if a.op == "get_attr":
                    if a.target not in rounded:         # per-tensor, current scaling: the weight is known
                        w = get_param(gm, a).detach()
                        s = fp8_scale(w.abs().amax(), fmt)
                        set_param(gm, a, (fp8_round(w.float() / s, fmt) * s).to(w.dtype))
                        rounded.add(a.target)
                        weights += 1
                    continue
                if a not in modules:                    # one module per tensor: one scale per tensor
                    grad_fmt = "e5m2" if self.recipe.qat else None
                    fq = DelayedScalingFakeQuant(fmt, self.recipe.history_len, grad_fmt=grad_fmt)
                    modules[a] = self._module(gm, a, fq, "fp8_fake_quant")
                n.replace_input_with(a, modules[a])
        activations = sum(1 for a in modules if a.op != "get_attr")
        stats = {"weights_fp8": weights, "activation_fake_quants": activations}
        return PassResult(gm, modified=bool(weights or modules), stats=stats)

    def _module(self, gm: fx.GraphModule, src: fx.Node, module, prefix: str) -> fx.Node:
        i = 0
        while hasattr(gm, f"{prefix}_{i}"):
            i += 1
        gm.add_submodule(f"{prefix}_{i}", module)
        with gm.graph.inserting_after(src):
            node = gm.graph.call_module(f"{prefix}_{i}", (src,))
        node.meta["val"] = src.meta.get("val")
        node.meta[FROM_PASS] = self.name
        return node


class FreezeFp8(Pass):
    """Replace each FP8 fake-quant module by plain ops with its frozen scale, for export:

        x / s -> clamp(-fmax, fmax) -> to(float8) -> to(float32) -> * s

    torch's cast to float8 of a clamped value is the saturating round of `fp8_round` (checked bit for
    bit in tests/test_fp8.py), so the frozen graph computes the same values, and exporters write the
    casts as ONNX `Cast` to FLOAT8E4M3FN / FLOAT8E5M2 (opset >= 19). QAT weight fake-quants are
    rounded into the weight's storage instead."""

    name = "freeze_fp8"

    def call(self, gm: fx.GraphModule) -> PassResult:
        frozen = weights = 0
        for n in list(gm.graph.nodes):
            if n.op != "call_module":
                continue
            mod = gm.get_submodule(n.target)
            src = n.args[0]
            if isinstance(mod, CurrentScalingFakeQuant) and src.op == "get_attr":
                w = get_param(gm, src).detach()
                s = fp8_scale(w.abs().amax(), mod.fmt)
                set_param(gm, src, (fp8_round(w.float() / s, mod.fmt) * s).to(w.dtype))
                n.replace_all_uses_with(src)
                weights += 1
            elif isinstance(mod, DelayedScalingFakeQuant):
                if int(mod.steps) == 0:
                    raise RecipeError(f"the FP8 fake-quant {n.target} never saw data, so it has no scale: run "
                                      "calibration batches (or train) before freezing / converting")
                fmt = FORMATS[mod.fmt]
                scale_name = f"{n.target}_scale"
                gm.register_buffer(scale_name, mod.scale().detach().clone())
                val = src.meta.get("val")
                with gm.graph.inserting_before(n):
                    s_node = gm.graph.get_attr(scale_name)
                    div = gm.graph.call_function(aten.div.Tensor, (src, s_node))
                    clamp = gm.graph.call_function(aten.clamp.default, (div, -fmt.fmax, fmt.fmax))
                    q = gm.graph.call_function(aten.to.dtype, (clamp, fmt.torch_dtype))
                    dq = gm.graph.call_function(aten.to.dtype, (q, torch.float32))
                    out = gm.graph.call_function(aten.mul.Tensor, (dq, s_node))
                for node, v in ((div, val), (clamp, val), (q, _retype(val, fmt.torch_dtype)), (dq, val), (out, val)):
                    node.meta["val"] = v
                    node.meta[FROM_PASS] = self.name
                n.replace_all_uses_with(out)
                frozen += 1
            else:
                continue
            gm.graph.erase_node(n)
            gm.delete_submodule(n.target)
        return PassResult(gm, modified=bool(frozen or weights), stats={"activations": frozen, "weights": weights})


def freeze_fp8(gm: fx.GraphModule, *, dump_dir=None) -> list[PassRecord]:
    """Freeze the FP8 fake-quants of a calibrated (or trained) fp8 / fp8-qat module in place."""
    set_fp8_calibrating(gm, False)
    pm = PassManager([FreezeFp8()], dump_dir=dump_dir, stage="freeze_fp8")
    pm(gm)
    return pm.records


def set_fp8_calibrating(gm: fx.GraphModule, on: bool) -> int:
    """Turn the amax-history updates of the FP8 fake-quant modules on (calibration, QAT) or off
    (evaluation, convert). Returns how many modules there are."""
    mods = [m for m in gm.modules() if isinstance(m, DelayedScalingFakeQuant)]
    for m in mods:
        m.update_history = on
    return len(mods)


def prepare_precision(gm: fx.GraphModule, recipe: "str | PrecisionRecipe", overrides=None, *,
                      dump_dir=None) -> list[PassRecord]:
    """Run a precision recipe's passes, in place, on a freshly captured GraphModule.

    bf16 / fp16: [fold_bn], precision, remove_redundant_casts. fp8: [fold_bn], fp8_fake_quant (then
    calibrate to fill the amax histories, and `set_fp8_calibrating(gm, False)` before evaluation).
    Writes a summary under gm.meta["qcompile_precision"]; returns the pass records."""
    recipe = get_precision_recipe(recipe, overrides)
    check_override_patterns(gm, recipe)
    passes: list[Pass] = [FoldBatchNorm()] if recipe.fold_bn else []
    if recipe.fp8:
        passes.append(InsertFp8FakeQuant(recipe))
    else:
        passes += [AssignPrecision(recipe), RemoveRedundantCasts()]
    casts_model = count_casts(gm)
    pm = PassManager(passes, dump_dir=dump_dir, stage="precision")
    pm(gm)
    gm.meta[PRECISION] = summary = {"recipe": recipe.name, "casts_in_model": casts_model,
                                    "casts_after": count_casts(gm)}
    for r in pm.records:
        summary[r.name] = dict(r.stats)
    return pm.records


def precision_table(gm: fx.GraphModule) -> list[tuple[str, str, str, str]]:
    """(node, op, module, compute dtype) for every node the precision pass assigned: for inspect."""
    rows = []
    for n in gm.graph.nodes:
        if PRECISION in n.meta and not (n.op == "call_function" and is_float_cast(n)):
            d = n.meta[PRECISION]
            rows.append((n.name, _op_name(n), module_name(n), str(d).replace("torch.", "")))
    return rows
