"""The torch backend: the reference QDQ graph on PyTorch's own CPU integer kernels.

`lower(quantized)` returns a new GraphModule in which the supported QDQ patterns run as
`torch.ops.qcompile.*` custom ops (see `ops.py`); `lowering_report(lowered)` says what was lowered
to which kernel and why the rest was not.
"""
from . import ops  # registers the qcompile:: custom ops of this backend
from .lowering import DynamicInt8Linear, LoweringReport, LoweringRule, TorchCPUBackend, lower, lowering_report

__all__ = ["ops", "lower", "lowering_report", "LoweringReport", "LoweringRule", "DynamicInt8Linear", "TorchCPUBackend"]
