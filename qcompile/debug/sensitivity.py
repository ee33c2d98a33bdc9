"""Which layers hurt: per-layer sensitivity, and a per-layer precision plan under a budget.

`sensitivity` quantizes one layer at a time (its weight and, for recipes with activations, its
input) with each candidate recipe through the real prepare -> calibrate -> convert pipeline and
measures how far the model's output moves from the float output (relative MSE, SQNR). It also
reads, from each converted module, how many bits that layer's weight really takes, so a layer a
recipe does not cover (e.g. int4 groups of 128 on a 3x3 conv with 9 inputs) counts as float.

`auto_recipe` picks a candidate per layer from those measurements: start every layer at the
cheapest candidate, then upgrade the layer with the best error saved per extra bit until the next
upgrade would break the average-bits budget (or until the summed error is under `max_error`). The
result is a plain `Recipe` (base recipe + per-module `overrides`/`exclude`): read it, save it with
`to_json`, edit it, pass it to `prepare` or `prepare_qat`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from ..errors import InvalidInputsError, InvalidModelError, RecipeError
from ..graph import STATE, WEIGHTED
from ..spec import Recipe, get_recipe

qops = torch.ops.qcompile
WEIGHTED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d)
FLOAT = None  # the candidate "keep this layer in float"


def weighted_layers(model: nn.Module) -> list[str]:
    """Names of the layers a recipe can give weights to (Linear, Conv1d, Conv2d), in model order."""
    return [name for name, m in model.named_modules() if name and isinstance(m, WEIGHTED_MODULES)]


def weight_bits(quantized: fx.GraphModule) -> dict[str, tuple[int, int]]:
    """Per weighted op of a converted module: (bits per weight element, elements), read from the graph:
    an integer weight counts its format's bits (int4 counts 4 though held one per int8 here: the
    exporters pack it), a float weight its dtype's bits."""
    from ..graph import module_name

    state = quantized.meta.get(STATE)
    spec_of = {}
    for row in state.qparams if state is not None else ():
        if row["kind"] == "weight":
            for member in row["members"]:
                spec_of[(member[1], member[2])] = row["spec"]
    out = {}
    for node in quantized.graph.nodes:
        if node.op != "call_function" or node.target not in WEIGHTED:
            continue
        w = node.args[1]
        spec = spec_of.get((node.name, 1))
        if isinstance(w, fx.Node) and w.op == "get_attr":
            t = _attr(quantized, w.target)
            out[module_name(node) or node.name] = (t.element_size() * 8, t.numel())
        elif isinstance(w, fx.Node) and w.target == qops.dequantize.default and spec is not None:
            out[module_name(node) or node.name] = (spec.bits, _attr(quantized, w.args[0].target).numel())
        elif isinstance(w, fx.Node) and spec is not None:   # other weight formats (nf4 ...): spec bits
            numel = w.meta["val"].numel() if isinstance(w.meta.get("val"), torch.Tensor) else 0
            out[module_name(node) or node.name] = (spec.bits, numel)
    return out


def average_bits(bits: dict[str, tuple[int, int]]) -> float:
    total = sum(n for _, n in bits.values())
    return sum(b * n for b, n in bits.values()) / total if total else 0.0


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class LayerSensitivity:
    layer: str
    candidate: "str | None"     # recipe name, None = float
    bits: int                   # bits per weight element in the converted module
    numel: int                  # weight elements
    rel_mse: float              # sum (q - f)^2 / sum f^2 of the model output, this layer alone quantized

    @property
    def sqnr_db(self) -> float:
        return math.inf if self.rel_mse == 0 else -10.0 * math.log10(self.rel_mse)


