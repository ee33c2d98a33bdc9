"""Lowering rules of the torch CPU backend and the pass that applies them.

A `LoweringRule` has a `match(node) -> dict | None` (the structural pattern around one anchor node),
a `check(gm, match) -> str | None` (None when the rule applies, else the reason it does not) and a
`rewrite(gm, match) -> Node`. `TorchCPULowering` is an in-place `Pass` over every anchor; `lower()`
runs it through a `PassManager` on a deep copy, so the quantized module given to it stays as it was.
Whatever no rule lowers stays in reference QDQ form, and the report says why.
"""
from __future__ import annotations

import copy
import operator

import torch
from torch import fx

from ...errors import QCompileError
from ...graph import FROM_PASS, LINEAR, STATE, get_param, is_op
from ...passes.base import PassManager, PassResult
from ..lowering_base import REPORT, LoweringPass, LoweringReport, LoweringRule, _arg, _free_name
from . import ops  # noqa: F401  (registers qcompile::int8_dynamic_linear)

qops = torch.ops.qcompile


class DynamicInt8Linear(LoweringRule):
    """choose_qparams_per_token(x) -> q -> dq ; dq(w_q, s_w, 0) -> linear  ==>  int8_dynamic_linear(x, w_q^T, s_w, b)"""
    anchors = LINEAR
    kernel = "qcompile.int8_dynamic_linear (torch._int_mm)"

    def match(self, node: fx.Node) -> dict | None:
        """The pattern's nodes, or a dict with only 'why' naming the first structural mismatch."""
        x_dq, w_dq = _arg(node, 0, "input"), _arg(node, 1, "weight")
        bias = _arg(node, 2, "bias")
        if not (isinstance(x_dq, fx.Node) and is_op(x_dq, {qops.dequantize.default})):
            return {"why": "input is not dequantized (float or weight-only linear)"}
        x_q = x_dq.args[0]
        if not (isinstance(x_q, fx.Node) and is_op(x_q, {qops.quantize.default})):
            return {"why": "input dequantize is not fed by a quantize"}
        s, z = x_q.args[1], x_q.args[2]
        if not all(isinstance(n, fx.Node) and n.target is operator.getitem for n in (s, z)):
            return {"why": "activation qparams are static (not choose_qparams_per_token)"}
        cq = s.args[0]
        if not (is_op(cq, {qops.choose_qparams_per_token.default}) and z.args[0] is cq
                and (s.args[1], z.args[1]) == (0, 1)):
            return {"why": "activation qparams are not choose_qparams_per_token"}
        if cq.args[0] is not x_q.args[0]:
            return {"why": "qparams chosen on a different tensor than the one quantized"}
        if tuple(x_dq.args[1:3]) != (s, z):
            return {"why": "dequantize uses other qparams than its quantize"}
        if not (isinstance(w_dq, fx.Node) and is_op(w_dq, {qops.dequantize.default})):
            return {"why": "weight is not a dequantized integer tensor"}
        if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in w_dq.args[:3]):
            return {"why": "weight or its qparams are not constants"}
        if bias is not None and not isinstance(bias, fx.Node):
            return {"why": "bias is not a tensor"}
        return dict(linear=node, x=x_q.args[0], x_q=x_q, x_dq=x_dq, qparams=cq, w_dq=w_dq,
                    w_q=w_dq.args[0], w_scale=w_dq.args[1], w_zp=w_dq.args[2], bias=bias)

    def check(self, gm: fx.GraphModule, m: dict) -> str | None:
        x_q, x_dq, w_dq = m["x_q"], m["x_dq"], m["w_dq"]
        _, _, _, axis, block, qmin, qmax, dtype = x_q.args
        if (qmin, qmax, dtype) != (ops.QMIN, ops.QMAX, torch.int8) or tuple(m["qparams"].args[1:3]) != (ops.QMIN, ops.QMAX):
            return f"activation codes are not int8 [-128, 127] (got {dtype} [{qmin}, {qmax}])"
        if axis not in (-1,) or x_dq.args[3] != axis:
            return f"activation is not quantized per token along the last dim (axis {axis})"
        if x_dq.args[5] != torch.float32:
            return f"activation dequantizes to {x_dq.args[5]}, not float32"
        x_val = m["x"].meta.get("val")
        if isinstance(x_val, torch.Tensor) and (x_val.dtype != torch.float32 or x_val.device.type != "cpu"):
            return f"activation is {x_val.dtype} on {x_val.device.type}; the kernel takes float32 on the CPU"
        w_q, w_scale, w_zp = (get_param(gm, m[k]) for k in ("w_q", "w_scale", "w_zp"))
        if w_q.dtype != torch.int8 or w_q.dim() != 2:
            return f"weight codes are {w_q.dtype} of rank {w_q.dim()}, not int8 [N, K]"
        n, k = w_q.shape
        if k > ops.MAX_K:
            return f"K = {k} can overflow the int32 accumulator"
        if isinstance(x_val, torch.Tensor) and x_val.shape[-1] != k:
            return "activation and weight disagree on K"
        w_axis, w_block, w_out = w_dq.args[3:6]
        if w_out != torch.float32:
            return f"weight dequantizes to {w_out}, not float32"
        if w_scale.numel() == 1 and w_zp.numel() == 1:
            granularity = "per tensor"
        elif w_scale.dim() == 1 and w_scale.numel() == n and w_axis % 2 == 0 and w_zp.numel() in (1, n):
            granularity = "per channel"
        else:
            return (f"weight granularity not per tensor / per output channel (scale {tuple(w_scale.shape)}, "
                    f"axis {w_axis}, block {w_block})")
        if bool((w_zp != 0).any()):
            return f"weight zero point is non-zero ({granularity}, asymmetric): _int_mm has no zero-point term"
        if not bool(torch.isfinite(w_scale).all()):
            return "weight scale is not finite"
        if m["bias"] is not None:
            b_val = m["bias"].meta.get("val") if m["bias"].op != "get_attr" else get_param(gm, m["bias"])
            if isinstance(b_val, torch.Tensor) and (b_val.dtype != torch.float32 or tuple(b_val.shape) != (n,)):
                return f"bias is {b_val.dtype} {tuple(b_val.shape)}, not float32 [{n}]"
        return None

    def rewrite(self, gm: fx.GraphModule, m: dict) -> fx.Node:
        g, node = gm.graph, m["linear"]
        w_q, w_scale = get_param(gm, m["w_q"]), get_param(gm, m["w_scale"])
        n = w_q.shape[0]
        base = m["w_q"].target.replace(".", "_")
        t_name = _free_name(gm, base + "_t")
        gm.register_buffer(t_name, w_q.t().contiguous())
        scale = w_scale.reshape(-1).to(torch.float32).expand(n).contiguous()
        with g.inserting_before(node):
            w_t = g.get_attr(t_name)
            if w_scale.dtype == torch.float32 and tuple(w_scale.shape) == (n,):
                s_node = m["w_scale"]
            else:
                s_name = _free_name(gm, base + "_scale_n")
                gm.register_buffer(s_name, scale)
                s_node = g.get_attr(s_name)
            new = g.call_function(qops.int8_dynamic_linear.default, (m["x"], w_t, s_node, m["bias"]))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "nn_module_stack", "stack_trace")})
        for n_ in (w_t, new):
            n_.meta[FROM_PASS] = TorchCPULowering.name
        node.replace_all_uses_with(new)
        g.erase_node(node)
        return new


