"""Deployment target profiles: what to quantize, and how, for the runtime that will run the model.

`qc.prepare(model, x, recipe, target="ort-cpu")` hands the recipe to `recipe_for_target`, which
returns an ordinary `Recipe` (print it with `to_json`, edit it, pass it back without `target`);
`qc.export_onnx` then places the Q/DQ nodes for the same target unless told otherwise
(backends/onnx/targets.py).

`ort-cpu` (onnxruntime's CPU provider), for static INT8 recipes:
- quantize what onnxruntime runs as integer kernels: linears (MatMulIntegerToFloat: integer GEMM,
  float output) and convolutions with the integer CNN region around them (QLinearConv, QLinearAdd,
  QLinearConcat, pools, where the next op reads codes; a conv feeding a float op stays a float conv
  there). Activation x activation matmuls are not quantized as a family (every matmul input with the
  activation spec cost all-MiniLM-L6-v2 mean/min cosine 0.9981/0.9955 -> 0.9906/0.9721); attention
  is quantized as a pattern instead (`ATTENTION_INT8`: Q, K, V per tensor, the softmax output on the
  fixed [0, 1] uint8 grid), which onnxruntime fuses into MatMulIntegerToFloat (Q x K^T: integer
  matmul, float scores for the mask and softmax) and QLinearMatMul (P x V, requantized to the output
  projection's input codes); `calibrate` measures what it costs on the calibration batches and keeps
  attention float when the model's mean cosine to float drops by more than `ATTENTION_MAX_COST`
  (attention_choice.py; the decision is in the QState and `qc.inspect`);
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
  attention block) and `smoothquant` with `through_attention` (its 1/s folded into a producer
  LayerNorm or linear, the output projection's into V's rows, else an explicit multiply before the
  input's quantization: the output projection's input then comes straight from P x V, which the
  fused attention kernels requantize). On a CNN the split finds nothing; SmoothQuant
  smooths the classifier linear with such a multiply (digits CNN: 98.89% against 98.70% without, in
  the reference graph; 0.80 ms in onnxruntime either way).
Weight-only and dynamic recipes pass through unchanged.

`torch-cpu` (qcompile's torch backend, `qc.lower(backend="torch")`, then `torch.compile` with
inductor freezing: `qc.compile`), for static INT8 recipes: the same choice made for PyTorch's
CPU kernels. Quantize only the ops the backend runs as fused oneDNN integer kernels, linears and
conv2d (a quantized add or pool would run as float between a quantize and a dequantize: pure
overhead), attention as a pattern where the CPU runs it as one fused kernel (torchao's INT8 SDPA
template under torch.compile, AMX only; `attention_left_float` says why not elsewhere), kept by
`calibrate` under the same measured cost limit as `ort-cpu`, and add the same two algorithms as
`ort-cpu` (the outlier split on the q/k/v input found in the graph, then SmoothQuant through
attention: the fused kernel then requantizes its output straight to the output projection's
codes): the configuration that benchmarks/cpu_backend.py measured fastest among the accurate
ones on all-MiniLM-L6-v2 (the outlier split stays off the FFN: there its float add would sit
between the GEMM and the GELU + requantization oneDNN fuses). The batch stays dynamic:
`torch.compile` specializes the compiled code to the shapes it sees, so a static capture buys
nothing there.

`tensorrt`: TensorRT's explicit quantization wants symmetric int8 activations (zero point 0) and
no output quantization after weighted ops; a static recipe's activations become symmetric int8 of
the same observer and granularity. Nothing else changes (TensorRT fuses attention itself).
"""
from __future__ import annotations

import dataclasses

from .errors import RecipeError
from .spec import ATTENTION_INT8, QuantSpec, Recipe, get_recipe, normalize_algorithms

TARGETS = ("ort-cpu", "torch-cpu", "tensorrt")
ONNX_TARGETS = ("ort-cpu", "tensorrt")      # runtimes that read qcompile's ONNX files: export placements
# The algorithms that recover transformer accuracy of static INT8 at little runtime cost.
ORT_CPU_ALGORITHMS = ({"name": "outlier_split", "select": "attention"}, {"name": "smoothquant", "through_attention": True})
TORCH_CPU_ALGORITHMS = ORT_CPU_ALGORITHMS
TORCH_CPU_OPS = ("linear", "conv")          # the op families the torch backend fuses into oneDNN kernels
# What onnxruntime's QDQ fusions fold between a conv/GEMM and its output QuantizeLinear.
ORT_FUSED_ACTIVATIONS = ("relu", "relu6")
# The largest drop in mean cosine to the float model that quantized attention may cost on the
# calibration batches (all-MiniLM-L6-v2 measured 0.0002-0.0003): past it, attention stays float.
ATTENTION_MAX_COST = 0.001


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


def with_quantized_attention(recipe: Recipe, max_cost: float | None = ATTENTION_MAX_COST) -> Recipe:
    """`recipe` with attention quantized as a pattern (ATTENTION_INT8) where calibration measures
    that it costs at most `max_cost` mean cosine (None: always). A recipe that has an attention spec
    keeps it. For the CPU targets whose runtime has integer attention kernels (onnxruntime's QDQ
    fusions; the torch backend's fused kernel, backends/torch_cpu/attention.py)."""
    if recipe.attention is not None or not _static(recipe):
        return recipe
    return recipe.replace(attention=ATTENTION_INT8.replace(max_cost=max_cost))


def attention_left_float(target: str | None) -> str | None:
    """Why `target` leaves attention float on this machine whatever it costs, else None (it lets
    calibration decide). torch-cpu: quantized attention is fast only as torchao's fused INT8 SDPA
    template under torch.compile, which needs AMX; elsewhere it would run as the eager
    `qcompile::int8_attention` op, slower than float attention."""
    if target != "torch-cpu":
        return None
    from .backends.torch_cpu.attention import fused_kernel_available

    why = fused_kernel_available()
    return None if why is None else f"target 'torch-cpu' keeps attention float here: {why}"


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
        return with_quantized_attention(recipe.replace(
            name=f"{recipe.name}@ort-cpu", ops=tuple(o for o in recipe.ops if o != "matmul"),
            algorithms=_in_front(ORT_CPU_ALGORITHMS, recipe), quantize_outputs=outputs,
            fused_activations=ORT_FUSED_ACTIVATIONS))
    if target == "torch-cpu":
        recipe = recipe.replace(name=f"{recipe.name}@torch-cpu", ops=tuple(o for o in recipe.ops if o in TORCH_CPU_OPS),
                                algorithms=_in_front(TORCH_CPU_ALGORITHMS, recipe))
        return recipe if attention_left_float(target) else with_quantized_attention(recipe)
    act: QuantSpec = recipe.activation
    symmetric_int8 = dataclasses.replace(act, dtype="int8", symmetric=True)
    return recipe.replace(name=f"{recipe.name}@tensorrt", activation=symmetric_int8, quantize_outputs=False)
