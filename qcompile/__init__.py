"""qcompile: a compiler-style quantizer for PyTorch models captured with torch.export."""
from . import numerics  # registers the qcompile:: custom ops
from .api import calibrate, compile, convert, freeze_bn, freeze_observers, lower, prepare, prepare_qat
from .backends.gguf import export_gguf
from .debug import auto_recipe, compare, inspect, report, sensitivity
from .errors import (
    CalibrationError, CalibrationWarning, CaptureError, CheckpointError, ConvertError, ExportError, GGUFExportError, InvalidInputsError, InvalidModelError,
    PassError, QCompileError, RecipeError,
)
from .sequential import QuantizedCheckpoint, quantize_sequential
from .spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec, Recipe, recipes

__all__ = [
    "prepare", "prepare_qat", "freeze_observers", "freeze_bn", "calibrate", "convert", "lower", "compile", "inspect", "export_onnx",
    "export_gguf", "verify",
    "quantize_sequential", "QuantizedCheckpoint",
    "compare", "sensitivity", "auto_recipe", "report", "Recipe", "QuantSpec", "recipes",
    "PerTensor", "PerChannel", "PerGroup", "PerToken",
    "QCompileError", "CalibrationError", "CalibrationWarning", "CaptureError", "CheckpointError", "ConvertError", "ExportError", "GGUFExportError", "InvalidInputsError",
    "InvalidModelError", "PassError", "RecipeError",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The ONNX exporter loads when first used: onnx and onnxscript are 70 MB of a process's memory
    # and 1.4 s of `import qcompile` that a run without ONNX (a sequential GPTQ run) does not need
    if name in ("export_onnx", "verify"):
        from .backends import onnx as onnx_backend

        return getattr(onnx_backend, name)
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")
