"""AWQ pass: per group of linears sharing an input, scale input channels and clip weight ranges.

The calibration batches run once, recording for every group's input its per-channel mean |x|
and a seeded sample of rows (memory: `n_samples` rows per group). Groups are processed in
reverse graph order so that a producer linear can absorb a consumer group's 1/s into its rows
before its own weights are searched. For each group, `algorithms.awq` picks s and the clipping;
the weights become W * s (stored in float, their qparams fixed in `state.weight_qparams`, so
`convert` produces exactly the searched codes) and the input is divided by s:

- folded into the producer when it is a LayerNorm with affine parameters, or a linear, whose
  output feeds only this group (weight and bias divided by s);
- otherwise through an explicit `aten.mul` by a constant 1/s inserted before the group (before
  its observer, when the observer serves only this group, so activations are observed scaled).

The float output is unchanged up to float rounding (X W^T = (X / s)(W s)^T).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import fx

from ..algorithms.awq import fake_quantize, search_clip, search_scales
from ..distributed import reduce_count, reduce_sum, sample_rows
from ..errors import RecipeError
from ..graph import FROM_PASS, LINEAR, STATE, get_param, is_op, set_param
from ..graph.recorder import record_inputs
from .algorithm import AlgorithmPass
from .gptq import AUTO, TokenRows, check_token_mask, weighted_linear_groups
from .insert_observers import OBSERVER_PREFIX

aten = torch.ops.aten


def _is_observer(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and str(node.target).startswith(OBSERVER_PREFIX)


class AWQ(AlgorithmPass):
    """Options: n_grid (alpha grid points in [0, 1), default 20), clip (search weight clipping,
    default True), clip_grid (default 10), max_shrink (default 0.5), n_samples (rows kept per
    group for the searches, default 512), seed (row sampling, default 0), token_mask (name or
    position of a [batch, seq] 0/1 input, e.g. "attention_mask": the statistics and the sample rows
    leave out padded positions; default "auto": the input the graph applies to the attention
    scores, if there is one; None: every row; see `gptq.TokenRows`)."""

    name = "awq"

    def __init__(self, n_grid: int = 20, clip: bool = True, clip_grid: int = 10, max_shrink: float = 0.5,
                 n_samples: int = 512, seed: int = 0, token_mask: str | int | None = AUTO):
        if int(n_grid) < 1 or int(clip_grid) < 1 or int(n_samples) < 1:
            raise RecipeError(f"awq n_grid, clip_grid and n_samples must be positive, got {n_grid}, {clip_grid}, {n_samples}")
        if not 0.0 <= float(max_shrink) < 1.0:
            raise RecipeError(f"awq max_shrink is the largest fraction of a weight range clipped away, in [0, 1); "
                              f"got {max_shrink}")
        check_token_mask("awq", token_mask)
        super().__init__(n_grid=int(n_grid), clip=bool(clip), clip_grid=int(clip_grid),
                         max_shrink=float(max_shrink), n_samples=int(n_samples), seed=int(seed),
                         token_mask=token_mask)

    def run(self, gm: fx.GraphModule, batches: Sequence) -> dict:
        state = gm.meta[STATE]
        o = self.options
        groups, skipped = weighted_linear_groups(gm)
        if not groups:
            state.algorithm_reports["awq"] = {}
            return {"groups": 0, "skipped": len(skipped)}
        firsts = [g[0][0] for g in groups]
        stats = {n.name: {"abs": None, "rows": 0, "sample": []} for n in firsts}
        per_batch = math.ceil(o["n_samples"] / max(len(batches), 1))
        gen = torch.Generator().manual_seed(o["seed"])
        tokens = TokenRows(gm, o["token_mask"], "awq")

        def collect(key, x):
            x = tokens.rows(key, x).float()
            st = stats[key]
            a = x.abs().sum(0, dtype=torch.float64)
            st["abs"] = a if st["abs"] is None else st["abs"] + a
            st["rows"] += x.shape[0]
            st["sample"].append(sample_rows(x, per_batch, gen).clone())

        record_inputs(gm, firsts, tokens.batches(batches), collect, stop_early=True)
        for st in stats.values():  # sums over the ranks' shards, under torch.distributed
            st["abs"], st["rows"] = reduce_sum(st["abs"]), reduce_count(st["rows"])
        if not stats[firsts[0].name]["rows"]:
            raise RecipeError("awq: the calibration batches hold no real token (token_mask is 0 everywhere)")

        report, inserted, folded = {}, 0, 0
        for gi in reversed(range(len(groups))):
            group = groups[gi]
            st = stats[group[0][0].name]
            x = torch.cat(st["sample"])[: o["n_samples"]]
            absmean = (st["abs"] / st["rows"]).float()
            weights = [get_param(gm, w).detach().float() for _, w, _ in group]
            spec = group[0][2]
            s, alpha, errors = search_scales(weights, x, absmean, spec, o["n_grid"])
            scaled = alpha > 0
            xs = x / s
            rtn_err, awq_err = errors[0.0], 0.0
            for (node, w_node, spec), w in zip(group, weights):
                ws = w * s if scaled else w
                qparams = search_clip(ws, xs, spec, o["clip_grid"], o["max_shrink"]) if o["clip"] else None
                if qparams is None:
                    from ..observers import weight_qparams
                    qparams = weight_qparams(ws, spec)
                set_param(gm, w_node, ws.to(get_param(gm, w_node).dtype))
                state.weight_qparams[w_node.target] = qparams
                ref = x.double() @ w.double().T
                awq_err += float((xs.double() @ fake_quantize(ws, spec, qparams).double().T - ref).pow(2).sum())
            where = "none"
            if scaled:
                where = self._divide_input(gm, group, s, gi)
                inserted += where == "mul"
                folded += where != "mul"
            ref_energy = sum(float((x.double() @ w.double().T).pow(2).sum()) for w in weights)
            for node, w_node, _ in group:
                report[w_node.target] = dict(node=node.name, alpha=alpha, input_divided_in=where,
                                             rtn_error=rtn_err / ref_energy, awq_error=awq_err / ref_energy)
        state.algorithm_reports["awq"] = report
        if skipped:
            state.algorithm_reports["awq_skipped"] = skipped
        state.algorithm_reports["awq_token_mask"] = tokens.found
        if tokens.not_applied:
            state.algorithm_reports["awq_token_mask_not_applied"] = sorted(tokens.not_applied)
        return {"groups": len(groups), "muls inserted": inserted, "folded": folded, "skipped": len(skipped)}

    def _divide_input(self, gm: fx.GraphModule, group, s: torch.Tensor, gi: int) -> str:
        """Divide the group's input by s; returns where: 'layer_norm', 'linear' or 'mul'."""
        linears = {node for node, _, _ in group}
        x = group[0][0].args[0]
        src, allowed = x, set(linears)
        if _is_observer(x) and set(x.users) <= linears:
            src, allowed = x.args[0], {x}  # scale before the observer: it must see the scaled input
        if isinstance(src, fx.Node) and set(src.users) <= allowed:
            if is_op(src, {aten.layer_norm.default}) and len(src.args) >= 4 and all(
                    isinstance(a, fx.Node) and a.op == "get_attr" and len(a.users) == 1 for a in src.args[2:4]):
                for a in src.args[2:4]:
                    set_param(gm, a, get_param(gm, a).detach() / s)
                return "layer_norm"
            if is_op(src, LINEAR) and isinstance(src.args[1], fx.Node) and src.args[1].op == "get_attr" \
                    and len(src.args[1].users) == 1 and src.args[1].target not in gm.meta[STATE].weight_qparams:
                w_node = src.args[1]
                set_param(gm, w_node, get_param(gm, w_node).detach() / s.unsqueeze(1))
                bias = src.args[2] if len(src.args) > 2 else None
                if isinstance(bias, fx.Node) and bias.op == "get_attr" and len(bias.users) == 1:
                    set_param(gm, bias, get_param(gm, bias).detach() / s)
                    return "linear"
                if bias is None:
                    return "linear"
                set_param(gm, w_node, get_param(gm, w_node).detach() * s.unsqueeze(1))  # undo: bias not ours
        name = f"qc_awq_inv_scale_{gi}"
        gm.register_buffer(name, (1.0 / s).detach().clone())
        with gm.graph.inserting_before(group[0][0] if src is x else x):
            const = gm.graph.get_attr(name)
            mul = gm.graph.call_function(aten.mul.Tensor, (src, const))
        for n in (const, mul):
            n.meta[FROM_PASS] = self.name
        if isinstance(src.meta.get("val"), torch.Tensor):
            mul.meta["val"] = src.meta["val"]
        if "nn_module_stack" in group[0][0].meta:
            mul.meta["nn_module_stack"] = group[0][0].meta["nn_module_stack"]
        for user in list(allowed):
            user.replace_input_with(src, mul)
        gm.recompile()
        return "mul"
