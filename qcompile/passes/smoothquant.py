"""SmoothQuant: move activation outliers into the weights, per input channel.

For a linear `y = X W^T + b` whose input X is quantized, per input channel c:

    s_c = max|X_c| ** alpha / max|W_:,c| ** (1 - alpha)        (W' = W * s,  X' = X / s)

so `X' W'^T = X W^T` exactly in real arithmetic: the float output is unchanged (to float32
roundoff) while X' has flatter channel ranges, which a per-tensor activation scale quantizes with
less error. Linears that read the same tensor (BERT's q/k/v) share one s, taken from the max over
all their weights. The `1 / s` goes, by preference:

- into the producer, when the producer's output reaches nothing but these linears (looking through
  eval-mode dropout, contiguous and clone): a LayerNorm's weight and bias, or a linear's output
  rows and bias;
- otherwise into an explicit `aten.mul` by the constant `1 / s`, inserted before the observer of
  that edge (or before the linears, for dynamic activations); the other consumers of the tensor
  (BERT's residual stream reads every LayerNorm's output) keep reading the unscaled value. A
  backend can fold that multiply into the activation's quantize step. With `insert_mul=False`
  these linears are left as they are (the original paper's choice).

In a post-LayerNorm BERT every LayerNorm also feeds the residual add, so its q/k/v and FFN-input
linears get the multiply; so does the FFN output dense (after GELU, which does not commute with a
scale). The attention-output dense reads softmax(QK^T) @ V through a head-merging reshape: with
`through_attention=True` its 1/s goes into V's output rows (exact: the attention matmul mixes
tokens, not channels), otherwise it gets the multiply too. Pre-LN models (OPT, LLaMA-style) fold
into the LayerNorm.

`alpha="auto"` chooses alpha per group from `alpha_grid` (0.2 ... 0.95): the one whose smoothing
gives the least output error with both sides quantized (activation: a fresh observer of the
recipe's kind fitted on the scaled sample, or per token; weights: the recipe's weight spec), on
`n_samples` rows sampled from the calibration batches. The report keeps each group's errors.

Statistics: max|X| per channel over all calibration batches, read once before any rewrite
(`graph.recorder.record_inputs`, observers off), from `QState.float_inputs` where a driver set
them (the float model's inputs to a stage of `quantize_sequential`). Each group's rewrite leaves every other group's
input unchanged in float, so one pass over the groups in graph order is enough. Channels where
max|X| or max|W| is 0 keep s = 1; s is clamped to [1e-5, 1e5].

Report (`state.algorithm_reports["smoothquant"]`), one entry per smoothed linear: alpha, how the
scale was absorbed, the scale range, and max|X| over channels before and after.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import fx

from ..algorithms.awq import fake_quantize
from ..distributed import reduce_max, sample_rows
from ..errors import RecipeError
from ..graph import ANNOTATION, FROM_PASS, LINEAR, STATE, get_param, held_alone, is_op, module_name, set_param
from ..graph.recorder import record_inputs
from ..numerics import dequantize_math, per_token_qparams_math, quantize_math
from ..observers import make_observer
from ..spec import scale_layout
from .algorithm import AlgorithmPass
from .insert_observers import OBSERVER_PREFIX

aten = torch.ops.aten

# Ops that pass a tensor through with its last dim (the channel dim of the consuming linear)
# unchanged, value for value.
_PASS_THROUGH = {aten.contiguous.default, aten.clone.default}
S_MIN, S_MAX = 1e-5, 1e5
AUTO_ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(4, 20))   # 0.2 ... 0.95


def _is_identity(node: fx.Node) -> bool:
    if is_op(node, _PASS_THROUGH):
        return True
    # eval-mode dropout: aten.dropout(x, p, train=False)
    return is_op(node, {aten.dropout.default}) and len(node.args) > 2 and node.args[2] is False


def is_observer_call(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and str(node.target).startswith(OBSERVER_PREFIX)


@dataclass
class LinearGroup:
    """Linears whose quantized input is the same edge: `source` (observed by `observer`, if static)."""

    source: fx.Node
    observer: fx.Node | None
    linears: list = field(default_factory=list)

    @property
    def channels(self) -> int:
        return int(self.source.meta["val"].shape[-1])


def linear_groups(gm: fx.GraphModule) -> tuple[list[LinearGroup], dict[str, str]]:
    """Annotated linears with a quantized float input and a private 2-D get_attr weight, grouped
    by the tensor they read. Returns (groups in graph order, {linear name: why it was skipped})."""
    groups: dict[tuple, LinearGroup] = {}
    skipped: dict[str, str] = {}
    for node in gm.graph.nodes:
        if not is_op(node, LINEAR):
            continue
        ann = node.meta.get(ANNOTATION)
        if ann is None or ann.weight is None or 0 not in ann.inputs:
            skipped[node.name] = "its input activation is not quantized"
            continue
        w = node.args[1]
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and len(w.users) == 1
                and get_param(gm, w).dim() == 2):
            skipped[node.name] = "its weight is shared with other nodes or not a 2-D parameter"
            continue
        arg = node.args[0]
        observer = arg if is_observer_call(arg) else None
        source = arg.args[0] if observer is not None else arg
        if not isinstance(source, fx.Node) or not isinstance(source.meta.get("val"), torch.Tensor):
            skipped[node.name] = "its input has no recorded shape"
            continue
        key = (source.name, observer.name if observer is not None else None)
        groups.setdefault(key, LinearGroup(source, observer)).linears.append(node)
    out = []
    for g in groups.values():
        # The observer's output must reach only these linears: rescaling it changes what it feeds.
        if g.observer is not None and set(g.observer.users) != set(g.linears):
            for lin in g.linears:
                skipped[lin.name] = "its input observer also feeds other ops"
            continue
        out.append(g)
    return out, skipped


def channel_absmax(gm: fx.GraphModule, groups: Sequence[LinearGroup], batches,
                   samples: dict | None = None, n_samples: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """max|X| per input channel of each group (keyed by its first linear's name), over all batches.
    With `samples`, also keeps a seeded sample of about `n_samples` input rows per group there."""
    amax: dict[str, torch.Tensor] = {}
    batches = list(batches)
    per_batch = math.ceil(n_samples / max(len(batches), 1))
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list] = {}

    def keep(key: str, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        m = rows.abs().amax(dim=0) if rows.shape[0] else torch.zeros(rows.shape[1])
        amax[key] = m if key not in amax else torch.maximum(amax[key], m)
        if samples is not None:
            parts.setdefault(key, []).append(sample_rows(rows, per_batch, gen).clone())

    record_inputs(gm, [g.linears[0] for g in groups], batches, keep, arg=0)
    if samples is not None:
        samples.update({k: torch.cat(v) for k, v in parts.items()})
    return {k: reduce_max(v) for k, v in amax.items()}  # over the ranks' shards, under torch.distributed


def layer_names(nodes) -> dict[str, str]:
    """A report key per node: its module's name, or the node's name where that is empty or taken."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for n in nodes:
        key = module_name(n) or n.name
        if key in taken:
            key = f"{key} ({n.name})"
        taken.add(key)
        names[n.name] = key
    return names


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1-alpha) in float64; 1 where either max is 0; clamped."""
    x, w = x_absmax.double(), w_absmax.double()
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where((x > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(S_MIN, S_MAX)


def _activation_spec(gm: fx.GraphModule, g: LinearGroup):
    """The spec the group's input is quantized with: its observer's, or (dynamic) the annotation's."""
    if g.observer is not None:
        return gm.get_submodule(g.observer.target).spec
    return g.linears[0].meta[ANNOTATION].inputs[0]