@dataclass
class SensitivityReport:
    rows: list[LayerSensitivity]
    layers: list[str]
    candidates: list
    batches: int

    def get(self, layer: str, candidate) -> LayerSensitivity:
        for r in self.rows:
            if r.layer == layer and r.candidate == candidate:
                return r
        raise KeyError((layer, candidate))

    def ranking(self, candidate=None) -> list[LayerSensitivity]:
        """Layers, most sensitive first, under `candidate` (default: the first, i.e. cheapest, one)."""
        c = self.candidates[0] if candidate is None else candidate
        return sorted((r for r in self.rows if r.candidate == c), key=lambda r: -r.rel_mse)

    def __str__(self) -> str:
        quantized = [c for c in self.candidates if c is not None]
        head = ["rank", "layer", "weights"] + [f"{c} SQNR dB ({'bits'})" for c in quantized]
        rows = []
        for i, r in enumerate(self.ranking(quantized[0] if quantized else None), 1):
            cells = [str(i), r.layer, str(r.numel)]
            for c in quantized:
                x = self.get(r.layer, c)
                cells.append(f"{_db(x.sqnr_db)} ({x.bits})")
            rows.append(cells)
        widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h) for i, h in enumerate(head)]
        lines = [f"qcompile sensitivity: one layer quantized at a time, model output vs float, {self.batches} "
                 "batch(es); most sensitive first",
                 "  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in rows]
        return "\n".join(lines)


def _db(x: float) -> str:
    return "inf" if math.isinf(x) and x > 0 else f"{x:.1f}"


def _outputs(module, batches) -> list[torch.Tensor]:
    from ..capture import normalize_inputs

    outs = []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            args, kwargs = normalize_inputs(batch, what=f"batch {i}")
            leaves = torch.utils._pytree.tree_leaves(module(*args, **kwargs))
            outs.append([t.detach().double() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()])
    return outs


def _rel_mse(ref: list, got: list) -> float:
    signal = sum(float((f * f).sum()) for fs in ref for f in fs)
    noise = sum(float(((q - f) ** 2).sum()) for fs, qs in zip(ref, got) for f, q in zip(fs, qs))
    return noise / signal if signal else 0.0


def one_layer_recipe(candidate: "str | Recipe", layer: str, layers: Sequence[str]) -> Recipe:
    """`candidate` applied to `layer` alone: the other weighted layers are excluded and only the
    weighted op families stay, so the output change is that layer's own."""
    base = get_recipe(candidate)
    others = tuple(n for n in layers if n != layer)
    return base.replace(name=f"{base.name}@{layer}", exclude=base.exclude + others,
                        ops=tuple(o for o in base.ops if o in ("linear", "conv")))


def quantize(model: nn.Module, recipe: "str | Recipe", batches: list, example=None) -> fx.GraphModule:
    """prepare -> calibrate (when the recipe observes activations) -> convert, quietly."""
    from ..api import calibrate, convert, prepare

    prepared = prepare(model, batches[0] if example is None else example, recipe)
    if prepared.meta[STATE].observers or prepared.meta[STATE].recipe.algorithms:
        calibrate(prepared, batches, progress=False)
    return convert(prepared)


def _check(model, batches) -> list:
    if isinstance(model, fx.GraphModule) and STATE in getattr(model, "meta", {}):
        raise InvalidModelError("sensitivity takes the float nn.Module (it prepares one copy per layer), "
                                "not a module from qc.prepare/qc.convert")
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"sensitivity takes a torch.nn.Module, got {type(model).__name__}")
    batches = list(batches)
    if not batches:
        raise InvalidInputsError("sensitivity got no batches; pass a non-empty list of representative inputs")
    return batches


def sensitivity(model: nn.Module, batches: Iterable, recipe: "str | Recipe | Sequence" = "w8a8", *,
                layers: Sequence[str] | None = None, progress: bool = True) -> SensitivityReport:
    """Quantize each weighted layer alone with each recipe in `recipe` (a name, a Recipe, or a
    sequence of them; None in the sequence stands for float) and measure the model output's
    relative MSE against float on `batches` (also the calibration data). `model` is not modified."""
    batches = _check(model, batches)
    candidates = list(recipe) if isinstance(recipe, (list, tuple)) else [recipe]
    for c in candidates:
        if c is not None:
            get_recipe(c)
    all_layers = weighted_layers(model)
    if not all_layers:
        raise InvalidModelError("the model has no Linear or Conv layer to quantize")
    layers = list(layers) if layers is not None else all_layers
    unknown = [n for n in layers if n not in all_layers]
    if unknown:
        raise RecipeError(f"no Linear/Conv layer named {unknown[0]!r}; weighted layers: {', '.join(all_layers[:8])}")
    reference = _outputs(model, batches)
    params = dict(model.named_modules())
    rows = []
    work = [(layer, c) for layer in layers for c in candidates]
    for layer, c in tqdm(work, desc="sensitivity", unit="run", disable=not progress):
        w = params[layer].weight
        if c is None:
            rows.append(LayerSensitivity(layer, None, w.element_size() * 8, w.numel(), 0.0))
            continue
        q = quantize(model, one_layer_recipe(c, layer, all_layers), batches)
        bits = weight_bits(q).get(layer, (w.element_size() * 8, w.numel()))
        rows.append(LayerSensitivity(layer, c if isinstance(c, str) else get_recipe(c).name, bits[0], bits[1],
                                     _rel_mse(reference, _outputs(q, batches))))
    names = [c if c is None or isinstance(c, str) else c.name for c in candidates]
    return SensitivityReport(rows, layers, names, len(batches))


