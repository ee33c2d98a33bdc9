"""Backends: lowerings of the reference QDQ graph (ONNX export so far)."""
