"""Lowering rules of the Triton backend (the house pattern of backends/torch_cpu/lowering.py).

Rules, each one QDQ pattern -> one custom op of ops.py:
- QuantizeActivation: `quantize(x, s, z)` with a calibrated per-tensor (s, z) -> triton_quantize_static;
  `quantize(x, choose_qparams_per_token(x))` -> triton_quantize_per_token (absmax, scale and codes
  in one kernel). The codes are identical to the reference, so every consumer (lowered or still a
  dequantize) sees the same integers.
- Int8Linear: `linear(dequantize(codes, s_a, z_a), dequantize(w_q int8 [N, K], s_w [N] or 1, 0), b)`
  with s_a per tensor (static w8a8) or per token (w8a8-dynamic), plus the tail it absorbs: a sole
  ReLU/GELU/SiLU user, then a sole static per-tensor quantize user (the requantize epilogue; codes
  out in the quantize's dtype). The uint8 -> int8 shift of static activations and z_a are folded
  into an int32 per-column correction (kernels/int8_gemm.py), precomputed here per layer.
- Int8Conv2d: the same for conv2d (groups 1, dilation 1) through the GEMM: an im2col of the codes
  materialized by PyTorch (ops.im2col_codes; padding with z_a), not an implicit GEMM.
- Int4WeightOnlyLinear: `linear(x float, dequantize(w_q [N, K] int4 / uint4 codes, s_w [N, K/G], z_w))`
  -> triton_int4_linear on the packed nibbles (numerics.pack_int4), per-group scales and zero
  points, fp16 compute, fp32 accumulation.
Everything else stays QDQ and the report says why.
"""
from __future__ import annotations

import copy
import operator

import torch
from torch import fx

from ...errors import QCompileError
from ...graph import FROM_PASS, LINEAR, STATE, get_param, is_op
from ...numerics import pack_int4
from ...passes.base import PassManager, PassResult
from ..int8_gemm_pattern import CODE_RANGES, Int8GemmPattern, buffer, const, copy_meta, tail, val
from ..lowering_base import REPORT, LoweringPass, LoweringReport, LoweringRule, _arg
from . import ops

qops = torch.ops.qcompile
aten = torch.ops.aten
CONV2D = {aten.conv2d.default}


def _copy_meta(src: fx.Node, dst: fx.Node) -> None:
    copy_meta(src, dst, TritonLowering.name)


# ---------------------------------------------------------------- activation quantization

class QuantizeActivation(LoweringRule):
    anchors = {qops.quantize.default}
    kernel = "qcompile.triton_quantize_static / triton_quantize_per_token"

    def match(self, node):
        x, s, z, axis, block, qmin, qmax, dtype = node.args
        if not isinstance(x, fx.Node) or x.op == "get_attr":
            return {"why": "quantizes a constant (folded at convert time)"}
        if all(isinstance(n, fx.Node) and n.op == "get_attr" for n in (s, z)):
            return dict(node=node, kind="static", x=x, kernel="qcompile.triton_quantize_static")
        if all(isinstance(n, fx.Node) and n.target is operator.getitem for n in (s, z)):
            cq = s.args[0]
            if (is_op(cq, {qops.choose_qparams_per_token.default}) and z.args[0] is cq
                    and (s.args[1], z.args[1]) == (0, 1) and cq.args[0] is x):
                return dict(node=node, kind="dynamic", x=x, cq=cq, s=s, z=z, kernel="qcompile.triton_quantize_per_token")
        return {"why": "qparams are neither calibrated constants nor choose_qparams_per_token(x)"}

    def check(self, gm, m):
        node = m["node"]
        _, s, z, axis, block, qmin, qmax, dtype = node.args
        xv = val(m["x"])
        if isinstance(xv, torch.Tensor) and (xv.dtype not in (torch.float32, torch.float16, torch.bfloat16) or xv.dim() == 0):
            return f"input is {xv.dtype} of rank {xv.dim()}, not a float tensor"
        if dtype not in CODE_RANGES or not CODE_RANGES[dtype][0] <= qmin <= qmax <= CODE_RANGES[dtype][1]:
            return f"codes are {dtype} [{qmin}, {qmax}]: the kernels take int8/uint8 codes"
        if m["kind"] == "static":
            sv, zv = const(gm, s), const(gm, z)
            if sv.numel() != 1 or zv.numel() != 1:
                return f"static activation scale is not per tensor (shape {tuple(sv.shape)})"
            if not (bool(torch.isfinite(sv).all()) and float(sv) > 0):
                return "activation scale is not finite and positive"
            return None
        if (qmin, qmax, dtype) != (ops.QMIN, ops.QMAX, torch.int8) or tuple(m["cq"].args[1:3]) != (ops.QMIN, ops.QMAX):
            return f"per-token codes are not int8 [-128, 127] (got {dtype} [{qmin}, {qmax}])"
        if axis != -1 and not (isinstance(xv, torch.Tensor) and axis % xv.dim() == xv.dim() - 1):
            return f"per-token quantization along axis {axis}, not the last dim"
        return None

    def rewrite(self, gm, m):
        g, node = gm.graph, m["node"]
        x, s, z, axis, block, qmin, qmax, dtype = node.args
        with g.inserting_before(node):
            if m["kind"] == "static":
                new = g.call_function(qops.triton_quantize_static.default, (x, s, z, qmin, qmax, dtype))
                _copy_meta(node, new)
                node.replace_all_uses_with(new)
                g.erase_node(node)
                return new
            new = g.call_function(qops.triton_quantize_per_token.default, (x,))
            outs = [g.call_function(operator.getitem, (new, i)) for i in range(3)]
        new.meta[FROM_PASS] = TritonLowering.name
        for old, out in zip((node, m["s"], m["z"]), outs):
            _copy_meta(old, out)
            old.replace_all_uses_with(out)
        g.erase_node(node)
        return new