def fake_quantize_activation(x: torch.Tensor, spec) -> torch.Tensor:
    """x quantized and dequantized as the converted graph will: per-tensor qparams from a fresh
    observer of the spec's kind fed `x` (the sample stands for the calibration set), or per token."""
    if spec.dynamic:
        scale, zp = per_token_qparams_math(x, spec.qmin, spec.qmax)
        axis, block = -1, x.shape[-1]
    else:
        observer = make_observer(spec)
        observer(x)
        scale, zp = observer.calculate_qparams()
        axis, block = scale_layout(spec, x)
    q = quantize_math(x, scale, zp, axis, block, spec.qmin, spec.qmax, torch.int32)
    return dequantize_math(q, scale, zp, axis, block, torch.float32)


def search_alpha(x: torch.Tensor, x_absmax: torch.Tensor, w_absmax: torch.Tensor, weights: list[torch.Tensor],
                 act_spec, weight_spec, grid: Sequence[float]) -> tuple[float, dict]:
    """The alpha of `grid` whose smoothing minimizes the group's output error on the sample rows
    `x` with both sides quantized, sum_i ||X W_i^T - Q(X / s) Q(W_i s)^T||^2; and {alpha: error}.
    The error is what a layer contributes, so each layer gets the migration strength it needs
    (Intel Neural Compressor's SmoothQuant auto-tuning does the same per layer)."""
    x = x.float()
    refs = [x @ w.float().T for w in weights]
    errors: dict[float, float] = {}
    for alpha in grid:
        s = smoothing_scales(x_absmax, w_absmax, alpha).float()
        xq = fake_quantize_activation(x / s, act_spec)
        errors[alpha] = sum(float((xq @ fake_quantize(w.float() * s, weight_spec).T - r).pow(2).sum(dtype=torch.float64))
                            for w, r in zip(weights, refs))
    best = min(errors, key=errors.get)
    return best, errors


