"""QDQ ONNX: `export_onnx` writes the reference QDQ graph as standard ONNX through
`torch.onnx.export`; `verify` runs it in onnxruntime and compares every quantized tensor."""
from .export import ExportError, export_onnx, required_opset
from .translations import translation_table
from .verify import VerifyReport, ort_session, verify

__all__ = ["export_onnx", "verify", "VerifyReport", "ExportError", "required_opset", "translation_table", "ort_session"]
