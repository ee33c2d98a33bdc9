"""Deployment target profiles: what to quantize, and how, for the runtime that will run the model.

`qc.prepare(model, x, recipe, target="ort-cpu")` hands the recipe to `recipe_for_target`, which
returns an ordinary `Recipe` (print it with `to_json`, edit it, pass it back without `target`);
`qc.export_onnx` then places the Q/DQ nodes for the same target unless told otherwise
(backends/onnx/targets.py).

`ort-cpu` (onnxruntime's CPU provider), for static INT8 recipes:
- quantize what onnxruntime runs as integer kernels: linears (MatMulIntegerToFloat: integer GEMM,
  float output) and convolutions with the integer CNN region around them (QLinearConv, QLinearAdd,
  QLinearConcat, pools, where the next op reads codes; a conv feeding a float op stays a float conv
  there). Activation x activation matmuls (attention's QK^T
  and PV) stay float: onnxruntime runs them in integer only as QLinearMatMul, which needs their
  output quantized too; on all-MiniLM-L6-v2 quantizing them cost mean/min cosine 0.9981/0.9955 ->
  0.9906/0.9721 (benchmarks/onnx_runtime.py) for no kernel onnxruntime would fuse without it;
- quantize the output of every conv (`quantize_outputs=("conv",)`), after a ReLU or ReLU6 only
  (`fused_activations`): onnxruntime runs a conv as QLinearConv only when a QuantizeLinear reads
  its output, and it folds only Relu and Clip into that pair. A conv followed by SiLU, hardswish,
  LayerNorm, a squeeze-excite multiply or a float add otherwise runs as a float Conv on
  dequantized weights, slower than the FP32 file (efficientnet_b0 before: 0 of 49 convs integer).
  This is the runtime's requirement, not an accuracy gain (one more rounding per conv), so it
  lives here and not in `w8a8`, whose reference graph other backends (oneDNN's conv with a float
  output, TensorRT, which places its own output quantization) read as it is;
- add, in front of the recipe's own unless it already lists them, the PTQ algorithms that recover
  transformer accuracy at no runtime cost or a small one: `outlier_split` with select="attention"
  (the q/k/v input's outlier channels in float: one mask multiply and a K = 1..6 float MatMul per
  attention block) and `smoothquant` (its 1/s folded into a producer LayerNorm or linear, else an
  explicit multiply before the input's quantization). On a CNN the split finds nothing; SmoothQuant
  smooths the classifier linear with such a multiply (digits CNN: 98.89% against 98.70% without, in
  the reference graph; 0.80 ms in onnxruntime either way).
Weight-only and dynamic recipes pass through unchanged.

`torch-cpu` (qcompile's torch backend, `qc.lower(backend="torch")`, then `torch.compile` with
inductor freezing: `qc.compile`), for static INT8 recipes: the same choice made for PyTorch's
CPU kernels. Quantize only the ops the backend runs as fused oneDNN integer kernels, linears and
conv2d (a quantized add, pool or attention matmul would run as float between a quantize and a
dequantize: pure overhead), and add the same two algorithms as `ort-cpu` (the outlier split on
the q/k/v input found in the graph, then SmoothQuant): the configuration that
benchmarks/cpu_backend.py measured fastest among the accurate ones on all-MiniLM-L6-v2 (the
outlier split stays off the FFN: there its float add would sit between the GEMM and the GELU +
requantization oneDNN fuses). The batch stays dynamic: `torch.compile` specializes the compiled
code to the shapes it sees, so a static capture buys nothing there.

`tensorrt`: TensorRT's explicit quantization wants symmetric int8 activations (zero point 0) and
no output quantization after weighted ops; a static recipe's activations become symmetric int8 of
the same observer and granularity. Nothing else changes (TensorRT fuses attention itself).
"""
from __future__ import annotations

import dataclasses

from .errors import RecipeError
from .spec import QuantSpec, Recipe, get_recipe, normalize_algorithms

TARGETS = ("ort-cpu", "torch-cpu", "tensorrt")
ONNX_TARGETS = ("ort-cpu", "tensorrt")      # runtimes that read qcompile's ONNX files: export placements
# The algorithms that recover transformer accuracy of static INT8 at little runtime cost.
ORT_CPU_ALGORITHMS = ({"name": "outlier_split", "select": "attention"}, "smoothquant")
TORCH_CPU_ALGORITHMS = ORT_CPU_ALGORITHMS
TORCH_CPU_OPS = ("linear", "conv")          # the op families the torch backend fuses into oneDNN kernels
# What onnxruntime's QDQ fusions fold between a conv/GEMM and its output QuantizeLinear.
ORT_FUSED_ACTIVATIONS = ("relu", "relu6")


def check_target_name(target: str) -> str:
    if target not in TARGETS:
        raise RecipeError(f"unknown target {target!r}; known targets: {', '.join(TARGETS)} "
                          "(or target=None to quantize exactly as the recipe says)")
    return target


def _static(recipe: Recipe) -> bool:
    return recipe.activation is not None and not recipe.activation.dynamic


def _in_front(algorithms, recipe: Recipe) -> tuple:
    """`algorithms` the recipe does not list already, in front of its own: the split must see the
    unsmoothed input, and both run before GPTQ/AWQ fix the weights."""
    have = {name for name, _ in recipe.algorithms}
    extra = normalize_algorithms([a for a in algorithms if (a if isinstance(a, str) else a["name"]) not in have])
    return extra + recipe.algorithms


def recipe_for_target(recipe: "str | Recipe", target: str) -> Recipe:
    """The recipe `target` runs best, derived from `recipe` (see the module docstring)."""
    recipe = get_recipe(recipe)
    check_target_name(target)
    if not _static(recipe):
        return recipe
    if target == "ort-cpu":
        # onnxruntime runs a conv in integer only when a QuantizeLinear reads its output
        outputs = recipe.quantize_outputs
        if outputs is not True:
            outputs = tuple(dict.fromkeys(tuple(outputs or ()) + ("conv",)))
        return recipe.replace(name=f"{recipe.name}@ort-cpu", ops=tuple(o for o in recipe.ops if o != "matmul"),
                              algorithms=_in_front(ORT_CPU_ALGORITHMS, recipe), quantize_outputs=outputs,
                              fused_activations=ORT_FUSED_ACTIVATIONS)
    if target == "torch-cpu":
        return recipe.replace(name=f"{recipe.name}@torch-cpu", ops=tuple(o for o in recipe.ops if o in TORCH_CPU_OPS),
                              algorithms=_in_front(TORCH_CPU_ALGORITHMS, recipe))
    act: QuantSpec = recipe.activation
    symmetric_int8 = dataclasses.replace(act, dtype="int8", symmetric=True)
    return recipe.replace(name=f"{recipe.name}@tensorrt", activation=symmetric_int8, quantize_outputs=False)