@dataclass
class Plan:
    """A per-layer choice: layer -> candidate (recipe name or None), with its predicted cost."""

    choice: dict
    bits: float                # average weight bits, weighted by elements
    predicted_error: float     # sum of the chosen layers' one-at-a-time relative MSEs
    steps: list = field(default_factory=list)


def plan_precision(report: SensitivityReport, *, budget_bits: float | None = None,
                   max_error: float | None = None) -> Plan:
    """Greedy: all layers at the cheapest candidate, then upgrades by error saved per extra bit."""
    if (budget_bits is None) == (max_error is None):
        raise RecipeError("give exactly one budget: budget_bits (average weight bits) or max_error "
                          "(summed relative MSE of the output)")
    layers = report.layers
    options = {l: sorted((report.get(l, c) for c in report.candidates), key=lambda r: (r.bits, r.rel_mse))
               for l in layers}
    total = sum(options[l][0].numel for l in layers)
    pick = {l: 0 for l in layers}
    cost = lambda: sum(options[l][pick[l]].bits * options[l][pick[l]].numel for l in layers) / total
    err = lambda: sum(options[l][pick[l]].rel_mse for l in layers)
    if budget_bits is not None and cost() > budget_bits + 1e-12:
        raise RecipeError(f"the cheapest choice already takes {cost():.3f} average weight bits, above the "
                          f"budget of {budget_bits}; raise the budget or add a cheaper candidate")
    steps = []
    while True:
        if max_error is not None and err() <= max_error:
            break
        best = None
        for l in layers:
            cur = options[l][pick[l]]
            for j in range(pick[l] + 1, len(options[l])):
                nxt = options[l][j]
                extra = (nxt.bits - cur.bits) * cur.numel / total
                saved = cur.rel_mse - nxt.rel_mse
                if saved <= 0:
                    continue
                if budget_bits is not None and cost() + extra > budget_bits + 1e-12:
                    continue
                score = saved / max(extra, 1e-12)
                if best is None or score > best[0]:
                    best = (score, l, j)
        if best is None:
            break
        pick[best[1]] = best[2]
        steps.append((best[1], options[best[1]][best[2]].candidate))
    return Plan({l: options[l][pick[l]].candidate for l in layers}, cost(), err(), steps)


def plan_to_recipe(plan: Plan, name: str | None = None) -> Recipe:
    """The plan as a Recipe: the most common quantized choice is the base, the others are overrides,
    float layers are excluded."""
    counts: dict = {}
    for c in plan.choice.values():
        if c is not None:
            counts[c] = counts.get(c, 0) + 1
    if not counts:
        raise RecipeError("the plan keeps every layer in float; there is nothing to quantize")
    base_name = max(counts, key=lambda c: counts[c])
    base = get_recipe(base_name)
    overrides = tuple((l, c) for l, c in plan.choice.items() if c is not None and c != base_name)
    exclude = tuple(l for l, c in plan.choice.items() if c is None)
    return base.replace(name=name or f"auto-{plan.bits:.2f}bits", overrides=base.overrides + overrides,
                        exclude=base.exclude + exclude)


def auto_recipe(model: nn.Module, batches: Iterable, *, budget_bits: float | None = None,
                max_error: float | None = None, candidates: Sequence = ("w4a16", "w8a16", None),
                report: SensitivityReport | None = None, progress: bool = True) -> Recipe:
    """A per-layer precision Recipe from sensitivity measurements: the lowest output error whose
    average weight bits (per weight element, over the Linear/Conv layers) stay within `budget_bits`,
    or the fewest bits whose summed one-layer error is at most `max_error`. Candidates are recipe
    names (None = keep in float). Pass `report` to reuse a `sensitivity` run."""
    if report is None:
        report = sensitivity(model, batches, list(candidates), progress=progress)
    plan = plan_precision(report, budget_bits=budget_bits, max_error=max_error)
    return plan_to_recipe(plan)
