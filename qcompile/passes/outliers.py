"""Outlier split (LLM.int8() style): the few input channels with large activations stay float.

For a linear whose quantized input X has channels with calibration max|X_c| > `threshold`
(default 6.0, the LLM.int8() value), the linear becomes

    linear(X * m, W * m, b)   +   linear(X[..., outliers], W[:, outliers])       m_c = 0 for outliers, else 1
    ^ the original node: annotation,    ^ a new float linear, no annotation
      observer and weight quantization    (stays FP32 through convert)
      as before; the outlier channels
      are zeros there

which is the same function in float (up to float32 summation order). Both paths are visible in
the graph: an `aten.mul` by the 0/1 mask and an `aten.index_select` of the outlier channels on
the input, the float `aten.linear` and an `aten.add`. The activation observer (static recipes) or
the per-token quantization (dynamic recipes) then sees the inlier channels (and zeros) only, so
one outlier channel no longer stretches the step of all others; the zeros quantize to the zero
point and add nothing to the integer product. Masking instead of selecting the inliers keeps K
(384 rather than 381 for MiniLM): the integer kernels want it aligned.
Linears that read the same tensor (q/k/v) share the index selections: the outlier channels are a
property of the tensor.

Options: `threshold` (6.0), `modules` (fnmatch patterns of linear module names; default all),
`select` ("all", default, or "attention": only the linears whose outputs are operands of an
activation x activation matmul, i.e. attention's q/k/v, found in the graph, not by name).
A group of linears reading one tensor (q/k/v) is split when any of them matches: the outlier
channels belong to the tensor. Patterns that match no quantized linear raise a RecipeError;
`select="attention"` on a model without attention splits nothing (the `ort-cpu` target profile
uses it on every model).

Why "attention": on all-MiniLM-L6-v2 the q/k/v input is the tensor whose quantization costs most
(keeping q/k/v float alone: mean cosine 0.99825; their logits go through softmax's exponential),
though the FFN input has larger outliers (28 vs 10); splitting only there keeps most of the
accuracy of splitting every linear for a third of the float paths' cost in onnxruntime.

Report (`state.algorithm_reports["outlier_split"]`), per linear: the threshold, the outlier
channel indices and their calibration max|X|, and the largest inlier max|X|.
"""
from __future__ import annotations

import fnmatch
from typing import Sequence

import torch
from torch import fx

from ..errors import RecipeError
from ..graph import FROM_PASS, LINEAR, MATMUL, RESHAPE, STATE, get_param, is_op, module_name, reaches, set_param
from .algorithm import AlgorithmPass
from .smoothquant import channel_absmax, is_observer_call, layer_names, linear_groups

aten = torch.ops.aten
SELECTIONS = ("all", "attention")
# What lies between a q/k/v projection and the attention matmul: head split (view/transpose),
# K's transpose, the 1/sqrt(d) scaling, eval dropout.
_TO_ATTENTION = RESHAPE | {aten.mul.Tensor, aten.div.Tensor, aten.clone.default}