# ---------------------------------------------------------------- int8 GEMM (linear, conv2d)

class _TritonGemm(Int8GemmPattern):
    pass_name = "lower_triton"
    per_token_ops = frozenset({qops.triton_quantize_per_token.default})


class Int8Linear(_TritonGemm):
    anchors = LINEAR
    kernel = "qcompile.triton_int8_linear"

    def __init__(self):
        self._gm = None

    def match(self, node):
        return self._match_operands(node, _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias"))

    def check(self, gm, m):
        w_q = get_param(gm, m["w_q"])
        if w_q.dim() != 2:
            return f"weight codes have rank {w_q.dim()}, not [N, K]"
        cv = val(m["reshape"] or m["codes"])
        if isinstance(cv, torch.Tensor) and cv.shape[-1] != w_q.shape[1]:
            return "activation and weight disagree on K"
        if m["kind"] == "dynamic" and m["x_dq"].args[3] not in (-1, getattr(cv, "dim", lambda: 0)() - 1):
            return "per-token scales are not along the last dim"
        return self._check_operands(gm, m, w_q.shape[1])

    def rewrite(self, gm, m):
        g, node = gm.graph, m["node"]
        w_q = get_param(gm, m["w_q"])
        base = m["w_q"].target.replace(".", "_")
        with g.inserting_before(node):
            s_node, corr, (o_s, o_z, o_dt, qmin, qmax) = self._epilogue_args(gm, g, m, w_q, base)
            new = g.call_function(qops.triton_int8_linear.default,
                                  (self._codes_operand(g, m), m["a_s"], m["w_q"], s_node, m["bias"], corr, m["act"], o_s, o_z,
                                   o_dt, qmin, qmax))
        self._replace(g, m, new)
        return new


class Int8Conv2d(_TritonGemm):
    anchors = CONV2D
    kernel = "qcompile.triton_int8_conv2d (im2col + int8 GEMM)"

    def __init__(self):
        self._gm = None

    def match(self, node):
        m = self._match_operands(node, _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias"))
        if "why" in m:
            return m
        m.update(stride=_arg(node, 3, "stride", [1, 1]), padding=_arg(node, 4, "padding", [0, 0]),
                 dilation=list(_arg(node, 5, "dilation", [1, 1])), groups=_arg(node, 6, "groups", 1))
        return m

    def check(self, gm, m):
        if m["kind"] != "static":
            return "per-token activation scales have no meaning for a convolution's im2col rows"
        if isinstance(m["padding"], str):
            return f"padding={m['padding']!r} (string padding) is not lowered"
        if m["groups"] != 1 or any(d != 1 for d in m["dilation"]):
            return f"groups {m['groups']} / dilation {m['dilation']}: the im2col here covers groups 1, dilation 1"
        w_q = get_param(gm, m["w_q"])
        if w_q.dim() != 4:
            return f"weight has rank {w_q.dim()}, not a conv2d [OC, C, kh, kw]"
        return self._check_operands(gm, m, w_q[0].numel())

    def rewrite(self, gm, m):
        g, node = gm.graph, m["node"]
        w_q = get_param(gm, m["w_q"])
        w2d = w_q.reshape(w_q.shape[0], -1).contiguous()   # (C, kh, kw) order = the im2col column order
        base = m["w_q"].target.replace(".", "_")
        pair = lambda v: [int(v)] * 2 if isinstance(v, int) else (list(v) * 2 if len(v) == 1 else list(v))  # noqa: E731
        pad, stride = pair(m["padding"]), pair(m["stride"])
        with g.inserting_before(node):
            w_node = buffer(gm, g, base + "_2d", w2d)
            s_node, corr, (o_s, o_z, o_dt, qmin, qmax) = self._epilogue_args(gm, g, m, w2d, base)
            a_zp = m["a_z"]
            new = g.call_function(qops.triton_int8_conv2d.default,
                                  (self._codes_operand(g, m), m["a_s"], a_zp, w_node, s_node, m["bias"], corr,
                                   list(w_q.shape[2:]), stride, pad, m["act"], o_s, o_z, o_dt, qmin, qmax))
        self._replace(g, m, new)
        return new


# ---------------------------------------------------------------- int4 weight-only

class Int4WeightOnlyLinear(LoweringRule):
    anchors = LINEAR
    kernel = "qcompile.triton_int4_linear"
    min_group_block = 64   # smallest BLOCK_K of the shipped int4 configs: a group must hold whole K tiles

    def match(self, node):
        x, w_dq, bias = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
        if isinstance(x, fx.Node) and is_op(x, {qops.dequantize.default}):
            return {"why": "input is quantized (not weight-only)"}
        if not (isinstance(w_dq, fx.Node) and is_op(w_dq, {qops.dequantize.default})):
            return {"why": "weight is not a dequantized integer tensor"}
        if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in w_dq.args[:3]):
            return {"why": "weight or its qparams are not constants"}
        if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
            return {"why": "bias is not a constant tensor"}
        return dict(node=node, x=x, w_dq=w_dq, bias=bias)

    def check(self, gm, m):
        w_q, w_s, w_z = (get_param(gm, a) for a in m["w_dq"].args[:3])
        axis, block, out = m["w_dq"].args[3:6]
        xv = val(m["x"])
        if isinstance(xv, torch.Tensor) and xv.dtype != torch.float32:
            return f"activation is {xv.dtype}; the rule takes float32 models (fp16 compute inside)"
        signed = w_q.dtype == torch.int8
        lo, hi = (-8, 7) if signed else (0, 15)
        if w_q.dtype not in CODE_RANGES or w_q.dim() != 2 or int(w_q.min()) < lo or int(w_q.max()) > hi:
            return "weight codes are not int4 [-8, 7] / uint4 [0, 15] in an int8 / uint8 [N, K] tensor"
        n, k = w_q.shape
        if not (w_s.dim() == 2 and axis % 2 == 1 and w_s.shape == (n, -(-k // block))):
            return f"weight scale {tuple(w_s.shape)} is not per group along K"
        if block % self.min_group_block and block < k:
            return f"group size {block} is not a multiple of {self.min_group_block}"
        if w_z.numel() != 1 and w_z.shape != w_s.shape:
            return f"weight zero point {tuple(w_z.shape)} is not per group like the scale"
        if out != torch.float32:
            return f"weight dequantizes to {out}, not float32"
        return None

    def rewrite(self, gm, m):
        g, node = gm.graph, m["node"]
        w_q, w_s, w_z = (get_param(gm, a) for a in m["w_dq"].args[:3])
        block = m["w_dq"].args[4]
        k = w_q.shape[1]
        group = block if block < k else -(-k // 64) * 64   # one group: any multiple of 64 covering K
        base = m["w_dq"].args[0].target.replace(".", "_")
        act, act_node, _ = tail(node, gm) if len(node.users) == 1 else ("none", None, None)
        with g.inserting_before(node):
            w_node = buffer(gm, g, base + "_packed", pack_int4(w_q))
            s_node = buffer(gm, g, base + "_scale_g", w_s.float().contiguous())
            z_node = None
            if bool((w_z != 0).any()):
                z_node = buffer(gm, g, base + "_zp_g", w_z.to(torch.int32).expand(w_s.shape).contiguous())
            new = g.call_function(qops.triton_int4_linear.default,
                                  (m["x"], w_node, s_node, group, m["bias"], act, torch.float16, z_node,
                                   w_q.dtype == torch.int8))
        last = act_node or node
        _copy_meta(last, new)
        last.replace_all_uses_with(new)
        for n_ in (act_node, node):
            if n_ is not None:
                g.erase_node(n_)
        return new


# ---------------------------------------------------------------- the pass

class TritonLowering(LoweringPass):
    name = "lower_triton"

    def call(self, gm: fx.GraphModule) -> PassResult:
        for rule in self.rules:
            rule._gm = gm
        return super().call(gm)


def default_rules() -> list[LoweringRule]:
    return [QuantizeActivation(), Int8Linear(), Int8Conv2d(), Int4WeightOnlyLinear()]


def lower(quantized: fx.GraphModule, *, rules: list[LoweringRule] | None = None, dump_dir=None) -> fx.GraphModule:
    """A new GraphModule with the matched QDQ patterns on Triton kernels; `quantized` is not modified.

    The kernels run on CUDA tensors, or on the CPU under TRITON_INTERPRET=1; on CPU tensors
    otherwise each op runs its pure-PyTorch reference (same integer codes, same epilogue order)."""
    state = quantized.meta.get(STATE)
    if state is not None and state.stage != "quantized":
        raise QCompileError(f"lower() takes the module qc.convert returned (this one is '{state.stage}')")
    gm = copy.deepcopy(quantized)
    if state is not None:
        gm.meta[STATE] = new_state = copy.deepcopy(state)
    p = TritonLowering(rules if rules is not None else default_rules())
    pm = PassManager([p], dump_dir=dump_dir, stage="lower")
    pm(gm)
    gm.meta[REPORT] = p.report
    if state is not None:
        new_state.records.extend(pm.records)
        new_state.stage = "lowered"
    return gm


def lowering_report(gm: fx.GraphModule) -> LoweringReport:
    report = gm.meta.get(REPORT)
    if report is None:
        raise QCompileError("this module was not produced by qcompile.backends.triton.lower()")
    return report