class SmoothQuant(AlgorithmPass):
    name = "smoothquant"

    # alpha 0.85: on all-MiniLM-L6-v2 w8a8, 0.7..0.9 all give cosine 0.9972-0.9975 while the
    # paper's 0.5 gives 0.991, below plain w8a8 (0.9935): BERT's activation outliers need most of
    # the difficulty moved into the weights (benchmarks/ptq_activation_algorithms.py). The best
    # point of that sweep (0.8) is not taken as the default: it was read off the evaluation set.
    # through_attention off by default: on MiniLM w8a8 it saves 6 of the 24 multiplies but costs
    # cosine (0.99697 against 0.99719): V's per-tensor scale then carries the smoothing too.
    def __init__(self, alpha: "float | str" = 0.85, insert_mul: bool = True, through_attention: bool = False,
                 alpha_grid: Sequence[float] = AUTO_ALPHA_GRID, n_samples: int = 2048, seed: int = 0):
        if alpha != "auto" and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0):
            raise RecipeError(f"smoothquant alpha must be a number in [0, 1] (0.5 migrates half of the "
                              f"difficulty to the weights) or 'auto' (searched per layer), got {alpha!r}")
        numbers = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if (isinstance(alpha_grid, str) or not alpha_grid
                or not all(numbers(a) and 0.0 <= a <= 1.0 for a in alpha_grid)):
            raise RecipeError(f"smoothquant alpha_grid must be a non-empty list of numbers in [0, 1], got {alpha_grid!r}")
        alpha_grid = tuple(float(a) for a in alpha_grid)
        if not numbers(n_samples) or int(n_samples) < 1:
            raise RecipeError(f"smoothquant n_samples (rows kept per layer for the alpha search) must be positive, got {n_samples}")
        if not isinstance(insert_mul, bool):
            raise RecipeError(f"smoothquant insert_mul must be True or False, got {insert_mul!r}")
        if not isinstance(through_attention, bool):
            raise RecipeError(f"smoothquant through_attention must be True or False, got {through_attention!r}")
        super().__init__(alpha=alpha, insert_mul=insert_mul, through_attention=through_attention,
                         alpha_grid=alpha_grid, n_samples=int(n_samples), seed=int(seed))
        self.alpha = alpha if alpha == "auto" else float(alpha)
        self.insert_mul, self.through_attention = insert_mul, through_attention
        self.alpha_grid, self.n_samples, self.seed = alpha_grid, int(n_samples), int(seed)

    def run(self, gm: fx.GraphModule, batches) -> dict:
        state = gm.meta[STATE]
        groups, skipped = linear_groups(gm)
        for g in groups:  # rescaling a weight would void qparams another algorithm fixed for it
            if any(lin.args[1].target in state.weight_qparams for lin in g.linears):
                skipped.update({lin.name: "its weight qparams were fixed by an earlier algorithm; "
                                          "list smoothquant before it" for lin in g.linears})
        groups = [g for g in groups if not any(lin.name in skipped for lin in g.linears)]
        absorbers = {id(g): self._absorber(g) for g in groups}
        if not self.insert_mul:
            for g in groups:
                if absorbers[id(g)] is None:
                    skipped.update({lin.name: "its input producer cannot absorb the scale (insert_mul=False)"
                                    for lin in g.linears})
            groups = [g for g in groups if absorbers[id(g)] is not None]
        samples: dict[str, torch.Tensor] = {}
        # the float model's activations, where a driver that calibrates this graph on quantized
        # upstream stages carries them (quantize_sequential(propagate_error=False)): the scales the
        # whole model's SmoothQuant computes
        stats_batches = batches if state.float_inputs is None else state.float_inputs
        amax = channel_absmax(gm, groups, stats_batches, samples if self.alpha == "auto" else None,
                              self.n_samples, self.seed)
        names = layer_names(n for n in gm.graph.nodes if is_op(n, LINEAR))
        report: dict[str, dict] = {}
        counts = {"layer_norm": 0, "linear": 0, "mul": 0}
        for i, g in enumerate(groups):
            x_max = amax[g.linears[0].name]
            weights = [get_param(gm, lin.args[1]).detach() for lin in g.linears]
            w_max = torch.stack([_column_absmax(w) for w in weights]).amax(dim=0).float()
            alpha, errors = self.alpha, None
            if alpha == "auto":
                alpha, errors = search_alpha(samples[g.linears[0].name], x_max, w_max, weights,
                                             _activation_spec(gm, g), g.linears[0].meta[ANNOTATION].weight[1],
                                             self.alpha_grid)
            s = smoothing_scales(x_max, w_max, alpha)
            del weights
            for lin in g.linears:
                _rescale(gm, lin.args[1], lambda rows, part: (rows.double() * s).to(rows.dtype))
            absorber = absorbers[id(g)]
            if absorber is None:
                how = self._insert_mul(gm, g, s, i)
            else:
                how = self._absorb(gm, absorber, s)
            counts[how.split(" ")[0]] += len(g.linears)
            after = (x_max.double() / s).float()
            entry = dict(alpha=alpha, absorbed_by=how, group=[names[n.name] for n in g.linears],
                         scale_min=float(s.min()), scale_max=float(s.max()),
                         act_absmax_before=float(x_max.max()), act_absmax_after=float(after.max()),
                         weight_absmax_before=float(w_max.max()),
                         weight_absmax_after=float((w_max.double() * s).max()))
            if errors is not None:
                entry["search"] = errors
            for lin in g.linears:
                report[names[lin.name]] = entry
        for node_name, why in skipped.items():
            report[names[node_name]] = {"skipped": why}
        state.algorithm_reports[self.name] = report
        return {"smoothed linears": sum(counts.values()), "into layer_norm": counts["layer_norm"],
                "into linear": counts["linear"], "explicit mul": counts["mul"], "skipped": len(skipped)}

    # ------------------------------------------------------------------ where 1/s goes

    def _absorber(self, g: LinearGroup) -> fx.Node | None:
        """The LayerNorm or linear whose output reaches only this group's linears, if there is one."""
        readers = {g.observer} if g.observer is not None else set(g.linears)
        if g.observer is None and set(g.source.users) != readers:
            return None
        node = g.source
        if g.observer is not None and set(node.users) != readers:
            return None
        while _is_identity(node):
            parent = node.args[0]
            if not isinstance(parent, fx.Node) or len(parent.users) != 1:
                return None
            node = parent
        if is_op(node, {aten.layer_norm.default}):
            normalized = node.args[1]
            weight = node.args[2] if len(node.args) > 2 else None
            bias = node.args[3] if len(node.args) > 3 else None
            if len(normalized) != 1 or not _private_attr(weight) or not (bias is None or _private_attr(bias)):
                return None
            return node
        if self.through_attention:
            node = _value_projection(node) or node
        parts = _split_linears(node)
        if parts is not None:
            return node if all(self._private_linear(p) for p in parts) else None
        if is_op(node, LINEAR):
            bias = node.args[2] if len(node.args) > 2 else None
            if not _private_attr(node.args[1]) or not (bias is None or _private_attr(bias)):
                return None
            return node
        return None

    @staticmethod
    def _private_linear(node: fx.Node) -> bool:
        bias = node.args[2] if len(node.args) > 2 else None
        return _private_attr(node.args[1]) and (bias is None or _private_attr(bias))

    @staticmethod
    def _absorb(gm: fx.GraphModule, producer: fx.Node, s: torch.Tensor) -> str:
        parts = _split_linears(producer)
        if parts is not None:
            for p in parts:
                SmoothQuant._absorb(gm, p, s)
            return f"linear {module_name(parts[0]) or parts[0].name} (both paths of its outlier split)"
        if is_op(producer, {aten.layer_norm.default}):
            params = [producer.args[2]] + ([producer.args[3]] if len(producer.args) > 3 and producer.args[3] is not None else [])
            for p in params:
                v = get_param(gm, p).detach()
                set_param(gm, p, (v.double() / s).to(v.dtype))
            return f"layer_norm {module_name(producer) or producer.name}"
        _rescale(gm, producer.args[1], lambda rows, part: (rows.double() / s[part, None]).to(rows.dtype))
        bias = producer.args[2] if len(producer.args) > 2 else None
        if bias is not None:
            b = get_param(gm, bias).detach()
            set_param(gm, bias, (b.double() / s).to(b.dtype))
        return f"linear {module_name(producer) or producer.name}"

    def _insert_mul(self, gm: fx.GraphModule, g: LinearGroup, s: torch.Tensor, index: int) -> str:
        attr = f"qc_smooth{index}_inv_scale"
        val = g.source.meta["val"]
        gm.register_buffer(attr, (1.0 / s).to(val.dtype))
        first = g.observer if g.observer is not None else g.linears[0]
        with gm.graph.inserting_before(first):
            c = gm.graph.get_attr(attr)
            mul = gm.graph.call_function(aten.mul.Tensor, (g.source, c))
        c.meta.update({FROM_PASS: self.name})
        mul.meta.update({FROM_PASS: self.name, "val": val})
        if "nn_module_stack" in first.meta:
            mul.meta["nn_module_stack"] = first.meta["nn_module_stack"]
        if g.observer is not None:
            g.observer.args = (mul,) + tuple(g.observer.args[1:])
        else:
            for lin in g.linears:
                lin.args = (mul,) + tuple(lin.args[1:])
        return "mul (explicit 1/s before the input's quantization)"