def feeds_attention(linear: fx.Node) -> bool:
    """Whether the linear's output reaches, through reshapes and scalings, a matmul whose two
    operands are both activations (attention's QK^T and PV), as q, k or v do. Observer calls
    (a quantized attention's operands are observed on the matmul's input edges) pass through."""
    return reaches(linear, lambda u: is_op(u, _TO_ATTENTION) or is_observer_call(u),
                   lambda user, _: is_op(user, MATMUL) and all(
        isinstance(a, fx.Node) and a.op != "get_attr" for a in user.args[:2]))


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

    def __init__(self, threshold: float = 6.0, modules: Sequence[str] | None = None, select: str = "all"):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise RecipeError(f"outlier_split threshold must be a positive number (a magnitude of the layer "
                              f"input; LLM.int8() uses 6.0), got {threshold!r}")
        if isinstance(modules, str) or (modules is not None and not all(isinstance(p, str) for p in modules)):
            raise RecipeError(f"outlier_split modules must be a list of module-name patterns (fnmatch, e.g. "
                              f"['*.attention.self.*']), got {modules!r}")
        if select not in SELECTIONS:
            raise RecipeError(f"outlier_split select must be one of {SELECTIONS} (\"attention\": only the linears "
                              f"that produce attention's q/k/v), got {select!r}")
        super().__init__(threshold=threshold, modules=None if modules is None else tuple(modules), select=select)
        self.threshold = float(threshold)
        self.modules = None if modules is None else tuple(modules)
        self.select = select

    def _select(self, groups, skipped: dict) -> list:
        """The groups with a linear whose module name matches `modules` (all, without it) and, with
        select="attention", that produces an attention operand. The split belongs to the input
        tensor, so q/k/v go together when one of them matches."""
        if self.select == "attention":
            chosen = [g for g in groups if any(feeds_attention(lin) for lin in g.linears)]
            for g in groups:
                if g not in chosen:
                    skipped.update({lin.name: "select='attention': its output is not an attention operand"
                                    for lin in g.linears})
            groups = chosen
        if self.modules is None:
            return groups
        wanted = lambda lin: any(fnmatch.fnmatchcase(module_name(lin), p) for p in self.modules)  # noqa: E731
        chosen = [g for g in groups if any(wanted(lin) for lin in g.linears)]
        if not chosen:
            examples = [module_name(lin) for g in groups for lin in g.linears][:3]
            raise RecipeError(f"outlier_split modules={list(self.modules)} match no quantized linear; "
                              f"module names look like {examples}")
        for g in groups:
            if g not in chosen:
                skipped.update({lin.name: "not matched by modules=" + str(list(self.modules)) for lin in g.linears})
        return chosen

    def run(self, gm: fx.GraphModule, batches) -> dict:
        state = gm.meta[STATE]
        groups, skipped = linear_groups(gm)
        for g in groups:
            fixed = [lin for lin in g.linears if lin.args[1].target in state.weight_qparams]
            if fixed:
                skipped.update({lin.name: "its weight qparams were fixed by an earlier algorithm; "
                                          "list outlier_split before it" for lin in g.linears})
        groups = self._select([g for g in groups if not any(lin.name in skipped for lin in g.linears)], skipped)
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
            # The quantized path keeps all K channels with the outliers multiplied by 0: a zero
            # quantizes to the zero point and adds exactly nothing to the integer accumulator, so
            # its codes are those of the inlier channels alone, while K stays the layer's own
            # (aligned for the integer kernels: an index_select to K - n would not be).
            mask_attr, idx_attr = f"qc_split{index}_inlier_mask", f"qc_split{index}_outliers"
            mask = torch.ones(val.shape[-1], dtype=val.dtype)
            mask[outliers] = 0
            gm.register_buffer(mask_attr, mask)
            gm.register_buffer(idx_attr, outliers.to(torch.int64))
            mask_node, idx_node = graph.get_attr(mask_attr), graph.get_attr(idx_attr)
            masked = graph.call_function(aten.mul.Tensor, (g.source, mask_node))
            masked.meta["val"] = val
            selected = graph.call_function(aten.index_select.default, (g.source, dim, idx_node))
            selected.meta["val"] = _fake(val, len(outliers))
            created += [mask_node, idx_node, masked, selected]
        if g.observer is not None:
            g.observer.args = (masked,) + tuple(g.observer.args[1:])
        for j, lin in enumerate(g.linears):
            if g.observer is None:
                lin.args = (masked,) + tuple(lin.args[1:])
            w_node = lin.args[1]
            w = get_param(gm, w_node).detach()
            inlier_w = w.clone()
            inlier_w[:, outliers] = 0
            set_param(gm, w_node, inlier_w)
            attr = f"qc_split{index}_{j}_outlier_weight"
            gm.register_buffer(attr, w[:, outliers].contiguous())
            with graph.inserting_before(lin):
                wo = graph.get_attr(attr)
                float_path = graph.call_function(aten.linear.default, (selected, wo))
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
