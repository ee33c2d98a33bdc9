"""Matching of the INT8 GEMM patterns of the reference QDQ graph, shared by the lowering backends.

`Int8GemmPattern` finds, around one linear / conv node,
    [reshape] dequantize(codes, s_a, z_a) -> op(., dequantize(w_q int8, s_w, 0), bias) [-> act] [-> quantize]
and checks what every INT8 GEMM kernel needs (int8/uint8 codes, symmetric per-tensor or per-output-channel
int8 weights, a K whose int32 accumulator cannot overflow). A backend subclasses it and writes its own
`rewrite` onto its kernel; `tail` is the epilogue (activation, requantize) the kernel absorbs.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..graph import FROM_PASS, get_param, is_op
from .lowering_base import LoweringRule, _arg, _free_name

qops = torch.ops.qcompile
aten = torch.ops.aten
ACT_OPS = {aten.relu.default: "relu", aten.relu_.default: "relu", aten.silu.default: "silu",
           aten.silu_.default: "silu", aten.gelu.default: "gelu"}
# Shape-only ops that commute with a per-tensor dequantize: linear(flatten(dq(q))) == linear(dq(flatten(q))).
RESHAPES = {aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default}
CODE_RANGES = {torch.int8: (-128, 127), torch.uint8: (0, 255)}
REPLACES = "qcompile_lowered_from"   # node.meta on a lowered op: the reference node whose value it computes
MAX_K = (2 ** 31 - 1) // (255 * 128)   # int32 accumulator exact: |q_a - z_a| <= 255, |w| <= 128


def val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def const(gm, node):
    return get_param(gm, node) if isinstance(node, fx.Node) and node.op == "get_attr" else None


def copy_meta(src: fx.Node, dst: fx.Node, pass_name: str) -> None:
    dst.meta.update({k: v for k, v in src.meta.items() if k in ("val", "tensor_meta", "nn_module_stack", "stack_trace")})
    dst.meta[FROM_PASS] = pass_name
    dst.meta[REPLACES] = src.name


def buffer(gm, g, base: str, t: torch.Tensor) -> fx.Node:
    name = _free_name(gm, base)
    gm.register_buffer(name, t)
    return g.get_attr(name)


def tail(node: fx.Node, gm, acts=None) -> tuple[str, fx.Node | None, fx.Node | None]:
    """(activation, act node, static per-tensor quantize node) that the GEMM epilogue can absorb:
    each must be the only user of the node before it. `acts`: the activation names the kernel fuses (all by default)."""
    act, act_node, q_node, last = "none", None, None, node
    users = list(last.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in ACT_OPS:
        u = users[0]
        name = ACT_OPS[u.target]
        if name == "gelu":
            approx = _arg(u, 1, "approximate", "none")
            name = {"none": "gelu", "tanh": "gelu_tanh"}.get(approx)
        if name is not None and (acts is None or name in acts) and u.args[0] is last:
            act, act_node, last = name, u, u
    users = list(last.users)
    if len(users) == 1 and is_op(users[0], {qops.quantize.default}) and users[0].args[0] is last:
        q = users[0]
        s, z, dtype = q.args[1], q.args[2], q.args[7]
        sv, zv = const(gm, s), const(gm, z)
        if (sv is not None and zv is not None and sv.numel() == 1 and zv.numel() == 1 and dtype in CODE_RANGES
                and bool(torch.isfinite(sv).all()) and float(sv) > 0):
            q_node = q
    return act, act_node, q_node


class Int8GemmPattern(LoweringRule):
    """Shared matching of the activation and weight dequantizes and of the epilogue tail.

    Subclasses set `pass_name` (recorded on the nodes they create), `per_token_ops` (the lowered
    per-token quantize ops whose codes count as a "dynamic" activation; none by default) and
    `fusable_acts` (None: every activation of ACT_OPS)."""
    pass_name = "lower"
    per_token_ops: frozenset = frozenset()
    fusable_acts = None
    _gm = None

    def _match_operands(self, node, x_dq, w_dq, bias):
        reshape = None
        if (isinstance(x_dq, fx.Node) and is_op(x_dq, RESHAPES) and len(x_dq.users) == 1
                and isinstance(x_dq.args[0], fx.Node) and is_op(x_dq.args[0], {qops.dequantize.default})
                and all(isinstance(a, fx.Node) and a.op == "get_attr" for a in x_dq.args[0].args[1:3])):
            reshape, x_dq = x_dq, x_dq.args[0]     # per-tensor qparams only: a reshape keeps them valid
        if not (isinstance(x_dq, fx.Node) and is_op(x_dq, {qops.dequantize.default})):
            return {"why": "input is not dequantized (float or weight-only)"}
        codes, s, z = x_dq.args[:3]
        if all(isinstance(n, fx.Node) and n.op == "get_attr" for n in (s, z)):
            kind = "static"
        elif (all(isinstance(n, fx.Node) and n.target is operator.getitem for n in (s, z)) and s.args[0] is z.args[0]
              and is_op(s.args[0], self.per_token_ops) and codes.args[0] is s.args[0]):
            kind = "dynamic"
        else:
            return {"why": "activation qparams are neither per-tensor constants nor a lowered per-token quantize"}
        if not (isinstance(w_dq, fx.Node) and is_op(w_dq, {qops.dequantize.default})):
            return {"why": "weight is not a dequantized integer tensor"}
        if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in w_dq.args[:3]):
            return {"why": "weight or its qparams are not constants"}
        if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
            return {"why": "bias is not a constant tensor"}
        act, act_node, q_node = tail(node, self._gm, self.fusable_acts)
        return dict(node=node, kind=kind, codes=codes, reshape=reshape, x_dq=x_dq, a_s=s, a_z=z, w_dq=w_dq, w_q=w_dq.args[0],
                    w_scale=w_dq.args[1], w_zp=w_dq.args[2], bias=bias, act=act, act_node=act_node, q_node=q_node)

    def _check_operands(self, gm, m, k_expected):
        cv = val(m["codes"])
        if isinstance(cv, torch.Tensor) and cv.dtype not in CODE_RANGES:
            return f"activation codes are {cv.dtype}, not int8/uint8"
        if m["x_dq"].args[5] != torch.float32:
            return f"activation dequantizes to {m['x_dq'].args[5]}, not float32"
        if m["kind"] == "static":
            if const(gm, m["a_s"]).numel() != 1 or const(gm, m["a_z"]).numel() != 1:
                return "activation scale is not per tensor"
        w_q, w_s, w_z = (get_param(gm, m[k]) for k in ("w_q", "w_scale", "w_zp"))
        if w_q.dtype != torch.int8:
            return f"weight codes are {w_q.dtype}, not int8"
        n = w_q.shape[0]
        if w_s.numel() == 1 and w_z.numel() == 1:
            pass
        elif not (w_s.dim() == 1 and w_s.numel() == n and m["w_dq"].args[3] % w_q.dim() == 0 and w_z.numel() in (1, n)):
            return f"weight scale {tuple(w_s.shape)} is not per tensor / per output channel"
        if bool((w_z != 0).any()):
            return "weight zero point is non-zero: the kernel folds only the activation zero point"
        if not bool(torch.isfinite(w_s).all()):
            return "weight scale is not finite"
        if k_expected > MAX_K:
            return f"K = {k_expected} can overflow the int32 accumulator (K <= {MAX_K})"
        if m["bias"] is not None:
            b = get_param(gm, m["bias"])
            if tuple(b.shape) != (n,) or not b.is_floating_point():
                return f"bias is {b.dtype} {tuple(b.shape)}, not float [{n}]"
        return None

    def _epilogue_args(self, gm, g, m, w2d: torch.Tensor, base: str):
        """(w_scale node, corr node or None) as buffers, and the out (scale, zp, dtype, qmin, qmax)."""
        n = w2d.shape[0]
        w_s = get_param(gm, m["w_scale"])
        if w_s.dtype == torch.float32 and tuple(w_s.shape) == (n,):
            s_node = m["w_scale"]
        else:
            s_node = buffer(gm, g, base + "_scale_n", w_s.reshape(-1).float().expand(n).contiguous())
        corr = None
        cv = val(m["codes"])
        shift = 128 if isinstance(cv, torch.Tensor) and cv.dtype == torch.uint8 else 0
        z_a = int(const(gm, m["a_z"]).reshape(())) if m["kind"] == "static" else 0
        if shift != z_a:
            col = w2d.to(torch.int64).sum(1) * (shift - z_a)
            corr = buffer(gm, g, base + "_corr", col.to(torch.int32))   # |col| <= 255 * 128 * K < 2**31
        q = m["q_node"]
        out = (q.args[1], q.args[2], q.args[7], q.args[5], q.args[6]) if q is not None else (None, None, torch.float32, 0, 0)
        return s_node, corr, out

    def _codes_operand(self, g, m):
        """The codes as the GEMM reads them: the dequantize's input, reshaped like the float input was."""
        r = m["reshape"]
        if r is None:
            return m["codes"]
        node = g.call_function(r.target, (m["codes"], *r.args[1:]), dict(r.kwargs))
        node.meta[FROM_PASS] = self.pass_name
        return node

    def _replace(self, g, m, new):
        last = m["q_node"] or m["act_node"] or m["node"]
        copy_meta(last, new, self.pass_name)
        last.replace_all_uses_with(new)
        for n_ in (m["q_node"], m["act_node"], m["node"]):
            if n_ is not None:
                g.erase_node(n_)
