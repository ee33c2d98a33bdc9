"""Lowering rules of the torch CPU backend beyond the dynamic per-token linear (lowering.py).

- StaticInt8Linear: `linear(dequantize(codes, s_a, z_a), dequantize(w_q int8, s_w [N] or 1, 0), b)` with
  per-tensor static (s_a, z_a), plus the tail oneDNN fuses (ReLU / GELU, then a static per-tensor
  quantize: codes out, so the next integer op reads them directly) -> onednn_int8_linear.
- Int8Conv2d: the same around conv2d (any stride, padding, dilation, groups; fused ReLU) ->
  onednn_int8_conv2d.
- Int8Conv1d: conv1d as that conv2d over a unit height: codes [B, C, L] -> [B, C, 1, L], weight
  [OC, C/g, k] -> [OC, C/g, 1, k], stride/padding/dilation (1, s) / (0, p) / (1, d), then the unit
  dim squeezed away; the same integer products and accumulation order as a 1-D kernel would give.
- Int8WeightOnlyLinear (w8a16): `linear(x float, dequantize(w_q int8 [N, K], s_w [N], 0), b)` ->
  int8_weight_only_linear on `aten._weight_int8pack_mm`.
- Int4WeightOnlyLinear (w4a16): `linear(x float, dequantize(w_q int4/uint4 [N, K], s_w [N, K/B], z_w), b)`
  -> int4_weight_only_linear on `aten._weight_int4pack_mm_for_cpu`.
A pattern none of them matches stays QDQ, and the lowering report says why.
"""
from __future__ import annotations

import torch
from torch import fx

from ...graph import FROM_PASS, LINEAR, get_param, is_op
from ..int8_gemm_pattern import Int8GemmPattern, buffer, copy_meta, val
from ..lowering_base import LoweringRule, _arg
from . import onednn, weight_only
from .weight_only import INT4_GROUPS

qops = torch.ops.qcompile
aten = torch.ops.aten
PASS_NAME = "lower_torch_cpu"


class _OneDNNGemm(Int8GemmPattern):
    pass_name = PASS_NAME

    def _check_static(self, gm, m) -> str | None:
        if m["kind"] != "static":
            return "activation is not quantized with calibrated per-tensor qparams"
        if m["q_node"] is not None and m["q_node"].args[7] not in onednn.CODE_DTYPES:
            return f"requantizes to {m['q_node'].args[7]}"
        return None

    def _scale_n(self, gm, g, m, n: int) -> fx.Node:
        """The weight scale as float32 [N] (a per-tensor scale expanded), the layout oneDNN takes."""
        w_s = get_param(gm, m["w_scale"])
        if w_s.dtype == torch.float32 and tuple(w_s.shape) == (n,):
            return m["w_scale"]
        return buffer(gm, g, m["w_q"].target.replace(".", "_") + "_scale_n", w_s.reshape(-1).float().expand(n).contiguous())

    def _out(self, m):
        q = m["q_node"]
        if q is None:
            return None, None, torch.float32, 0, 0
        return q.args[1], q.args[2], q.args[7], q.args[5], q.args[6]


