"""GPTQ pass: sequential, layer by layer, with one Hessian in memory at a time.

For each group of linears that read the same input (q/k/v of an attention block share one), in
graph order: run the calibration batches on to that input from the previous group's (the layers
before it already hold their quantized weights, so the Hessian sees the errors GPTQ must
compensate; `graph.cursor.GraphCursor` keeps each batch's live values between groups), accumulate
H = X^T X / rows (float64; summed over ranks under torch.distributed), quantize each weight of
the group with `algorithms.gptq.gptq_quantize`, store the dequantized weight in the parameter
and its qparams in `state.weight_qparams`, so that
`convert` produces exactly GPTQ's codes. The float output changes: that is the point (the
weights are the quantized ones from here on). Convolutions are left to RTN (reported).
With `token_mask`, the rows of padded positions stay out of H (`TokenRows`); with
`bias_correction`, the linear's bias absorbs the mean output error (its biases change too).
With `float_targets`, each layer fits the float model's output (GPTAQ's asymmetric calibration):
see `float_target`. The float model's inputs to every group come from one float run before any
weight changes when they take less memory than the float weights (`recorded_float_inputs`), else
from a float run per group with the float weights swapped back in.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Sequence

import torch
from torch import fx

from ..algorithms.damped_cholesky import DampedCholesky
from ..algorithms.gptq import gptq_quantize, layer_error
from ..capture import flatten_for_graph, normalize_inputs
from ..distributed import reduce_count, reduce_sum
from ..errors import CalibrationError, CalibrationWarning, RecipeError
from ..graph import ANNOTATION, LINEAR, STATE, get_param, held_alone, is_op, set_param
from ..graph.annotation import get_arg
from ..graph.attention import attention_mask_inputs
from ..graph.cursor import GraphCursor
from ..graph.recorder import record_inputs
from ..memory import available_bytes, return_freed_heap
from ..numerics import WEIGHT_ELEMENTS, dequantize_weight, quantize_weight, stored_qparams
from ..observers import weight_qparams
from ..spec import scale_layout
from .algorithm import AlgorithmPass


# Calibration rows per input column below which GPTQ's Hessian is too noisy to fit: SmolLM2-135M
# w4a16 (README, "GPTQ needs more calibration text"): 2.7 rows per down_proj input +10.0% perplexity,
# 10.7 rows +5.2%, 26.7 rows +3.9%
MIN_ROWS_PER_INPUT = 8


def few_rows(report: dict) -> dict:
    """{weight: (rows, inputs)} of the layers GPTQ fitted on fewer than MIN_ROWS_PER_INPUT
    calibration rows per input column (rows: real tokens, over all ranks)."""
    return {target: (r["rows"], r["inputs"]) for target, r in report.items()
            if r["rows"] < MIN_ROWS_PER_INPUT * r["inputs"]}


def few_rows_message(few: dict) -> str:
    """One line for all of them, without layer names: a sequential run warns once, not per block."""
    rows, k = min(few.values(), key=lambda rk: rk[0] / rk[1])
    need = MIN_ROWS_PER_INPUT * max(k for _, k in few.values())
    return (f"gptq: {len(few)} layer(s) saw fewer than {MIN_ROWS_PER_INPUT} calibration rows (tokens) per input "
            f"column, as few as {rows / k:.1f} ({rows} rows for {k} inputs). GPTQ fits each layer to the "
            f"Hessian of those rows, and with so few it fits their noise (SmolLM2-135M w4a16: +10% perplexity "
            f"at 2.7 rows per input, +3.9% at 27). Calibrate on at least {need} tokens; for an LLM, "
            f"qc.quantize_sequential runs large calibration sets fastest. The layers are listed in "
            f"algorithm_reports['gptq_few_rows'].")


def weighted_linear_groups(gm: fx.GraphModule, exclusive_weights: bool = False
                           ) -> tuple[list[list[tuple[fx.Node, fx.Node, object]]], list[str]]:
    """Annotated linears with a 2-D get_attr weight, grouped by their input node, in graph order:
    ([[(linear, weight get_attr, weight spec), ...], ...], [why each other weighted node is skipped]).
    `exclusive_weights`: skip a linear whose weight another op also reads (an embedding table tied to
    the LM head), for algorithms that rescale the float weight."""
    groups: dict[fx.Node, list] = {}
    skipped, seen = [], set()
    for node in gm.graph.nodes:
        ann = node.meta.get(ANNOTATION)
        if ann is None or ann.weight is None:
            continue
        pos, spec = ann.weight
        w_node = get_arg(node, pos)
        if not is_op(node, LINEAR):
            skipped.append(f"{node.name}: not a linear (kept on round-to-nearest)")
            continue
        if getattr(spec, "dtype", None) == "nf4":
            skipped.append(f"{node.name}: NF4 weights have a fixed codebook")
            continue
        if w_node.target in seen:
            skipped.append(f"{node.name}: weight {w_node.target} is shared with an earlier linear")
            continue
        if exclusive_weights and len(w_node.users) > 1:
            others = ", ".join(sorted(u.name for u in w_node.users if u is not node))
            skipped.append(f"{node.name}: weight {w_node.target} is also read by {others} (tied)")
            continue
        seen.add(w_node.target)
        groups.setdefault(node.args[0], []).append((node, w_node, spec))
    return list(groups.values()), skipped


AUTO = "auto"


def check_token_mask(algorithm: str, token_mask) -> None:
    """The option's type: "auto", None, an input name or an input position (checked against the graph in run)."""
    ok = token_mask is None or (isinstance(token_mask, str) and token_mask) or (
        isinstance(token_mask, int) and not isinstance(token_mask, bool) and token_mask >= 0)
    if not ok:
        raise RecipeError(f"{algorithm} token_mask names the model input that marks real tokens (a [batch, seq] 0/1 "
                          f"mask, e.g. 'attention_mask') or gives its position; got {token_mask!r}. "
                          "Leave it 'auto' to find the attention mask in the graph, or None to use every row")


