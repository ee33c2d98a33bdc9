"""onnxscript translations of qcompile's custom ops, for `torch.onnx.export(custom_translation_table=...)`.

Each qcompile op becomes standard ONNX, never a custom domain:

- `qcompile::quantize`   -> `QuantizeLinear` (scalar scale: per tensor; 1-D scale + `axis`: per
  channel; same-rank scale + `axis` + `block_size`: blocked, opset >= 21), followed by a `Clip`
  only when the code range is narrower than the storage dtype (e.g. [-127, 127] or int4 codes in
  an int8 tensor).
- `qcompile::dequantize` -> `DequantizeLinear` with the same layouts (plus a `Cast` when the
  output dtype is not float32: ONNX dequantizes to the scale's dtype).
- `qcompile::choose_qparams_per_token` -> `ReduceMax(Abs(x))` over the last dim, `Div` by qmax and
  a `Where` that keeps the scale positive: the same float32 operations, in the same order, as
  `numerics.per_token_qparams_math`, so the scales are bit-equal. `DynamicQuantizeLinear` is not
  used: it computes one asymmetric uint8 scale per tensor, not symmetric int8 scales per token.

The reference graph keeps int32 zero points; ONNX wants them in the code dtype, so each
translation casts them (`Cast(zero_point, to=int8|uint8)`). For constant zero points the casts
are folded into initializers after export (`export.fold_constant_casts`).

ONNX nodes are built against the opset of the model being written (the exporter fills in
attribute defaults from that opset's schema), so the table is made per opset.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import values

from ...numerics import SCALE_EPS

qops = torch.ops.qcompile

# Full code ranges of the ONNX storage dtypes a QuantizeLinear can produce.
_DTYPE_RANGE = {
    ir.DataType.INT8: (-128, 127),
    ir.DataType.UINT8: (0, 255),
    ir.DataType.INT4: (-8, 7),
    ir.DataType.UINT4: (0, 15),
}
BLOCKED_MIN_OPSET = 21


class TranslationError(ValueError):
    """A qcompile op whose arguments have no standard ONNX form at the requested opset."""


def _rank(v) -> int | None:
    shape = getattr(v, "shape", None)
    return None if shape is None else len(shape)


def _layout(x, scale, axis: int, block_size: int, opset: int) -> dict:
    """ONNX attributes for a scale layout (module doc of `qcompile.numerics`)."""
    x_rank, s_rank = _rank(x), _rank(scale)
    if x_rank is None or s_rank is None:
        raise TranslationError("the exporter gave no static rank for a quantize/dequantize input")
    if s_rank == 0:
        return {}
    if s_rank == 1 and x_rank != 1 and scale.shape[0] == 1:
        return {"scalar": True}  # a one-element 1-D scale is per tensor (numerics._broadcast_param)
    axis = axis % x_rank if x_rank else 0
    if s_rank == 1:
        return {"axis": axis}
    if s_rank == x_rank:
        if opset < BLOCKED_MIN_OPSET:
            raise TranslationError(
                f"blocked (per-group / per-token) scales need ONNX opset >= {BLOCKED_MIN_OPSET} "
                f"(QuantizeLinear/DequantizeLinear block_size); export with opset_version={BLOCKED_MIN_OPSET}")
        x_dim, s_dim = x.shape[axis], scale.shape[axis]
        if isinstance(x_dim, int) and isinstance(s_dim, int) and x_dim == s_dim:
            block = 1  # one scale per element along the axis (numerics repeats nothing)
        else:
            block = int(block_size)
            if block <= 0:
                raise TranslationError("a blocked scale needs block_size > 0")
        return {"axis": axis, "block_size": block}
    raise TranslationError(f"scale of rank {s_rank} does not fit an input of rank {x_rank}")


def translation_table(opset: int) -> dict[Callable, Callable]:
    """{qcompile op overload: onnxscript-traced function} for `torch.onnx.export` at `opset`."""
    op = values.Opset("", opset)

    def _qparams(scale, zero_point, code, layout):
        """Scale and zero point in ONNX form: the zero point cast to the code dtype."""
        zp = op.Cast(zero_point, to=code)
        if layout.pop("scalar", False):
            axes = op.Constant(value_ints=[0])
            return op.Squeeze(scale, axes), op.Squeeze(zp, axes)
        return scale, zp

    def quantize(x, scale, zero_point, axis: int, block_size: int, qmin: int, qmax: int, dtype: int):
        code = ir.DataType(dtype)
        if code not in _DTYPE_RANGE:
            raise TranslationError(f"no ONNX QuantizeLinear to {code.name}")
        layout = _layout(x, scale, axis, block_size, opset)
        scale, zp = _qparams(scale, zero_point, code, layout)
        q = op.QuantizeLinear(x, scale, zp, **layout)
        lo, hi = _DTYPE_RANGE[code]
        if (qmin, qmax) != (lo, hi):
            np_dtype = code.numpy()
            q = op.Clip(q, op.Constant(value=ir.tensor(np.array(qmin, dtype=np_dtype))),
                        op.Constant(value=ir.tensor(np.array(qmax, dtype=np_dtype))))
        return q

    def dequantize(q, scale, zero_point, axis: int, block_size: int, out_dtype: int):
        layout = _layout(q, scale, axis, block_size, opset)
        scale, zp = _qparams(scale, zero_point, q.dtype, layout)
        out = op.DequantizeLinear(q, scale, zp, **layout)
        if ir.DataType(out_dtype) != ir.DataType.FLOAT:
            out = op.Cast(out, to=ir.DataType(out_dtype))
        return out

    def choose_qparams_per_token(x, qmin: int, qmax: int):
        xf = x if x.dtype == ir.DataType.FLOAT else op.Cast(x, to=ir.DataType.FLOAT)
        amax = op.ReduceMax(op.Abs(xf), op.Constant(value_ints=[-1]), keepdims=1)
        scale = op.Div(amax, op.Constant(value_float=float(qmax)))
        eps = op.Constant(value_float=float(SCALE_EPS))
        scale = op.Where(op.Greater(scale, eps), scale, eps)
        zero_point = op.ConstantOfShape(op.Shape(scale), value=ir.tensor(np.zeros(1, dtype=np.int32)))
        return scale, zero_point

    return {
        qops.quantize.default: quantize,
        qops.dequantize.default: dequantize,
        qops.choose_qparams_per_token.default: choose_qparams_per_token,
    }
