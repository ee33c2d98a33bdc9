"""qcompile: a compiler-style quantizer for PyTorch models captured with torch.export."""
from . import numerics  # registers the qcompile:: custom ops
from .api import calibrate, compile, convert, freeze_bn, freeze_observers, lower, prepare, prepare_qat
from .backends.gguf import export_gguf
from .backends.onnx import export_onnx, verify
from .debug import auto_recipe, compare, inspect, report, sensitivity
from .errors import (
    CalibrationError, CaptureError, CheckpointError, ConvertError, ExportError, GGUFExportError, InvalidInputsError, InvalidModelError,
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
    "QCompileError", "CalibrationError", "CaptureError", "CheckpointError", "ConvertError", "ExportError", "GGUFExportError", "InvalidInputsError",
    "InvalidModelError", "PassError", "RecipeError",
]
__version__ = "0.1.0"
