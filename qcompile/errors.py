"""Errors a user can cause. Each message says what was wrong and what to do about it."""
from __future__ import annotations


class QCompileError(Exception):
    """Base class of every error qcompile raises on bad input."""


class InvalidModelError(QCompileError):
    """The object given as a model is not something qcompile can quantize."""


class InvalidInputsError(QCompileError):
    """Example inputs or calibration batches the model (or the captured graph) cannot take."""


class CaptureError(QCompileError):
    """`torch.export` could not capture the model."""


class RecipeError(QCompileError):
    """An unknown recipe, an invalid spec, or an exclusion pattern that matches nothing."""


class CalibrationError(QCompileError):
    """Calibration data that would give wrong quantization parameters."""


class ConvertError(QCompileError):
    """`convert` was asked for something the prepared module cannot give yet."""


class PassError(QCompileError):
    """A graph pass failed; the message names it and the passes that ran before it."""


class ExportError(QCompileError):
    """The quantized module cannot be written as ONNX (bad arguments, or the exporter failed)."""


class GGUFExportError(QCompileError):
    """The model cannot be written as GGUF: an architecture, a weight format or a tokenizer that
    llama.cpp's conventions do not cover; the message names what is missing."""


class CheckpointError(QCompileError):
    """Weights on disk that cannot be read or do not fit the model (a missing shard, a tensor of
    the wrong shape), or a quantized checkpoint that cannot be written (a full disk): the message
    names the file or tensor."""


class CalibrationWarning(UserWarning):
    """The calibration ran, but on too little data for what an algorithm estimates from it."""
