"""Which onnxruntime execution provider runs an exported model.

The same QDQ file serves every provider; what changes is which ops run in integer arithmetic:

| provider | package | integer kernels for QDQ models |
|---|---|---|
| `CPUExecutionProvider` | onnxruntime | QLinearConv, QLinearMatMul, MatMulIntegerToFloat, QGemm, QLinearAdd/Concat/pooling, DynamicQuantizeMatMul; U8S8 (uint8 activations) is the fast x86 path |
| `CUDAExecutionProvider` | onnxruntime-gpu | QDQ is mostly run as float (DequantizeLinear -> op): no QLinearConv; MatMulNBits for int4 weights, QOrderedMatMul only with special layouts |
| `TensorrtExecutionProvider` | onnxruntime-gpu + TensorRT | TensorRT fuses Q/DQ pairs into INT8 conv/GEMM kernels itself; it wants symmetric int8 (zero point 0) and a Q/DQ pair per consumer: export with `target="tensorrt"` |

`choose_providers` is a pure function so the selection logic is tested on this CPU-only machine.
"""
from __future__ import annotations

from ...errors import QCompileError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")


def choose_providers(requested: "str | list[str] | None", available: list[str]) -> list[str]:
    """The provider list to give onnxruntime. `requested`: None or "cpu" (the CPU provider),
    "auto" (the best available: TensorRT, then CUDA, then CPU), "cuda", "tensorrt", or an explicit
    list of onnxruntime provider names. GPU providers get the CPU provider as fallback for the
    ops they do not run. Asking for one that is not installed is an error that says what to install."""
    if requested is None:
        requested = "cpu"
    if isinstance(requested, (list, tuple)):
        missing = [p for p in requested if p not in available]
        if missing:
            raise QCompileError(f"onnxruntime providers {missing} are not available here (available: {available})")
        return list(requested)
    key = requested.lower()
    if key == "auto":
        for name in AUTO_ORDER:
            if PROVIDERS[name] in available:
                return _with_cpu_fallback(PROVIDERS[name], available)
        raise QCompileError(f"no usable onnxruntime provider among {available}")
    if key not in PROVIDERS:
        raise QCompileError(f"unknown provider {requested!r}; use one of {', '.join(PROVIDERS)}, 'auto', or a list")
    name = PROVIDERS[key]
    if name not in available:
        hint = ("install onnxruntime-gpu (with CUDA 12 and cuDNN 9) instead of onnxruntime"
                if key == "cuda" else "install onnxruntime-gpu built with TensorRT, and TensorRT itself")
        raise QCompileError(f"{name} is not available in this onnxruntime ({available}); {hint}, "
                            "or pass provider='cpu'")
    return _with_cpu_fallback(name, available)


def _with_cpu_fallback(name: str, available: list[str]) -> list[str]:
    providers = [name]
    if name == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available:
        providers.append("CUDAExecutionProvider")
    if name != "CPUExecutionProvider" and "CPUExecutionProvider" in available:
        providers.append("CPUExecutionProvider")
    return providers
