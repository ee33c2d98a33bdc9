"""The triton backend: the reference QDQ graph on fused Triton kernels.

`lower(quantized)` (what `qc.lower(quantized, backend="triton")` calls) returns a new GraphModule in
which the supported QDQ patterns are `torch.ops.qcompile.triton_*` custom ops (ops.py); the kernels
are in kernels/, one concern per module; aot.py compiles every shipped config for sm_80 / sm_90
without a GPU. `lowering_report(lowered)` says what was lowered to which kernel and why the rest
was not. Triton itself is imported only when a kernel runs or compiles, so lowering and the CPU
reference path also work without it.
"""
from . import ops  # registers the qcompile::triton_* custom ops
from .lowering import (Int4WeightOnlyLinear, Int8Conv2d, Int8Linear, QuantizeActivation, TritonLowering,
                       default_rules, lower, lowering_report)

__all__ = ["ops", "lower", "lowering_report", "default_rules", "TritonLowering", "QuantizeActivation",
           "Int8Linear", "Int8Conv2d", "Int4WeightOnlyLinear"]
