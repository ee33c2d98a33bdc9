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

`tensorrt`: TensorRT's explicit quantization wants symmetric int8 activations (zero point 0) and
no output quantization after weighted ops; a static recipe's activations become symmetric int8 of
the same observer and granularity. Nothing else changes (TensorRT fuses attention itself).
"""
from __future__ import annotations

import dataclasses

from .errors import RecipeError
from .spec import ATTENTION_INT8, QuantSpec, Recipe, get_recipe, normalize_algorithms

TARGETS = ("ort-cpu", "tensorrt")
ORT_CPU_ALGORITHMS = ({"name": "outlier_split", "select": "attention"}, {"name": "smoothquant", "through_attention": True})
# The largest drop in mean cosine to the float model that quantized attention may cost on the
# calibration batches (all-MiniLM-L6-v2 measured 0.0003): past it, attention stays float.
ATTENTION_MAX_COST = 0.001


def check_target_name(target: str) -> str:
    if target not in TARGETS:
        raise RecipeError(f"unknown target {target!r}; known targets: {', '.join(TARGETS)} "
                          "(or target=None to quantize exactly as the recipe says)")
    return target


def _static(recipe: Recipe) -> bool:
    return recipe.activation is not None and not recipe.activation.dynamic


def with_quantized_attention(recipe: Recipe, max_cost: float | None = ATTENTION_MAX_COST) -> Recipe:
    """`recipe` with attention quantized as a pattern (ATTENTION_INT8) where calibration measures
    that it costs at most `max_cost` mean cosine (None: always). A recipe that has an attention spec
    keeps it. For any CPU target whose runtime has integer attention kernels (ort-cpu here; the
    torch backend's fused kernel, attention.py)."""
    if recipe.attention is not None or not _static(recipe):
        return recipe
    return recipe.replace(attention=ATTENTION_INT8.replace(max_cost=max_cost))


def recipe_for_target(recipe: "str | Recipe", target: str) -> Recipe:
    """The recipe `target` runs best, derived from `recipe` (see the module docstring)."""
    recipe = get_recipe(recipe)
    check_target_name(target)
    if not _static(recipe):
        return recipe
    if target == "ort-cpu":
        have = {name for name, _ in recipe.algorithms}
        extra = normalize_algorithms([a for a in ORT_CPU_ALGORITHMS
                                      if (a if isinstance(a, str) else a["name"]) not in have])
        # in front: the split must see the unsmoothed input, and both run before GPTQ/AWQ fix weights
        return with_quantized_attention(recipe.replace(
            name=f"{recipe.name}@ort-cpu", ops=tuple(o for o in recipe.ops if o != "matmul"),
            algorithms=extra + recipe.algorithms))
    act: QuantSpec = recipe.activation
    symmetric_int8 = dataclasses.replace(act, dtype="int8", symmetric=True)
    return recipe.replace(name=f"{recipe.name}@tensorrt", activation=symmetric_int8, quantize_outputs=False)