class TokenRows:
    """Keeps only the rows of real tokens in what a recorder sees, when `token_mask` names a
    [batch, seq] 0/1 input: padded positions usually never reach the output (masked attention keys,
    masked pooling), so their activations would only bias the statistics, and they can be most of
    the rows (MiniLM padded to 64 tokens: 66%). Use `batches(...)` as the batches given to
    `record_inputs` and `rows(x)` in its callback.

    `token_mask="auto"` takes the one input the graph applies to attention scores
    (`graph.attention.attention_mask_inputs`) when its calibration values are all 0/1, and every
    row otherwise (no such input, several, or other values); `found` says which and why."""

    def __init__(self, gm: fx.GraphModule, token_mask, algorithm: str):
        self.gm, self.algorithm, self.mask, self.index, self.name = gm, algorithm, None, None, None
        self.not_applied: set[str] = set()
        self.auto, self.checked = token_mask == AUTO, False
        self.found = "token_mask=None: every row"
        if token_mask is None:
            return
        if self.auto:
            masks = attention_mask_inputs(gm)
            if len(masks) != 1:
                self.found = (f"auto: {len(masks)} inputs reach the attention scores "
                              f"({', '.join(m.name for m in masks) or 'none'}): every row")
                return
            token_mask = masks[0].name
            self.found = f"auto: {token_mask!r} (it reaches the attention scores)"
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        if isinstance(token_mask, int):
            if token_mask >= len(names):
                raise RecipeError(f"{algorithm} token_mask={token_mask} is not an input position: the model has "
                                  f"{len(names)} inputs ({', '.join(names)})")
            self.index = token_mask
        elif token_mask not in names:
            raise RecipeError(f"{algorithm} token_mask={token_mask!r} is not an input of the model; its inputs are "
                              f"{', '.join(names)}. Name the [batch, seq] 0/1 mask of real tokens")
        else:
            self.index = names.index(token_mask)
        self.name = names[self.index]
        if not self.auto:
            self.found = f"token_mask={self.name!r}"

    def batches(self, batches: Sequence):
        self.check(batches)
        for batch in batches:
            self.select(batch)
            yield batch

    def check(self, batches: Sequence) -> None:
        """With "auto", use the mask only if every batch's is a 0/1 mask (checked once)."""
        if self.auto and self.index is not None and not self.checked:
            self.checked = True
            try:
                for batch in batches:
                    self._mask_of(batch)
            except RecipeError:   # not a 0/1 mask of real tokens (an additive mask, say): every row
                self.found = f"auto: {self.name!r} reaches the attention scores but is not a 0/1 mask: every row"
                self.index = None

    def select(self, batch) -> None:
        """`rows` keeps the real tokens of this batch from here on."""
        if self.index is not None:
            self.mask = self._mask_of(batch)

    def _mask_of(self, batch) -> torch.Tensor:
        mask = flatten_for_graph(self.gm, *normalize_inputs(batch, what="calibration batch"))[self.index]
        if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or bool(((mask != 0) & (mask != 1)).any()):
            what = (f"shape {tuple(mask.shape)}, values {mask.unique()[:5].tolist()}"
                    if isinstance(mask, torch.Tensor) else type(mask).__name__)
            raise RecipeError(f"{self.algorithm} token_mask: input {self.name!r} is not a [batch, seq] 0/1 mask "
                              f"({what}); name the attention mask of real tokens, or drop token_mask")
        return mask != 0

    def rows(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """x as [rows, K], the rows of padded positions left out when x is [batch, seq, K] like the mask
        (other inputs, e.g. after pooling, hold no padded positions: all their rows are kept)."""
        flat = x.reshape(-1, x.shape[-1])
        if self.mask is None:
            return flat
        if tuple(x.shape[:-1]) != tuple(self.mask.shape):
            self.not_applied.add(key)
            return flat
        return flat[self.mask.reshape(-1)]


def own_bias(node: fx.Node) -> fx.Node | None:
    """The get_attr bias of a linear when no other node reads it (so it may be changed), else None."""
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if isinstance(bias, fx.Node) and bias.op == "get_attr" and len(bias.users) == 1:
        return bias
    return None


def rtn_dequantized(w: torch.Tensor, spec, qparams=None) -> torch.Tensor:
    """Round-to-nearest weight on the given (or the spec's own) qparams, dequantized."""
    s, z = qparams if qparams is not None else weight_qparams(w, spec)
    axis, block = scale_layout(spec, w)
    q = quantize_weight(w, s, z, axis, block, spec.qmin, spec.qmax, torch.int32, spec.rounding)
    return dequantize_weight(q, *stored_qparams(s, z, spec), axis, block, w.dtype)


def _error_rows(w: torch.Tensor) -> int:
    """Rows of a weight per chunk of the error reports: WEIGHT_ELEMENTS values (4 MB in float32),
    as the (de)quantization of weights runs (an lm_head's 8192-row chunks were 64 MB at its peak)."""
    return max(1, WEIGHT_ELEMENTS // max(1, w.shape[1]))


def rtn_layer_error(target: torch.Tensor, w: torch.Tensor, spec, h: torch.Tensor, rows: int | None = None) -> float:
    """`layer_error` of round-to-nearest `w` against `target`, dequantized `rows` rows at a time
    (an lm_head's RTN copy would be another N x K tensor); the qparams are the whole weight's."""
    s, z = weight_qparams(w, spec)
    rows = rows or _error_rows(w)
    total = 0.0
    for r0 in range(0, w.shape[0], rows):
        part = slice(r0, r0 + rows)
        qparams = (s, z) if s.ndim == 0 else (s[part], z[part])
        total += layer_error(target[part], rtn_dequantized(w[part], spec, qparams), h)
    return total


def codes_layer_error(target: torch.Tensor, codes: torch.Tensor, qparams: tuple, axis: int, block: int,
                      h: torch.Tensor, rows: int | None = None) -> float:
    """`layer_error` of the dequantized `codes` against `target`, dequantized `rows` rows at a time
    (the whole W_hat need not exist yet); `qparams` as stored (`stored_qparams`)."""
    s, z = qparams
    rows = rows or _error_rows(codes)
    total = 0.0
    for r0 in range(0, codes.shape[0], rows):
        part = slice(r0, r0 + rows)
        sz = (s, z) if s.ndim == 0 else (s[part], z[part])
        total += layer_error(target[part], dequantize_weight(codes[part], *sz, axis, block, torch.float32), h)
    return total


def matvec64(w: torch.Tensor, v: torch.Tensor, rows: int = 8192) -> torch.Tensor:
    """W v in float64 ([N]), W read `rows` rows at a time: no float64 copy of W."""
    return torch.cat([w[r0:r0 + rows].double() @ v for r0 in range(0, w.shape[0], rows)])


def float_target(w: torch.Tensor, factor: DampedCholesky, *, cross: torch.Tensor | None = None,
                 w_cross: torch.Tensor | None = None, elements: int = 1 << 21) -> torch.Tensor:
    """The weight V that the quantized layer should fit so that its output on its own inputs x
    (the quantized layers before it produced them) matches the float layer on the float model's
    inputs x_f: V minimizes sum ||V x - W x_f||^2, so V H = W C with H = E[x x^T] and
    C = E[x_f x^T], and ||Q x - W x_f||^2 = ||(Q - V) x||^2 + const: GPTQ of V on H is GPTQ of
    the asymmetric objective (GPTAQ, Li et al. 2025). Written as W + W (C - H) H^-1, with H damped as
    GPTQ damps it (`factor`: the Cholesky factor of the damped H), so that V = W exactly where the
    inputs agree. Give `cross` (C - H, [K, K]) or, summed beforehand (`times_diff`), `w_cross`
    (W (C - H), float64 [N, K]): smaller than C - H when N < K, so a caller can free C - H before
    H is factored.
    The rows of V are independent: they are solved a chunk of rows (`elements` values) at a time,
    so the float64 temporaries are 16 MB each, not four copies of an lm_head's 32000 x 2048."""
    if (cross is None) == (w_cross is None):
        raise ValueError("float_target takes one of cross (C - H) and w_cross (W (C - H))")
    cross = cross.double() if cross is not None else None
    out = torch.empty_like(w)
    rows = max(1, elements // max(1, w.shape[1]))
    for r0 in range(0, w.shape[0], rows):
        part = w[r0:r0 + rows].double()
        b = (part @ cross if cross is not None else w_cross[r0:r0 + rows]).T   # H x = b, [K, rows]
        out[r0:r0 + rows] = part + factor.solve(b).T
    return out


def times_diff(w: torch.Tensor, diff: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None,
               elements: int = 1 << 21) -> torch.Tensor:
    """out + (W diff^T) x in float64, [N, K]: one batch's term of W (C - H) = sum (W (x_f - x)) x^T,
    for `float_target`'s w_cross (diff = x_f - x and x are [rows, K] float64). W is read a chunk of
    rows at a time, so its float64 copy is a chunk's."""
    out = torch.zeros(w.shape, dtype=torch.float64) if out is None else out
    rows = max(1, elements // max(1, w.shape[1]))
    for r0 in range(0, w.shape[0], rows):
        out[r0:r0 + rows].addmm_((diff @ w[r0:r0 + rows].double().T).T, x)
    return out


@contextlib.contextmanager
def values_swapped(gm: fx.GraphModule, values: dict):
    """Run with the parameters in `values` ({target: (get_attr node, tensor)}) set to those tensors,
    and put the current ones back afterwards (storage swaps: nothing is copied)."""
    saved = []
    try:
        for node, value in values.values():
            param = get_param(gm, node)
            saved.append((param, param.data))
            param.data = value
        yield
    finally:
        for param, data in saved:
            param.data = data


class _OverBudget(Exception):
    pass


def float_weight_bytes(gm: fx.GraphModule, groups) -> int:
    """Bytes of the float parameters that swapped float runs keep beside the quantized ones: the
    weights (and biases) of every group but the last, the most `float_values` holds."""
    total = 0
    for group in groups[:-1]:
        for node, w_node, _ in group:
            for param in (w_node, own_bias(node)):
                if param is not None:
                    value = get_param(gm, param)
                    total += value.numel() * value.element_size()
    return total


def recorded_float_inputs(gm: fx.GraphModule, groups, batches, tokens: "TokenRows", float_batches,
                          budget: int) -> tuple[dict | None, int]:
    """The float model's input rows to each group's first linear, all recorded in one float run
    before any weight changes: ({node name: [rows of each batch]}, bytes), or (None, bytes so far)
    when they would take more than `budget` bytes. Then no float weight has to be kept for the
    later groups' float runs, and the block runs once in float instead of once per group. Each
    batch's rows are those the float run of the group would give, bit for bit (the same graph,
    weights and inputs)."""
    stored = {group[0][0].name: [] for group in groups}
    size = 0

    def keep(key, x):
        nonlocal size
        rows = tokens.rows(key, x)
        size += rows.numel() * rows.element_size()
        if size > budget:
            raise _OverBudget
        stored[key].append(rows.clone())   # its own storage: not a view that holds a larger activation

    runs = tokens.batches(batches)
    if float_batches is not None:
        runs = (float_batches[i] for i, _ in enumerate(runs))
    try:
        record_inputs(gm, [group[0][0] for group in groups], runs, keep, stop_early=True)
    except _OverBudget:
        return None, size
    return stored, size


class GPTQ(AlgorithmPass):
    """Options: damp (fraction of mean(diag H) added to the diagonal, default 0.03), block_size
    (columns per lazy update, default 128), act_order (columns by decreasing H_ii, default True),
    clip_grid (0: min-max group ranges; n: search n + 1 shrink factors down to 1 - max_shrink
    per row and group, weighted by the Hessian; default 10), max_shrink (default 0.5), token_mask
    (name or position of a [batch, seq] 0/1 input, e.g. "attention_mask": the Hessians leave out
    the rows of padded positions; default "auto": the graph's attention-mask input if one reaches
    the attention scores, else every row; see `TokenRows`), bias_correction
    (default True: for a linear whose bias it owns, quantize on the covariance of the inputs,
    H - mu mu^T, and add (W - Q) mu to the bias, so the layer's mean output error on the
    calibration rows is zero and GPTQ spends nothing on the mean; linears without a bias of
    their own use H as before), refit (default False: re-solve the group scales for the final codes,
    `algorithms.gptq.refit_scales`), float_targets (default True: fit the float model's outputs,
    W x_float, rather than the float layer's output on the quantized inputs, W x: see `float_target`;
    the float runs read `QState.float_inputs` where a driver set them: `quantize_sequential` carries the float model's
    activations from stage to stage, so its codes equal the whole model's).

    The defaults differ from the paper's (damp 0.01, no act_order, min-max ranges, every row) because
    each measured better at W4 g128 (benchmarks/ptq_weight_algorithms.py): act_order and the clip
    search took all-MiniLM-L6-v2's mean cosine 0.979 -> 0.983; the token mask, bias correction and
    damp 0.03 (with the asymmetric w4a16 recipe) 0.98682 -> 0.99020 at 256 sentences; damp 0.03
    took SmolLM2-135M's perplexity 18.73 -> 18.57 (bias correction is a no-op there: no biases);
    float_targets 0.99007 -> 0.99077 on MiniLM and 18.566 -> 18.465 on SmolLM2, for more calibration
    passes (up to twice: False halves GPTQ's time) and, until the pass ends, either the float model's
    inputs to each group (recorded up front) or the float weights of the layers already quantized
    beside their quantized ones, whichever takes less memory (`state.algorithm_reports
    ["gptq_float_inputs"]` says which)."""

    name = "gptq"

    def __init__(self, damp: float = 0.03, block_size: int = 128, act_order: bool = True, clip_grid: int = 10,
                 max_shrink: float = 0.5, token_mask: str | int | None = AUTO, bias_correction: bool = True,
                 refit: bool = False, float_targets: bool = True):
        if not 0.0 < float(damp) < 1.0:
            raise RecipeError(f"gptq damp is a fraction of the mean Hessian diagonal in (0, 1), got {damp}; "
                              "0.01 is the usual value")
        if int(block_size) <= 0:
            raise RecipeError(f"gptq block_size must be a positive number of columns, got {block_size}")
        if int(clip_grid) < 0 or not 0.0 <= float(max_shrink) < 1.0:
            raise RecipeError(f"gptq clip_grid must be >= 0 and max_shrink in [0, 1), got {clip_grid}, {max_shrink}")
        check_token_mask("gptq", token_mask)
        for option, value in (("bias_correction", bias_correction), ("refit", refit),
                              ("float_targets", float_targets)):
            if not isinstance(value, bool):
                raise RecipeError(f"gptq {option} must be True or False, got {value!r}")
        super().__init__(damp=float(damp), block_size=int(block_size), act_order=bool(act_order),
                         clip_grid=int(clip_grid), max_shrink=float(max_shrink), token_mask=token_mask,
                         bias_correction=bias_correction, refit=refit, float_targets=float_targets)

    def run(self, gm: fx.GraphModule, batches: Sequence) -> dict:
        state = gm.meta[STATE]
        groups, skipped = weighted_linear_groups(gm)
        options = {k: v for k, v in self.options.items()
                   if k not in ("token_mask", "bias_correction", "float_targets")}
        tokens = TokenRows(gm, self.options["token_mask"], "gptq")
        float_targets = self.options["float_targets"]
        if float_targets and state.float_inputs is not None and len(state.float_inputs) != len(batches):
            raise CalibrationError(f"gptq float_targets: {len(state.float_inputs)} float inputs for {len(batches)} "
                                   "calibration batches; give one per batch")
        float_values: dict = {}   # target -> (get_attr node, float value) of each parameter changed so far
        # the float model's inputs to each group: recorded once up front where that takes less memory
        # than keeping the float weights for a float run per group (an LLM block on a few thousand
        # calibration tokens: 48 MB of rows against 130 MB of TinyLlama-1.1B's block weights)
        float_rows = None
        if float_targets:
            budget = float_weight_bytes(gm, groups)
            float_rows, size = recorded_float_inputs(gm, groups, batches, tokens, state.float_inputs, budget)
            state.algorithm_reports["gptq_float_inputs"] = (
                f"recorded up front: {size / 2**20:.1f} MB of inputs, not {budget / 2**20:.1f} MB of float weights"
                if float_rows is not None else
                f"a float run per group: the float weights ({budget / 2**20:.1f} MB) are kept, "
                "the inputs would take more")
        # each group's inputs are run on from the previous group's, not from the model's input
        keep = available_bytes() // 4
        tokens.check(batches)
        stops = [group[0][0] for group in groups]
        cursor = GraphCursor(gm, batches, stops, keep_bytes=keep // 2)
        float_cursor = (GraphCursor(gm, state.float_inputs or batches, stops, keep_bytes=keep // 2)
                        if float_targets and float_rows is None else None)
        report = {}
        for group in groups:
            first = group[0][0]
            acc = {"h": None, "sum": None, "rows": 0, "cross": None, "sum_float": None}
            phase = {"float": False}
            pending: list = []   # the float model's rows of the batch whose quantized run comes next
            k = get_param(gm, group[0][1]).shape[1]
            # float_targets needs W (C - H) per linear. Where the group's rows are fewer than K (a
            # down_proj: N 2048, K 5632) W (C - H) = sum (W (x_f - x)) x^T is summed as it is, [N, K],
            # and the K x K cross term C - H (254 MB in float64 at K = 5632) never exists
            weights = {node: get_param(gm, w_node).detach() for node, w_node, _ in group} if float_targets else {}
            by_product = float_targets and sum(w.shape[0] for w in weights.values()) < k
            products = {node: None for node in weights} if by_product else {}

            def accumulate(key, x, acc=acc, phase=phase, pending=pending, products=products, weights=weights):
                # float64 products: float32 inputs multiply exactly, so H does not depend (beyond
                # float64 roundoff) on how the rows are split into batches, or over ranks
                x = tokens.rows(key, x).double()
                if phase["float"]:
                    pending.append(x)
                    return
                if acc["h"] is None:
                    acc["h"] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
                    acc["sum"] = torch.zeros(x.shape[1], dtype=torch.float64)
                    if float_targets:
                        acc["sum_float"] = torch.zeros_like(acc["sum"])
                        if not by_product:
                            acc["cross"] = torch.zeros_like(acc["h"])
                acc["h"].addmm_(x.T, x)  # in place: no second K x K float64 matrix per batch
                acc["sum"].add_(x.sum(0))
                acc["rows"] += x.shape[0]
                if float_targets:
                    # first in, first out: runs alternate float, quantized (or were recorded in batch order)
                    x_float = pending.pop(0) if float_rows is None else float_rows[key].pop(0).double()
                    acc["sum_float"].add_(x_float.sum(0))
                    if by_product:
                        for node, w in weights.items():
                            products[node] = times_diff(w, x_float - x, x, products[node])
                    else:
                        acc["cross"].addmm_((x_float - x).T, x)   # C - H, summed

            inputs = cursor.inputs_to(first)
            float_inputs = float_cursor.inputs_to(first) if float_cursor is not None else None
            for batch in batches:
                tokens.select(batch)
                if float_inputs is not None:   # the float model's rows: the float weights swapped back in
                    with values_swapped(gm, float_values):
                        phase["float"] = True
                        accumulate(first.name, next(float_inputs))
                    phase["float"] = False
                accumulate(first.name, next(inputs))
            for rest in (inputs, float_inputs):   # run on to the end: each batch's stop is kept
                if rest is not None and next(rest, None) is not None:
                    raise RuntimeError("gptq: the cursor gave more inputs than there are calibration batches")
            return_freed_heap()   # the batches' activations are gone: not their heap holes beside H's work
            # sums over the ranks' shards, under torch.distributed (a rank may have seen no real token)
            for name in ("h", "cross") if float_targets and not by_product else ("h",):   # zeros only where a rank saw nothing
                acc[name] = reduce_sum(acc[name] if acc[name] is not None else torch.zeros(k, k, dtype=torch.float64))
            for name in ("sum", "sum_float") if float_targets else ("sum",):
                acc[name] = reduce_sum(acc[name] if acc[name] is not None else torch.zeros(k, dtype=torch.float64))
            for node, w in weights.items() if by_product else ():   # no loop variable keeps one (88 MB a down_proj)
                products[node] = reduce_sum(products[node] if products[node] is not None
                                            else torch.zeros(w.shape, dtype=torch.float64))
            acc["rows"] = reduce_count(acc["rows"])
            if not acc["rows"]:
                raise RecipeError("gptq: the calibration batches hold no real token (token_mask is 0 everywhere)")
            # in place, and the float64 H dropped when nothing needs it: a K x K float64 matrix is
            # 254 MB at K = 5632 (a 1B LLaMA's down_proj), the largest thing a block holds
            h64, mu = acc.pop("h").div_(acc["rows"]), acc["sum"] / acc["rows"]
            mu_float = acc["sum_float"] / acc["rows"] if float_targets else mu
            cross = acc.pop("cross").div_(acc["rows"]) if float_targets and not by_product else None
            biases = {node: own_bias(node) if self.options["bias_correction"] else None for node, _, _ in group}
            # with a bias to absorb the mean error, only the covariance is left to minimize
            centred = (h64 - torch.outer(mu, mu)).float() if any(biases.values()) else None
            targets = {}
            if weights:   # float_targets: all before any GPTQ, so C - H is freed first
                damp = self.options["damp"]
                # the plain H is factored in its own storage and read back afterwards (DampedCholesky):
                # the float64 factor and a float32 H never exist side by side
                plain = DampedCholesky(h64, damp) if not all(biases[n] is not None for n in weights) else None
                shifted = DampedCholesky(centred.double(), damp) if centred is not None else None
                for node, w in weights.items():
                    factor = shifted if biases[node] is not None else plain
                    if by_product:
                        w_cross = products.pop(node).div_(acc["rows"])
                        if biases[node] is not None:   # centred: C - H of the deviations from the means
                            w_cross -= torch.outer(w.double() @ (mu_float - mu), mu)
                        targets[node] = float_target(w.float(), factor, w_cross=w_cross)
                        del w_cross
                    else:
                        c = cross - torch.outer(mu_float - mu, mu) if biases[node] is not None else cross
                        targets[node] = float_target(w.float(), factor, cross=c)
                        del c
                factor = shifted = None   # the float64 K x K storage goes with the last reference
                cross = None
                h_plain = plain.hessian() if plain is not None else h64.float()
                del plain
            else:
                h_plain = h64.float()
            del h64
            weights.clear()
            for node, w_node, spec in group:
                w = get_param(gm, w_node).detach().float()
                bias = biases[node]
                h = centred if bias is not None else h_plain
                target = targets.pop(node, w)
                codes, scale, zp = gptq_quantize(target, h, spec, **options)
                axis, block = scale_layout(spec, w)
                qparams = stored_qparams(scale, zp, spec)
                # errors against the weight GPTQ fitted (with float_targets, V), taken before W_hat
                # exists so that V goes first: an lm_head's V, W and W_hat are 262 MB each
                rtn, ours = rtn_layer_error(target, w, spec, h), codes_layer_error(target, codes, qparams, axis, block, h)
                ref = layer_error(w, None, h)  # ||W X||^2 / rows (centered: of W (X - mu))
                float_mean = matvec64(w, mu_float) if bias is not None else None
                del target
                param = get_param(gm, w_node)
                if float_targets and float_rows is None and group is not groups[-1]:
                    # a later group's float runs swap the float values back in
                    float_values.setdefault(w_node.target, (w_node, param))
                    if bias is not None:
                        float_values.setdefault(bias.target, (bias, get_param(gm, bias)))
                    in_place = False
                else:   # W_hat over W where gm alone holds W: not a second copy of an lm_head
                    in_place = held_alone(gm, param)
                w = None
                w_hat = dequantize_weight(codes, *qparams, axis, block, torch.float32,
                                          out=param.detach() if in_place else None)
                del codes   # convert derives the codes again from w_hat
                if not in_place:
                    w_hat = w_hat.to(param.dtype)
                    set_param(gm, w_node, w_hat)
                del param
                state.weight_qparams[w_node.target] = (scale, zp)
                if bias is not None:
                    b = get_param(gm, bias).detach()
                    # the float layer's mean output on the float inputs, minus the quantized one's
                    shift = float_mean - matvec64(w_hat, mu)
                    set_param(gm, bias, (b.double() + shift).to(b.dtype))
                report[w_node.target] = dict(node=node.name, rows=acc["rows"], inputs=k, rtn_error=rtn / ref,
                                             gptq_error=ours / ref, bias_corrected=bias is not None)
            h_plain = centred = h = None   # not alive while the next group's Hessian is summed
        state.algorithm_reports["gptq"] = report
        cursors = [c for c in (cursor, float_cursor) if c is not None]
        state.algorithm_reports["gptq_runs"] = (
            f"resumed at each group: each node ran once per batch ({sum(c.peak_bytes for c in cursors) / 2**20:.0f} MB "
            "of live values at most)" if all(c.resumed for c in cursors) else
            "from the input at each group: " + "; ".join(c.reason for c in cursors if not c.resumed))
        if skipped:
            state.algorithm_reports["gptq_skipped"] = skipped
        state.algorithm_reports["gptq_token_mask"] = tokens.found
        if tokens.not_applied:
            state.algorithm_reports["gptq_token_mask_not_applied"] = sorted(tokens.not_applied)
        few = few_rows(report)
        if few:
            state.algorithm_reports["gptq_few_rows"] = few
            warnings.warn(few_rows_message(few), CalibrationWarning, stacklevel=2)
        better = sum(r["gptq_error"] <= r["rtn_error"] for r in report.values())
        return {"layers": len(report), "better than RTN": better, "skipped": len(skipped)}