def _column_absmax(w: torch.Tensor) -> torch.Tensor:
    """max |w[:, j]| per input channel, without w.abs()'s temporary copy of the weight (an lm_head's)."""
    return torch.maximum(w.amax(dim=0), w.amin(dim=0).neg())


def _by_rows(w: torch.Tensor, fn, elements: int = 1 << 22, out: torch.Tensor | None = None) -> torch.Tensor:
    """fn(w[part], part) for chunks of rows, into `out` (a new tensor by default; `w` itself to
    rescale in place: each chunk is read before it is written): the float64 temporaries of a
    rescaled weight are a chunk's (`elements` values, 32 MB), not two more copies of an lm_head
    (same values: elementwise)."""
    out = torch.empty_like(w) if out is None else out
    rows = max(1, elements // max(1, w[0].numel())) if w.dim() else 1
    for r0 in range(0, w.shape[0], rows):
        part = slice(r0, r0 + rows)
        out[part] = fn(w[part], part)
    return out


def _rescale(gm: fx.GraphModule, node: fx.Node, fn) -> None:
    """The weight of get_attr `node` through `fn` (see `_by_rows`), written over itself when gm alone
    holds it: gm owns its tensors (prepare copied the user's model; the sequential driver loaded its
    block into memory of its own), and a second copy of an
    lm_head-sized weight was the peak of a sequential w8a8 + SmoothQuant run. A storage that another
    tensor of gm shares (a tied embedding) gets a new tensor."""
    w = get_param(gm, node).detach()
    set_param(gm, node, _by_rows(w, fn, out=w if held_alone(gm, w) else None))


def _single_user(node) -> bool:
    return isinstance(node, fx.Node) and len(node.users) == 1


def _is_head_transpose(node) -> bool:
    """transpose(x, 1, 2) of a 4-D [B, T, H, D] <-> [B, H, T, D] tensor."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return (is_op(node, {aten.transpose.int}) and isinstance(val, torch.Tensor) and val.dim() == 4
            and {a % 4 for a in node.args[1:3]} == {1, 2})


def _value_projection(node: fx.Node) -> fx.Node | None:
    """The V projection behind attention's head merge, when channel c of the merged tensor is
    channel c of V's output and nothing else reads the path:

        V = linear(...) -> view [B, T, H, D] -> transpose(1, 2) -> [observer] -> matmul(P, .)
          -> transpose(1, 2) -> [contiguous] -> reshape/view [B, T, H * D]      (= `node`)

    softmax(.) @ V is linear in V and acts on the token axis only, so scaling V's output channel c
    by 1/s scales channel c of `node` by 1/s: V's output rows can absorb the scale."""
    if not is_op(node, {aten.reshape.default, aten.view.default}):
        return None
    out, x = node.meta.get("val"), node.args[0]
    xin = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not (isinstance(out, torch.Tensor) and isinstance(xin, torch.Tensor) and xin.dim() == 4
            and tuple(out.shape) == tuple(xin.shape[:2]) + (xin.shape[2] * xin.shape[3],)):
        return None
    while _single_user(x) and _is_identity(x):
        x = x.args[0]
    if not (_single_user(x) and _is_head_transpose(x)):
        return None
    mm = x.args[0]
    if not (_single_user(mm) and is_op(mm, {aten.matmul.default}) and len(mm.args) == 2):
        return None
    v = mm.args[1]
    if is_observer_call(v):
        v = v.args[0] if _single_user(v) else None
    if not (_single_user(v) and _is_head_transpose(v)):
        return None
    split = v.args[0]
    if not (_single_user(split) and is_op(split, {aten.view.default, aten.reshape.default})):
        return None
    lin = split.args[0]
    lin_val, split_val = lin.meta.get("val"), split.meta.get("val")
    if _split_linears(lin) is not None:   # V = quantized linear + the outlier split's float path
        return lin if _single_user(lin) and isinstance(lin_val, torch.Tensor) and \
            tuple(split_val.shape) == tuple(lin_val.shape[:-1]) + tuple(xin.shape[2:]) else None
    if not (_single_user(lin) and is_op(lin, LINEAR) and isinstance(lin_val, torch.Tensor)
            and tuple(split_val.shape) == tuple(lin_val.shape[:-1]) + tuple(xin.shape[2:])):
        return None
    return lin


def _split_linears(node) -> tuple | None:
    """(a, b) when `node` is add(a, b) of two linears that feed nothing else: a linear that the
    outlier split divided into its quantized path and its float path (outliers.py). Scaling the
    output rows of both scales the sum's."""
    if not (is_op(node, {aten.add.Tensor}) and len(node.args) == 2):
        return None
    a, b = node.args
    if all(isinstance(x, fx.Node) and is_op(x, LINEAR) and _single_user(x) for x in (a, b)):
        return a, b
    return None


def _private_attr(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and len(node.users) == 1
