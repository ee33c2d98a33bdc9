"""Static INT8 linear and conv2d on oneDNN, through the `onednn::` ops PyTorch ships for inductor.

    onednn_int8_linear(codes [..., K], s_a, z_a, w_q int8 [N, K], s_w [N], bias, act, s_out, z_out, out_dtype)
    onednn_int8_conv2d(codes [B, C, H, W], s_a, z_a, w_q int8 [OC, C/g, kh, kw], s_w [OC], bias,
                       stride, padding, dilation, groups, act, s_out, z_out, out_dtype)

are the lowered form of `op(dequantize(codes, s_a, z_a), dequantize(w_q, s_w, 0), bias) [-> act]
[-> quantize(s_out, z_out)]` with per-tensor static activation qparams. oneDNN multiplies the codes
exactly in int32 with the activation zero point folded in; measured here, its float output is
bit-identical to `acc.float() * s_a * s_w + bias` on the exact accumulator (the order of
backends/torch_cpu/ops.py), and a requantized output differs from rounding that float by one code
at near-ties only (2e-6 of the elements of a 1024 x 384 x 1536 GEMM).

oneDNN wants its weights prepacked into a blocked layout (`qlinear_prepack` / `qconv_prepack`), and
those are opaque mkldnn tensors that neither `torch.export.save` nor `deepcopy` can carry. So the
graph keeps the plain int8 weight as its buffer and the op prepacks it on first use, keyed on the
weight tensor (and, for conv, on the activation qparams the prepack bakes in); a loaded module
prepacks again on its first call. Passing an unpacked weight to `qlinear_pointwise` crashes the
process (checked), so the cache is not optional.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...numerics import quantize_math

CODE_DTYPES = (torch.int8, torch.uint8)
# Post-ops oneDNN fuses into the GEMM: name -> (post_op_name, algorithm). Others run after it.
LINEAR_POST_OPS = {"none": ("none", ""), "relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}
CONV_POST_OPS = {"none": ("none", ""), "relu": ("relu", "")}
ACTS = ("none", "relu", "gelu", "gelu_tanh", "silu")

_packed: dict[int, tuple] = {}   # id(weight) -> (weakref(weight), version, key, packed, zero points)


def _cached(w: Tensor, key: tuple, pack) -> tuple[Tensor, Tensor]:
    hit = _packed.get(id(w))
    if hit is not None and hit[0]() is w and hit[1] == w._version and hit[2] == key:
        return hit[3], hit[4]
    packed = pack()
    zps = torch.zeros(w.shape[0], dtype=torch.int32)
    _packed[id(w)] = (weakref.ref(w, lambda _, i=id(w): _packed.pop(i, None)), w._version, key, packed, zps)
    return packed, zps


def _act(y: Tensor, act: str) -> Tensor:
    if act == "relu":
        return torch.relu(y)
    if act == "gelu":
        return F.gelu(y)
    if act == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if act == "silu":
        return F.silu(y)
    return y


def _out_args(act: str, post_ops: dict, out_scale: Optional[Tensor], out_zp: Optional[Tensor], out_dtype: torch.dtype):
    """(fused post-op, act left to run after, oneDNN output scale/zp/dtype)."""
    fused = act in post_ops
    requant = out_dtype in CODE_DTYPES and fused
    o_s = float(out_scale.reshape(())) if requant else 1.0
    o_z = int(out_zp.reshape(())) if requant else 0
    return (post_ops[act] if fused else ("none", "")), ("none" if fused else act), o_s, o_z, (out_dtype if requant else torch.float32)


def _finish(y: Tensor, act_after: str, out_scale, out_zp, out_dtype, out_qmin: int, out_qmax: int) -> Tensor:
    if y.dtype in CODE_DTYPES:   # requantized by oneDNN: clamp to the quantize's own [qmin, qmax]
        info = torch.iinfo(y.dtype)
        return y if (out_qmin, out_qmax) == (info.min, info.max) else y.clamp(out_qmin, out_qmax)
    y = _act(y, act_after)
    if out_dtype in CODE_DTYPES:
        return quantize_math(y, out_scale, out_zp, 0, 0, out_qmin, out_qmax, out_dtype)
    return y.to(out_dtype)


def _check(codes, w, act, out_scale, out_dtype):
    torch._check(codes.dtype in CODE_DTYPES, lambda: f"activation codes must be int8/uint8, got {codes.dtype}")
    torch._check(w.dtype == torch.int8, lambda: f"weight codes must be int8, got {w.dtype}")
    torch._check(act in ACTS, lambda: f"act must be one of {ACTS}, got {act!r}")
    torch._check(out_dtype not in CODE_DTYPES or out_scale is not None, lambda: "requantizing needs out_scale")


@torch.library.custom_op("qcompile::onednn_int8_linear", mutates_args=())
def onednn_int8_linear(codes: Tensor, a_scale: Tensor, a_zp: Tensor, w: Tensor, w_scale: Tensor,
                       bias: Optional[Tensor], act: str, out_scale: Optional[Tensor], out_zp: Optional[Tensor],
                       out_dtype: torch.dtype, out_qmin: int, out_qmax: int) -> Tensor:
    _check(codes, w, act, out_scale, out_dtype)
    n, k = w.shape
    # contiguous: prepack reads the buffer as a row-major [N, K] (GPT-2's Conv1D weight arrives as
    # the transposed view W.t(); packed as it was, its lowered linears were another matrix)
    packed, w_zps = _cached(w, (), lambda: torch.ops.onednn.qlinear_prepack(w.contiguous(), None))
    (post, algo), act_after, o_s, o_z, o_dt = _out_args(act, LINEAR_POST_OPS, out_scale, out_zp, out_dtype)
    x2d = codes.reshape(-1, k).contiguous()
    y = torch.ops.onednn.qlinear_pointwise(x2d, float(a_scale.reshape(())), int(a_zp.reshape(())), packed,
                                           w_scale.float().contiguous(), w_zps,
                                           None if bias is None else bias.float().contiguous(),
                                           o_s, o_z, o_dt, post, [], algo)
    y = _finish(y, act_after, out_scale, out_zp, out_dtype, out_qmin, out_qmax)
    return y.reshape(*codes.shape[:-1], n)


@onednn_int8_linear.register_fake
def _(codes, a_scale, a_zp, w, w_scale, bias, act, out_scale, out_zp, out_dtype, out_qmin, out_qmax):
    _check(codes, w, act, out_scale, out_dtype)
    torch._check(codes.shape[-1] == w.shape[1], lambda: "codes [..., K] and w [N, K] disagree on K")
    return codes.new_empty((*codes.shape[:-1], w.shape[0]), dtype=out_dtype)


@torch.library.custom_op("qcompile::onednn_int8_conv2d", mutates_args=())
def onednn_int8_conv2d(codes: Tensor, a_scale: Tensor, a_zp: Tensor, w: Tensor, w_scale: Tensor,
                       bias: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int],
                       groups: int, act: str, out_scale: Optional[Tensor], out_zp: Optional[Tensor],
                       out_dtype: torch.dtype, out_qmin: int, out_qmax: int) -> Tensor:
    _check(codes, w, act, out_scale, out_dtype)
    s_a, z_a = float(a_scale.reshape(())), int(a_zp.reshape(()))
    w_s = w_scale.float().contiguous()
    packed, w_zps = _cached(w, (s_a, z_a, tuple(stride), tuple(padding), tuple(dilation), groups),
                            lambda: torch.ops.onednn.qconv_prepack(w.contiguous(), w_s, s_a, z_a, stride, padding, dilation,
                                                                   groups, None))
    (post, algo), act_after, o_s, o_z, o_dt = _out_args(act, CONV_POST_OPS, out_scale, out_zp, out_dtype)
    y = torch.ops.onednn.qconv2d_pointwise(codes, s_a, z_a, packed, w_s, w_zps,
                                           None if bias is None else bias.float().contiguous(),
                                           stride, padding, dilation, groups, o_s, o_z, o_dt, post, [], algo or None)
    # oneDNN returns channels-last; the reference graph's consumers expect contiguous NCHW strides
    return _finish(y, act_after, out_scale, out_zp, out_dtype, out_qmin, out_qmax).contiguous()


@onednn_int8_conv2d.register_fake
def _(codes, a_scale, a_zp, w, w_scale, bias, stride, padding, dilation, groups, act, out_scale, out_zp,
      out_dtype, out_qmin, out_qmax):
    _check(codes, w, act, out_scale, out_dtype)
    kh, kw = w.shape[2], w.shape[3]
    oh = (codes.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (codes.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return codes.new_empty((codes.shape[0], w.shape[0], oh, ow), dtype=out_dtype)
