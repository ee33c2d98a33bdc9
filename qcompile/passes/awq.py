"""AWQ pass: per group of linears sharing an input, scale input channels and clip weight ranges.

The calibration batches run once, recording for every group's input its per-channel mean |x|
and a seeded sample of rows (memory: `n_samples` rows per group). Groups are processed in
reverse graph order so that a producer linear can absorb a consumer group's 1/s into its rows
before its own weights are searched. For each group, `algorithms.awq` picks s and the clipping;
the weights become W * s (stored in float, their qparams fixed in `state.weight_qparams`, so
`convert` produces exactly the searched codes) and the input is divided by s:

- folded into the producer when its output feeds only this group: a LayerNorm with affine
  parameters, an RMSNorm's weight (`weight * x`, a 1-D parameter: LLaMA's norms), a linear (weight
  rows and bias), or a product `a * linear(...)` whose linear feeds only that product (LLaMA's
  `silu(gate) * up` before down_proj: up_proj's rows);
- otherwise through an explicit `aten.mul` by a constant 1/s inserted before the group (before
  its observer, when the observer serves only this group, so activations are observed scaled);
  with `fold_only` such a group is not scaled at all (its clipping is still searched), for
  formats that have no place for the multiply (GGUF: llama.cpp's graph is fixed).

A weight that another op also reads (an embedding table tied to the LM head) is left alone: W * s
would change what that op reads.

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
    scores, if there is one; None: every row; see `gptq.TokenRows`), fold_only (default False: a
    group whose 1/s no producer can absorb gets an explicit multiply; True: it is not scaled)."""

    name = "awq"

    def __init__(self, n_grid: int = 20, clip: bool = True, clip_grid: int = 10, max_shrink: float = 0.5,
                 n_samples: int = 512, seed: int = 0, token_mask: str | int | None = AUTO, fold_only: bool = False):
        if int(n_grid) < 1 or int(clip_grid) < 1 or int(n_samples) < 1:
            raise RecipeError(f"awq n_grid, clip_grid and n_samples must be positive, got {n_grid}, {clip_grid}, {n_samples}")
        if not 0.0 <= float(max_shrink) < 1.0:
            raise RecipeError(f"awq max_shrink is the largest fraction of a weight range clipped away, in [0, 1); "
                              f"got {max_shrink}")
        check_token_mask("awq", token_mask)
        if not isinstance(fold_only, bool):
            raise RecipeError(f"awq fold_only must be True or False, got {fold_only!r}")
        super().__init__(n_grid=int(n_grid), clip=bool(clip), clip_grid=int(clip_grid),
                         max_shrink=float(max_shrink), n_samples=int(n_samples), seed=int(seed),
                         token_mask=token_mask, fold_only=fold_only)

    def run(self, gm: fx.GraphModule, batches: Sequence) -> dict:
        state = gm.meta[STATE]
        o = self.options
        groups, skipped = weighted_linear_groups(gm, exclusive_weights=True)
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
            fold = self._fold(gm, group) if scaled else None
            if scaled and fold is None and o["fold_only"]:
                scaled, alpha, s = False, 0.0, torch.ones_like(s)
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
            if scaled and fold is not None:
                where = fold(s)
                folded += 1
            elif scaled:
                where = self._insert_mul(gm, group, s, gi)
                inserted += 1
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

    @staticmethod
    def _input_source(group):
        """(the node whose output the group reads, the users it may have): the input, or the node before
        the input's observer when that observer serves only this group (it must see the scaled input)."""
        linears = {node for node, _, _ in group}
        x = group[0][0].args[0]
        if _is_observer(x) and set(x.users) <= linears:
            return x.args[0], {x}
        return x, linears

    def _fold(self, gm: fx.GraphModule, group):
        """A function dividing the group's input by s inside its producer (returning where), or None
        when no producer can absorb it (see the module doc)."""
        src, allowed = self._input_source(group)
        if not isinstance(src, fx.Node) or not set(src.users) <= allowed:
            return None
        fixed = gm.meta[STATE].weight_qparams

        def own(a) -> bool:
            return isinstance(a, fx.Node) and a.op == "get_attr" and len(a.users) == 1

        if is_op(src, {aten.layer_norm.default}) and len(src.args) >= 4 and all(own(a) for a in src.args[2:4]):
            def fold_layer_norm(s):
                for a in src.args[2:4]:
                    set_param(gm, a, get_param(gm, a).detach() / s)
                return "layer_norm"
            return fold_layer_norm
        if is_op(src, {aten.mul.Tensor}):
            for i, a in enumerate(src.args[:2]):
                k = get_param(gm, group[0][1]).shape[1]
                if own(a) and tuple(get_param(gm, a).shape) == (k,):  # RMSNorm: weight * normalized x
                    def fold_norm_weight(s, a=a):
                        set_param(gm, a, get_param(gm, a).detach() / s)
                        return "rms_norm"
                    return fold_norm_weight
            for a in src.args[:2]:                                  # a * linear(...): the linear's rows
                if isinstance(a, fx.Node) and len(a.users) == 1 and self._linear_rows(gm, a, fixed) is not None:
                    return self._linear_rows(gm, a, fixed)
        return self._linear_rows(gm, src, fixed)

    @staticmethod
    def _linear_rows(gm: fx.GraphModule, lin, fixed):
        """Folding 1/s into the output rows (and bias) of a linear that owns its weight and bias and has
        not had its own qparams fixed yet; None otherwise."""
        if not (is_op(lin, LINEAR) and isinstance(lin.args[1], fx.Node) and lin.args[1].op == "get_attr"
                and len(lin.args[1].users) == 1 and lin.args[1].target not in fixed):
            return None
        bias = lin.args[2] if len(lin.args) > 2 else None
        if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr" and len(bias.users) == 1):
            return None

        def fold_linear(s):
            set_param(gm, lin.args[1], get_param(gm, lin.args[1]).detach() / s.unsqueeze(1))
            if bias is not None:
                set_param(gm, bias, get_param(gm, bias).detach() / s)
            return "linear"
        return fold_linear

    def _insert_mul(self, gm: fx.GraphModule, group, s: torch.Tensor, gi: int) -> str:
        """Divide the group's input by s with an explicit multiply by the constant 1/s."""
        src, allowed = self._input_source(group)
        x = group[0][0].args[0]
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
