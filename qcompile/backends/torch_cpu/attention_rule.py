"""Lowering rule: the quantized attention of the reference graph -> qcompile::int8_attention.

    dq(q_Q) , dq(q_Kt)  -> matmul -> [* c] [+ mask] -> softmax -> q(P) -> dq -> matmul(., dq(q_V))
        -> [transpose(1, 2)] [contiguous] [reshape] -> quantize(o_scale, o_zp)      (the next linear's input)
  ==> int8_attention(q_Q, transpose(q_Kt), q_V, mask, ..., o_scale, o_zp) -> transpose / reshape of codes

The rule anchors on the P x V matmul and takes the whole pattern, the requantization of its output
included, so the compiled module goes from the codes of Q, K, V to the codes the output projection
reads without a float tensor in between. It applies where the kernel that makes it fast exists
(torchao's INT8 SDPA template, under torch.compile on a CPU with AMX: attention.py) and the
instance fits it (per-tensor uint8 qparams, a requantized output); otherwise the pattern stays QDQ,
which inductor compiles into float attention, and the lowering report says why. An attention that
annotate_attention left float (custom score or mask arithmetic, ...) is reported with its reason.
"""
from __future__ import annotations

import torch
from torch import fx

from ...graph import get_param, is_op
from ...graph.attention import match_attention
from ...passes.annotate_attention import ATTENTION_SKIPPED
from ..int8_gemm_pattern import const, copy_meta, val
from ..lowering_base import LoweringRule
from . import attention as kernel

qops = torch.ops.qcompile
aten = torch.ops.aten
PASS_NAME = "lower_torch_cpu"
# Between the P x V matmul and the next linear's input quantize: the heads merged back into features.
OUTPUT_VIEWS = {aten.transpose.int, aten.permute.default, aten.contiguous.default, aten.clone.default,
                aten.reshape.default, aten.view.default, aten._unsafe_view.default}


def _qparams(gm, node: fx.Node) -> tuple[float, int] | None:
    """(scale, zero point) of a quantize/dequantize with per-tensor constant qparams, else None."""
    s, z = const(gm, node.args[1]), const(gm, node.args[2])
    if s is None or z is None or s.numel() != 1 or z.numel() != 1:
        return None
    return float(s), int(z)


class Int8Attention(LoweringRule):
    anchors = {aten.matmul.default}
    kernel = "qcompile.int8_attention (torchao INT8 SDPA template under torch.compile)"

    def match(self, node):
        if ATTENTION_SKIPPED in node.meta:
            return {"why": f"attention left float at annotation: {node.meta[ATTENTION_SKIPPED]}"}
        m = match_attention(node, constants=lambda n: get_param(self._gm, n), through_qdq=True)
        if m is None:
            return None
        if m.reason is not None:
            return {"why": m.reason}
        dqs = {"q": m.query, "kt": m.key_t, "p": m.probs, "v": m.value}
        quantized = [is_op(n, {qops.dequantize.default}) and is_op(n.args[0], {qops.quantize.default})
                     for n in dqs.values()]
        if not any(quantized):
            return None   # float attention by the recipe's choice: nothing to lower, nothing to report
        if not all(quantized):
            return {"why": "only some attention operands are quantized (the fused kernel takes all four)"}
        return dict(node=node, attn=m, dq=dqs)

    def check(self, gm, m):
        why = kernel.fused_kernel_available()
        if why:
            return f"{why}; the pattern stays QDQ (inductor compiles it as float attention)"
        attn, dq = m["attn"], m["dq"]
        qp = {}
        for name, d in dq.items():
            q_node = d.args[0]
            pair = _qparams(gm, d)
            if pair is None or _qparams(gm, q_node) != pair:
                return f"{name} is not quantized per tensor with constant qparams (the fused kernel's scales are per tensor)"
            if d.args[5] != torch.float32:
                return f"{name} dequantizes to {d.args[5]}, not float32"
            qp[name] = (*pair, q_node.args[5], q_node.args[6], q_node.args[7])
            v = val(d)
            if not (isinstance(v, torch.Tensor) and v.dim() == 4):
                return f"{name} is not a rank-4 [batch, heads, seq, dim] tensor"
        if len(dq["p"].users) != 1 or len(dq["p"].args[0].users) != 1:
            return "the quantized probabilities are read outside the P x V matmul"
        tail = self._tail(gm, attn.pv)
        if tail is None:
            return ("the attention output is not requantized per tensor (through head-merging views) for the next "
                    "integer op; the fused kernel writes codes only")
        m["tail"], m["qp"] = tail, qp
        return kernel.template_fits(*(qp[n][4] for n in ("q", "kt", "v")), tail[-1].args[7], qp["p"][1],
                                    qp["p"][2], qp["p"][3], tail[-1].args[5], tail[-1].args[6])

    @staticmethod
    def _tail(gm, pv: fx.Node) -> list | None:
        """[views ..., quantize]: the single-user chain from the P x V output to its requantization."""
        chain, node = [], pv
        while len(node.users) == 1:
            user = next(iter(node.users))
            if is_op(user, {qops.quantize.default}) and user.args[0] is node:
                if _qparams(gm, user) is None:
                    return None
                return chain + [user]
            if not (is_op(user, OUTPUT_VIEWS) and user.args[0] is node):
                return None
            chain.append(user)
            node = user
        return None

    def rewrite(self, gm, m):
        g, attn, dq, qp, tail = gm.graph, m["attn"], m["dq"], m["qp"], m["tail"]
        codes = {name: d.args[0] for name, d in dq.items()}
        out_q = tail[-1]
        o_scale, o_zp = _qparams(gm, out_q)
        with g.inserting_before(attn.pv):
            k_codes = g.call_function(aten.transpose.int, (codes["kt"], -2, -1))
            mask = None
            for mk in attn.masks:
                mask = mk if mask is None else g.call_function(aten.add.Tensor, (mask, mk))
            p_s, p_z, p_qmin, p_qmax, _ = qp["p"]
            new = g.call_function(qops.int8_attention.default, (
                codes["q"], k_codes, codes["v"], mask, qp["q"][0], qp["q"][1], qp["kt"][0], qp["kt"][1],
                qp["v"][0], qp["v"][1], float(attn.scale), p_s, p_z, p_qmin, p_qmax, o_scale, o_zp,
                out_q.args[7], out_q.args[5], out_q.args[6]))
        copy_meta(attn.pv, new, PASS_NAME)
        pv_val = val(attn.pv)
        if isinstance(pv_val, torch.Tensor):
            new.meta["val"] = pv_val.to(out_q.args[7])
        # the head-merging views, replayed on the codes
        last = new
        for view in tail[:-1]:
            with g.inserting_before(view):
                last_new = g.call_function(view.target, (last, *view.args[1:]), dict(view.kwargs))
            copy_meta(view, last_new, PASS_NAME)
            if isinstance(val(view), torch.Tensor):
                last_new.meta["val"] = val(view).to(out_q.args[7])
            last = last_new
        out_q.replace_all_uses_with(last)
        for n in reversed(tail):
            g.erase_node(n)
        g.erase_node(attn.pv)   # its one reader was the tail; the rest of the pattern is dead code now
        return new
