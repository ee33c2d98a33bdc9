"""Outlier split (LLM.int8() style): the few input channels with large activations stay float.

For a linear whose quantized input X has channels with calibration max|X_c| > `threshold`
(default 6.0, the LLM.int8() value), the linear becomes

    linear(X[..., inliers], W[:, inliers], b)   +   linear(X[..., outliers], W[:, outliers])
    ^ the original node: annotation, observer       ^ a new float linear, no annotation
      and weight quantization as before, now on        (stays FP32 through convert)
      the inlier channels only

which is the same function in float (up to float32 summation order). Both paths are visible in
the graph: two `aten.index_select` on the input, the float `aten.linear` and an `aten.add`.
The activation observer (static recipes) or the per-token quantization (dynamic recipes) then
sees the inlier channels only, so one outlier channel no longer stretches the step of all others.
Linears that read the same tensor (q/k/v) share the index selections: the outlier channels are a
property of the tensor.

Report (`state.algorithm_reports["outlier_split"]`), per linear: the threshold, the outlier
channel indices and their calibration max|X|, and the largest inlier max|X|.
"""
from __future__ import annotations

import torch
from torch import fx

from ..errors import RecipeError
from ..graph import FROM_PASS, LINEAR, STATE, get_param, is_op, set_param
from .algorithm import AlgorithmPass
from .smoothquant import channel_absmax, layer_names, linear_groups

aten = torch.ops.aten


def _fake(val: torch.Tensor, last_dim: int) -> torch.Tensor:
    """A tensor like `val` (same fake mode) with its last dim resized, for a new node's meta['val']."""
    shape = tuple(val.shape[:-1]) + (last_dim,)
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return torch.empty(shape, dtype=val.dtype, device="meta")
    with mode:
        return torch.empty(shape, dtype=val.dtype, device=val.device)


class OutlierSplit(AlgorithmPass):
    name = "outlier_split"

    def __init__(self, threshold: float = 6.0):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise RecipeError(f"outlier_split threshold must be a positive number (a magnitude of the layer "
                              f"input; LLM.int8() uses 6.0), got {threshold!r}")
        super().__init__(threshold=threshold)
        self.threshold = float(threshold)

    def run(self, gm: fx.GraphModule, batches) -> dict:
        state = gm.meta[STATE]
        groups, skipped = linear_groups(gm)
        for g in groups:
            fixed = [lin for lin in g.linears if lin.args[1].target in state.weight_qparams]
            if fixed:
                skipped.update({lin.name: "its weight qparams were fixed by an earlier algorithm; "
                                          "list outlier_split before it" for lin in g.linears})
        groups = [g for g in groups if not any(lin.name in skipped for lin in g.linears)]
        names = layer_names(n for n in gm.graph.nodes if is_op(n, LINEAR))
        amax = channel_absmax(gm, groups, batches)
        report: dict[str, dict] = {}
        split = channels = 0
        for i, g in enumerate(groups):
            x_max = amax[g.linears[0].name]
            is_out = x_max > self.threshold
            outliers = is_out.nonzero().flatten()
            inliers = (~is_out).nonzero().flatten()
            entry = dict(threshold=self.threshold, outlier_channels=outliers.tolist(),
                         outlier_absmax=[round(float(v), 4) for v in x_max[outliers]],
                         inlier_absmax=float(x_max[inliers].max()) if len(inliers) else 0.0,
                         channels=g.channels, group=[names[n.name] for n in g.linears])
            if len(inliers) == 0:
                entry["skipped"] = "every input channel is an outlier; the layer would have nothing to quantize"
            elif len(outliers):
                self._split(gm, g, inliers, outliers, i)
                split += len(g.linears)
                channels += len(outliers)
            for lin in g.linears:
                report[names[lin.name]] = entry
        for node_name, why in skipped.items():
            report[names[node_name]] = {"skipped": why}
        state.algorithm_reports[self.name] = report
        return {"split linears": split, "outlier channels": channels, "skipped": len(skipped)}

    def _split(self, gm: fx.GraphModule, g, inliers: torch.Tensor, outliers: torch.Tensor, index: int) -> None:
        graph = gm.graph
        val = g.source.meta["val"]
        dim = val.dim() - 1
        first = g.observer if g.observer is not None else g.linears[0]
        created = []
        with graph.inserting_before(first):
            selected = {}
            for kind, idx in (("inliers", inliers), ("outliers", outliers)):
                attr = f"qc_split{index}_{kind}"
                gm.register_buffer(attr, idx.to(torch.int64))
                c = graph.get_attr(attr)
                sel = graph.call_function(aten.index_select.default, (g.source, dim, c))
                sel.meta["val"] = _fake(val, len(idx))
                created += [c, sel]
                selected[kind] = sel
        if g.observer is not None:
            g.observer.args = (selected["inliers"],) + tuple(g.observer.args[1:])
            g.observer.meta["val"] = selected["inliers"].meta["val"]
        for j, lin in enumerate(g.linears):
            if g.observer is None:
                lin.args = (selected["inliers"],) + tuple(lin.args[1:])
            w_node = lin.args[1]
            w = get_param(gm, w_node).detach()
            set_param(gm, w_node, w[:, inliers].contiguous())
            if isinstance(w_node.meta.get("val"), torch.Tensor):
                w_node.meta["val"] = _fake(w_node.meta["val"], len(inliers))
            attr = f"qc_split{index}_{j}_outlier_weight"
            gm.register_buffer(attr, w[:, outliers].contiguous())
            with graph.inserting_before(lin):
                wo = graph.get_attr(attr)
                float_path = graph.call_function(aten.linear.default, (selected["outliers"], wo))
            with graph.inserting_after(lin):
                add = graph.call_function(aten.add.Tensor, (lin, float_path))
            lin.replace_all_uses_with(add, delete_user_cb=lambda user: user is not add)
            float_path.meta["val"] = add.meta["val"] = lin.meta.get("val")
            created += [wo, float_path, add]
            if "nn_module_stack" in lin.meta:
                for n in (float_path, add):
                    n.meta["nn_module_stack"] = lin.meta["nn_module_stack"]
        for n in created:
            n.meta[FROM_PASS] = self.name
