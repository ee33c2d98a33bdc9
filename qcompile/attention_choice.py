"""Whether to quantize attention, decided per model from its measured accuracy cost.

A target (`ort-cpu`, a CPU target) asks for quantized attention with an `AttentionSpec` whose
`max_cost` is set; `qc.calibrate` then calls `attention_choice` on the calibration batches once the
observers have seen them, and `apply_attention_choice` keeps attention quantized or returns it to
float before `convert`. Both are plain functions a target or a user can call too:

    choice = attention_choice(prepared, batches, max_cost=0.001)
    print(choice)        # quantize attention: yes/no, cosine to float with and without, the cost
    apply_attention_choice(prepared, choice)

The cost is measured on the whole model, where it matters: the reference QDQ graph with every
annotated tensor quantized and the same graph with the attention operands left float (Q, K, V and
P observers bypassed) are run on the first `n_batches` batches next to the float graph (every
observer bypassed; what the algorithm passes changed is float-exact); the cost is the drop in the
mean (over output rows) cosine similarity to the float outputs. The decision is kept in
`QState.attention["choice"]` and printed by `qc.inspect`.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import fx

from .capture import normalize_inputs
from .graph import ANNOTATION, STATE
from .passes.annotate_attention import ATTENTION_SKIPPED
from .passes.insert_observers import OBSERVER_PREFIX

ATTENTION_REASONS = ("attention Q x K^T", "attention P x V")


@dataclass
class AttentionChoice:
    quantize: bool
    cost: float                  # mean cosine to float: attention float minus attention quantized
    cosine_quantized: float      # mean (min) cosine to the float outputs with attention quantized
    min_quantized: float
    cosine_float: float          # ... with attention left float (everything else quantized alike)
    min_float: float
    max_cost: float | None
    batches: int

    def __str__(self) -> str:
        verdict = "quantized" if self.quantize else "left float"
        limit = "always" if self.max_cost is None else f"max cost {self.max_cost:g}"
        return (f"attention {verdict}: mean cosine to float {self.cosine_quantized:.5f} (min {self.min_quantized:.5f}) "
                f"quantized, {self.cosine_float:.5f} (min {self.min_float:.5f}) float; cost {self.cost:.5f} "
                f"({limit}; {self.batches} calibration batches)")


def attention_matmuls(gm: fx.GraphModule) -> list[fx.Node]:
    """The matmuls annotate_attention annotated (Q x K^T and P x V of every quantized attention)."""
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and getattr(n.meta.get(ANNOTATION), "reason", None) in ATTENTION_REASONS]


def _observer_call(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and str(node.target).startswith(OBSERVER_PREFIX)


def _bypass(gm: fx.GraphModule, calls) -> None:
    for call in calls:
        call.replace_all_uses_with(call.args[0])
        gm.graph.erase_node(call)
    gm.graph.lint()
    gm.recompile()


def _attention_observer_calls(gm: fx.GraphModule) -> list[fx.Node]:
    calls = []
    for mm in attention_matmuls(gm):
        calls += [a for a in mm.args[:2] if _observer_call(a) and a not in calls]
    return calls


def _float_copy(prepared: fx.GraphModule) -> fx.GraphModule:
    gm = copy.deepcopy(prepared)
    _bypass(gm, [n for n in gm.graph.nodes if _observer_call(n)])
    return gm


def _rows(out) -> list[torch.Tensor]:
    """Every float tensor of a model output, as [rows, features] (dim 0 taken as the batch)."""
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return [t.detach().double().reshape(t.shape[0], -1) if t.dim() >= 2 else t.detach().double().reshape(1, -1)
            for t in leaves]


def _cosines(module, reference_outputs, batches) -> torch.Tensor:
    out = [torch.zeros(0, dtype=torch.float64)]
    with torch.no_grad():
        for ref, batch in zip(reference_outputs, batches):
            args, kwargs = normalize_inputs(batch, what="calibration batch")
            for r, q in zip(ref, _rows(module(*args, **kwargs))):
                out.append(F.cosine_similarity(q, r, dim=-1))
    return torch.cat(out)


def attention_choice(prepared: fx.GraphModule, batches, *, max_cost: float | None = None,
                     n_batches: int = 8) -> AttentionChoice:
    """Measure what quantizing attention costs on `batches` (see the module doc); `max_cost` None
    keeps it quantized whatever the cost. `prepared` is calibrated and is not changed."""
    from .api import convert   # api imports this module

    batches = list(batches)[:n_batches]
    float_gm = _float_copy(prepared)
    refs = []
    with torch.no_grad():
        for batch in batches:
            args, kwargs = normalize_inputs(batch, what="calibration batch")
            refs.append(_rows(float_gm(*args, **kwargs)))
    del float_gm
    with_attention = convert(prepared)
    c_q = _cosines(with_attention, refs, batches)
    del with_attention
    without = copy.deepcopy(prepared)
    without.meta[STATE] = copy.deepcopy(prepared.meta[STATE])
    drop_attention(without, "measuring")
    c_f = _cosines(convert(without), refs, batches)
    if c_q.numel() == 0:   # no float output to compare: the cost cannot be measured, so keep float
        nan = float("nan")
        return AttentionChoice(quantize=max_cost is None, cost=nan, cosine_quantized=nan, min_quantized=nan,
                               cosine_float=nan, min_float=nan, max_cost=max_cost, batches=len(batches))
    cost = float(c_f.mean() - c_q.mean())
    return AttentionChoice(quantize=max_cost is None or cost <= max_cost, cost=cost,
                           cosine_quantized=float(c_q.mean()), min_quantized=float(c_q.min()),
                           cosine_float=float(c_f.mean()), min_float=float(c_f.min()), max_cost=max_cost,
                           batches=len(batches))


def drop_attention(prepared: fx.GraphModule, reason: str) -> int:
    """Return every quantized attention of a prepared module to float: its observer calls are
    bypassed, observers no call uses any more are removed, and the matmuls lose their annotation
    (the reports say `reason`). Returns how many attentions were dropped."""
    state = prepared.meta[STATE]
    matmuls = attention_matmuls(prepared)
    _bypass(prepared, _attention_observer_calls(prepared))
    used = {str(n.target) for n in prepared.graph.nodes if _observer_call(n)}
    for gid, attr in list(state.observers.items()):
        if attr not in used:
            del state.observers[gid]
            delattr(prepared, attr)
    live = set(state.observers)
    state.groups = [g for g in state.groups if g.spec.dynamic or g.id in live]
    for mm in matmuls:
        del mm.meta[ANNOTATION]
        if mm.meta.get(ATTENTION_SKIPPED) is None and any(mm.name == r["pv"] for r in state.attention.get("patterns", [])):
            mm.meta[ATTENTION_SKIPPED] = reason
    for row in state.attention.get("patterns", []):
        if row["quantized"]:
            row.update(quantized=False, reason=reason)
    return sum(1 for mm in matmuls if mm.meta.get(ATTENTION_SKIPPED) == reason)


def apply_attention_choice(prepared: fx.GraphModule, choice: AttentionChoice) -> fx.GraphModule:
    """Record `choice` in the QState and, when it says float, return attention to float."""
    state = prepared.meta[STATE]
    state.attention["choice"] = asdict(choice)
    if not choice.quantize:
        drop_attention(prepared, f"calibration measured a cost of {choice.cost:.5f} mean cosine "
                                 f"(> max_cost {choice.max_cost:g}): left float")
    return prepared