class TorchCPULowering(LoweringPass):
    name = "lower_torch_cpu"

    def call(self, gm: fx.GraphModule) -> PassResult:
        for rule in self.rules:
            rule._gm = gm     # the int8 GEMM patterns read constants while matching their epilogue
        return super().call(gm)


class TorchCPUBackend:
    name = "torch"

    def __init__(self, rules: list[LoweringRule] | None = None, weight_only_dtype: torch.dtype = torch.bfloat16):
        from .rules import default_rules

        self.rules = list(rules) if rules is not None else default_rules(weight_only_dtype)

    def lower(self, quantized: fx.GraphModule, *, dump_dir=None) -> fx.GraphModule:
        state = quantized.meta.get(STATE)
        if state is not None and state.stage != "quantized":
            raise QCompileError(f"lower() takes the module qc.convert returned (this one is '{state.stage}')")
        gm = copy.deepcopy(quantized)
        if state is not None:
            gm.meta[STATE] = new_state = copy.deepcopy(state)
        p = TorchCPULowering(self.rules)
        pm = PassManager([p], dump_dir=dump_dir, stage="lower")
        pm(gm)
        gm.meta[REPORT] = p.report
        if state is not None:
            new_state.records.extend(pm.records)
            new_state.stage = "lowered"
        return gm

    def report(self, gm: fx.GraphModule) -> LoweringReport:
        return lowering_report(gm)


def lower(quantized: fx.GraphModule, *, weight_only_dtype: torch.dtype = torch.bfloat16, dump_dir=None) -> fx.GraphModule:
    """A new GraphModule with the matched QDQ patterns on PyTorch's CPU integer kernels (rules.py and
    DynamicInt8Linear); the rest stays QDQ. `weight_only_dtype`: the activation dtype the weight-only
    kernels compute in (weight_only.py)."""
    return TorchCPUBackend(weight_only_dtype=weight_only_dtype).lower(quantized, dump_dir=dump_dir)


def lowering_report(gm: fx.GraphModule) -> LoweringReport:
    report = gm.meta.get(REPORT)
    if report is None:
        raise QCompileError("this module was not produced by qcompile.backends.torch_cpu.lower()")
    return report
