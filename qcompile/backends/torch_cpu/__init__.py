"""The torch backend: the reference QDQ graph on PyTorch's own CPU integer kernels.

`lower(quantized)` returns a new GraphModule in which the supported QDQ patterns run as
`torch.ops.qcompile.*` custom ops: per-token dynamic INT8 linears on `torch._int_mm` (ops.py), static
INT8 linears and conv2d on oneDNN (onednn.py), weight-only INT8 / INT4 linears on the pack kernels
(weight_only.py); the rules are in lowering.py and rules.py. `lowering_report(lowered)` says what was
lowered to which kernel and why the rest was not.
"""
from . import onednn, ops, weight_only  # register the qcompile:: custom ops of this backend
from .lowering import DynamicInt8Linear, LoweringReport, LoweringRule, TorchCPUBackend, lower, lowering_report
from .rules import Int4WeightOnlyLinear, Int8Conv1d, Int8Conv2d, Int8WeightOnlyLinear, StaticInt8Linear, default_rules

__all__ = ["ops", "onednn", "weight_only", "lower", "lowering_report", "LoweringReport", "LoweringRule",
           "DynamicInt8Linear", "StaticInt8Linear", "Int8Conv2d", "Int8Conv1d", "Int8WeightOnlyLinear", "Int4WeightOnlyLinear",
           "TorchCPUBackend", "default_rules"]