class StaticInt8Linear(_OneDNNGemm):
    anchors = LINEAR
    kernel = "qcompile.onednn_int8_linear (onednn.qlinear_pointwise)"
    fusable_acts = frozenset(onednn.LINEAR_POST_OPS)

    def match(self, node):
        return self._match_operands(node, _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias"))

    def check(self, gm, m):
        w_q = get_param(gm, m["w_q"])
        if w_q.dim() != 2:
            return f"weight codes have rank {w_q.dim()}, not [N, K]"
        cv = val(m["reshape"] or m["codes"])
        if isinstance(cv, torch.Tensor) and cv.shape[-1] != w_q.shape[1]:
            return "activation and weight disagree on K"
        return self._check_static(gm, m) or self._check_operands(gm, m, w_q.shape[1])

    def rewrite(self, gm, m):
        g, node = gm.graph, m["node"]
        w_q = get_param(gm, m["w_q"])
        with g.inserting_before(node):
            s_node = self._scale_n(gm, g, m, w_q.shape[0])
            new = g.call_function(qops.onednn_int8_linear.default,
                                  (self._codes_operand(g, m), m["a_s"], m["a_z"], m["w_q"], s_node, m["bias"], m["act"],
                                   *self._out(m)))
        self._replace(g, m, new)
        return new


class Int8Conv2d(_OneDNNGemm):
    anchors = {aten.conv2d.default}
    kernel = "qcompile.onednn_int8_conv2d (onednn.qconv2d_pointwise)"
    fusable_acts = frozenset(onednn.CONV_POST_OPS)

    def match(self, node):
        m = self._match_operands(node, _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias"))
        if "why" in m:
            return m
        m.update(stride=_arg(node, 3, "stride", [1, 1]), padding=_arg(node, 4, "padding", [0, 0]),
                 dilation=_arg(node, 5, "dilation", [1, 1]), groups=_arg(node, 6, "groups", 1))
        return m

    def check(self, gm, m):
        if m["reshape"] is not None:
            return "input is reshaped between its dequantize and the conv"
        if isinstance(m["padding"], str):
            return f"padding={m['padding']!r} (string padding) is not lowered"
        w_q = get_param(gm, m["w_q"])
        if w_q.dim() != 4:
            return f"weight has rank {w_q.dim()}, not a conv2d [OC, C, kh, kw]"
        return self._check_static(gm, m) or self._check_operands(gm, m, w_q[0].numel())

    def rewrite(self, gm, m):
        g, node = gm.graph, m["node"]
        w_q = get_param(gm, m["w_q"])
        pair = lambda v: [int(v)] * 2 if isinstance(v, int) else (list(v) * 2 if len(v) == 1 else list(v))  # noqa: E731
        with g.inserting_before(node):
            s_node = self._scale_n(gm, g, m, w_q.shape[0])
            new = g.call_function(qops.onednn_int8_conv2d.default,
                                  (m["codes"], m["a_s"], m["a_z"], m["w_q"], s_node, m["bias"], pair(m["stride"]),
                                   pair(m["padding"]), pair(m["dilation"]), int(m["groups"]), m["act"], *self._out(m)))
        self._replace(g, m, new)
        return new


class Int8Conv1d(Int8Conv2d):
    anchors = {aten.conv1d.default}
    kernel = "qcompile.onednn_int8_conv2d over a unit height (onednn.qconv2d_pointwise)"

    def check(self, gm, m):
        if m["reshape"] is not None:
            return "input is reshaped between its dequantize and the conv"
        if isinstance(m["padding"], str):
            return f"padding={m['padding']!r} (string padding) is not lowered"
        w_q = get_param(gm, m["w_q"])
        if w_q.dim() != 3:
            return f"weight has rank {w_q.dim()}, not a conv1d [OC, C, k]"
        return self._check_static(gm, m) or self._check_operands(gm, m, w_q[0].numel())

    def rewrite(self, gm, m):
        g, node = gm.graph, m["node"]
        w_q = get_param(gm, m["w_q"])
        one = lambda v: int(v) if isinstance(v, int) else int(v[0])  # noqa: E731
        with g.inserting_before(node):
            s_node = self._scale_n(gm, g, m, w_q.shape[0])
            w2d = buffer(gm, g, m["w_q"].target.replace(".", "_") + "_2d", w_q.unsqueeze(2).contiguous())
            codes = g.call_function(aten.unsqueeze.default, (m["codes"], 2))
            conv = g.call_function(qops.onednn_int8_conv2d.default,
                                   (codes, m["a_s"], m["a_z"], w2d, s_node, m["bias"], [1, one(m["stride"])],
                                    [0, one(m["padding"])], [1, one(m["dilation"])], int(m["groups"]), m["act"],
                                    *self._out(m)))
            new = g.call_function(aten.squeeze.dim, (conv, 2))
        for n_ in (codes, conv):
            n_.meta[FROM_PASS] = PASS_NAME
        self._replace(g, m, new)
        return new


class _WeightOnly(LoweringRule):
    anchors = LINEAR

    def __init__(self, compute_dtype: torch.dtype = torch.bfloat16):
        self.compute_dtype = compute_dtype

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

    def _check_x(self, m):
        xv = val(m["x"])
        if isinstance(xv, torch.Tensor) and xv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"activation is {xv.dtype}, not a float tensor"
        if m["w_dq"].args[5] != torch.float32:
            return f"weight dequantizes to {m['w_dq'].args[5]}, not float32"
        return None

    def _replace(self, gm, m, new):
        copy_meta(m["node"], new, PASS_NAME)
        m["node"].replace_all_uses_with(new)
        gm.graph.erase_node(m["node"])
        return new


class Int8WeightOnlyLinear(_WeightOnly):
    kernel = "qcompile.int8_weight_only_linear (aten._weight_int8pack_mm)"

    def check(self, gm, m):
        why = self._check_x(m)
        if why:
            return why
        w_q, w_s, w_z = (get_param(gm, a) for a in m["w_dq"].args[:3])
        if w_q.dtype != torch.int8 or w_q.dim() != 2:
            return f"weight codes are {w_q.dtype} of rank {w_q.dim()}, not int8 [N, K]"
        n = w_q.shape[0]
        if not (w_s.numel() in (1, n) and (w_s.dim() <= 1 or w_s.shape == (n, 1))):
            return f"weight scale {tuple(w_s.shape)} is not per tensor / per output channel"
        if bool((w_z != 0).any()):
            return "weight zero point is non-zero: the kernel has no zero-point term"
        return None

    def rewrite(self, gm, m):
        g, node = gm.graph, m["node"]
        w_q, w_s = (get_param(gm, a) for a in m["w_dq"].args[:2])
        with g.inserting_before(node):
            s_node = buffer(gm, g, m["w_dq"].args[0].target.replace(".", "_") + "_scale_n",
                            w_s.reshape(-1).float().expand(w_q.shape[0]).contiguous())
            new = g.call_function(qops.int8_weight_only_linear.default,
                                  (m["x"], m["w_dq"].args[0], s_node, m["bias"], self.compute_dtype))
        return self._replace(gm, m, new)


class Int4WeightOnlyLinear(_WeightOnly):
    kernel = "qcompile.int4_weight_only_linear (aten._weight_int4pack_mm_for_cpu)"

    def check(self, gm, m):
        why = self._check_x(m)
        if why:
            return why
        w_q, w_s, w_z = (get_param(gm, a) for a in m["w_dq"].args[:3])
        axis, block = m["w_dq"].args[3:5]
        signed = w_q.dtype == torch.int8
        lo, hi = (-8, 7) if signed else (0, 15)
        if w_q.dtype not in (torch.int8, torch.uint8) or w_q.dim() != 2 or int(w_q.min()) < lo or int(w_q.max()) > hi:
            return "weight codes are not int4 [-8, 7] / uint4 [0, 15] in an int8 / uint8 [N, K] tensor"
        n, k = w_q.shape
        if not (w_s.dim() == 2 and axis % 2 == 1 and w_s.shape == (n, -(-k // block))):
            return f"weight scale {tuple(w_s.shape)} is not per group along K"
        if block < k and block % INT4_GROUPS[0]:
            return f"group size {block} is not a multiple of {INT4_GROUPS[0]} (the kernel's groups: {INT4_GROUPS})"
        if w_z.numel() != 1 and w_z.shape != w_s.shape:
            return f"weight zero point {tuple(w_z.shape)} is not per group like the scale"
        return None

    def rewrite(self, gm, m):
        g, node = gm.graph, m["node"]
        w_q, w_s, w_z = (get_param(gm, a) for a in m["w_dq"].args[:3])
        n, k = w_q.shape
        block = m["w_dq"].args[4]
        span = block if block < k else -(-k // INT4_GROUPS[0]) * INT4_GROUPS[0]   # K covered by one scale
        group = max(gs for gs in INT4_GROUPS if span % gs == 0)
        reps = span // group                     # kernel groups per reference block: repeat its scale
        n_groups = -(-k // group)
        s = w_s.float().repeat_interleave(reps, dim=1)[:, :n_groups]
        z = w_z if w_z.numel() == 1 else w_z.repeat_interleave(reps, dim=1)[:, :n_groups]
        packed, codes, scale_and_zero = weight_only.pack_int4_for_cpu(w_q, s, z, group)
        base = m["w_dq"].args[0].target.replace(".", "_")
        with g.inserting_before(node):
            w_node = buffer(gm, g, base + "_int4pack", packed)
            codes_node = buffer(gm, g, base + "_codes_u", codes)
            sz_node = buffer(gm, g, base + "_scale_and_zero", scale_and_zero)
            new = g.call_function(qops.int4_weight_only_linear.default,
                                  (m["x"], w_node, codes_node, sz_node, group, n, m["bias"], self.compute_dtype))
        return self._replace(gm, m, new)


# ---------------------------------------------------------------- activation quantize / dequantize

class _InlineQDQ(LoweringRule):
    """A per-tensor quantize / dequantize with calibrated constants -> the aten ops of numerics.py,
    in the same order (so the same float32 roundings and codes). Eager runs them as before; under
    `torch.compile` inductor fuses them into the op that produces the tensor (LayerNorm, a residual
    add, softmax) instead of stopping at an opaque custom op."""
    phase = 1   # after the GEMM rules, which consume quantize -> dequantize patterns whole

    constant_input = ""   # why a constant input is left alone

    def match(self, node):
        x = node.args[0]
        if not isinstance(x, fx.Node) or x.op == "get_attr":
            return {"why": self.constant_input}
        return dict(node=node)

    def check(self, gm, m):
        return self._constants(gm, m["node"])

    def _constants(self, gm, node) -> str | None:
        s, z = node.args[1], node.args[2]
        if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (s, z)):
            return "qparams are not calibrated constants (dynamic or per-token)"
        if get_param(gm, s).numel() != 1 or get_param(gm, z).numel() != 1:
            return "qparams are not per tensor"
        return None

    def _float_zp(self, gm, g, node) -> fx.Node:
        return buffer(gm, g, node.args[2].target + "_f32", get_param(gm, node.args[2]).float().reshape(()))

    def _scale(self, gm, g, node) -> fx.Node:
        s = get_param(gm, node.args[1])
        return node.args[1] if s.dtype == torch.float32 and s.dim() == 0 else buffer(gm, g, node.args[1].target + "_f32", s.float().reshape(()))


class InlineQuantize(_InlineQDQ):
    anchors = {qops.quantize.default}
    kernel = "aten ops (x / s, round, + z, clamp, cast): fusable by inductor"

    constant_input = "quantizes a constant"

    def rewrite(self, gm, m):
        g, node = gm.graph, m["node"]
        x, _, _, _, _, qmin, qmax, dtype = node.args
        with g.inserting_before(node):
            s, z = self._scale(gm, g, node), self._float_zp(gm, g, node)
            z0 = buffer(gm, g, "qc_zero_f32", torch.zeros(()))
            xv = val(x)
            if not (isinstance(xv, torch.Tensor) and xv.dtype == torch.float32):
                x = g.call_function(aten._to_copy.default, (x,), {"dtype": torch.float32})
            t = g.call_function(aten.div.Tensor, (x, s))
            # nan_to_num(t, 0, inf, -inf) as where(t == t, t, zero): the same values (NaN is the only
            # value unequal to itself), but inductor vectorizes `eq` where it runs isnan lane by
            # lane. The zero is a 0-dim tensor: with a Python 0.0 (where.ScalarOther) the module
            # compiled with freezing agreed less with eager on MiniLM (cosine 0.991 against 1.0)
            t = g.call_function(aten.where.self, (g.call_function(aten.eq.Tensor, (t, t)), t, z0))
            t = g.call_function(aten.round.default, (t,))
            t = g.call_function(aten.add.Tensor, (t, z))
            t = g.call_function(aten.clamp.default, (t, qmin, qmax))
            new = g.call_function(aten._to_copy.default, (t,), {"dtype": dtype})
        copy_meta(node, new, PASS_NAME)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        return new


class InlineDequantize(_InlineQDQ):
    anchors = {qops.dequantize.default}
    kernel = "aten ops ((q - z) * s): fusable by inductor"

    constant_input = "dequantizes a constant (a weight no kernel took)"

    def rewrite(self, gm, m):
        g, node = gm.graph, m["node"]
        q, out_dtype = node.args[0], node.args[5]
        with g.inserting_before(node):
            s, z = self._scale(gm, g, node), self._float_zp(gm, g, node)
            t = g.call_function(aten._to_copy.default, (q,), {"dtype": torch.float32})
            t = g.call_function(aten.sub.Tensor, (t, z))
            new = g.call_function(aten.mul.Tensor, (t, s))
            if out_dtype != torch.float32:
                new = g.call_function(aten._to_copy.default, (new,), {"dtype": out_dtype})
        copy_meta(node, new, PASS_NAME)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        return new


# ---------------------------------------------------------------- float linears with a tiny K

SMALL_K = 8


class SmallKFloatLinear(LoweringRule):
    """A float linear over at most SMALL_K input channels (the outlier split's float path reads the
    3-6 outlier channels of MiniLM) -> K broadcast multiply-adds, x[..., k] * W[:, k]. As a GEMM
    call it costs a library call and a pass over the output for almost no arithmetic; as pointwise
    ops inductor fuses it into the add that joins it to the integer path (and what follows)."""
    anchors = LINEAR
    kernel = "aten broadcast multiply-adds (K <= 8): fusable by inductor"
    phase = 1

    def match(self, node):
        x, w = _arg(node, 0, "input"), _arg(node, 1, "weight")
        b = _arg(node, 2, "bias")
        xv = val(x)
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and isinstance(xv, torch.Tensor) and xv.is_floating_point()):
            return None
        wv = get_param(self._gm, w)
        if not (wv.dim() == 2 and wv.is_floating_point()):
            return None
        if wv.shape[1] > SMALL_K:
            return None
        if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
            return {"why": "its bias is not a constant"}
        return dict(node=node, x=x, w=w, b=b)

    def check(self, gm, m):
        return None

    def _columns(self, gm, x: fx.Node, k: int) -> tuple[fx.Node, list[int]]:
        """(tensor, its last-dim indices) to read the K input channels from: through an
        index_select by constant indices (the outlier split's), so that inductor sees plain slices
        of the source; an indirect gather in a fused kernel stops it vectorizing."""
        if (x.target is aten.index_select.default and isinstance(x.args[2], fx.Node) and x.args[2].op == "get_attr"
                and isinstance(val(x.args[0]), torch.Tensor) and x.args[1] in (-1, val(x.args[0]).dim() - 1)):
            return x.args[0], [int(i) for i in get_param(gm, x.args[2]).tolist()]
        return x, list(range(k))

    def rewrite(self, gm, m):
        g, node = gm.graph, m["node"]
        w = get_param(gm, m["w"]).detach()
        k = w.shape[1]
        source, columns = self._columns(gm, m["x"], k)
        with g.inserting_before(node):
            acc = m["b"]
            for j, c in enumerate(columns):
                xj = g.call_function(aten.slice.Tensor, (source, -1, c, c + 1))
                wj = buffer(gm, g, f"{m['w'].target}_col{j}", w[:, j].contiguous())
                term = g.call_function(aten.mul.Tensor, (xj, wj))
                acc = term if acc is None else g.call_function(aten.add.Tensor, (acc, term))
        copy_meta(node, acc, PASS_NAME)
        node.replace_all_uses_with(acc)
        g.erase_node(node)
        return acc


def default_rules(weight_only_dtype: torch.dtype = torch.bfloat16) -> list[LoweringRule]:
    from .lowering import DynamicInt8Linear

    # int4 before int8: int4 codes with one scale per row would also fit the int8 kernel, at twice the bytes
    return [DynamicInt8Linear(), StaticInt8Linear(), Int8Conv2d(), Int8Conv1d(), Int4WeightOnlyLinear(weight_only_dtype),
            Int8WeightOnlyLinear(weight_only_dtype), InlineQuantize(), InlineDequantize(),
            SmallKFloatLinear()]


__all__ = ["StaticInt8Linear", "Int8Conv2d", "Int8Conv1d", "Int8WeightOnlyLinear", "Int4WeightOnlyLinear", "InlineQuantize", "InlineDequantize",
           "SmallKFloatLinear", "default_rules"]
