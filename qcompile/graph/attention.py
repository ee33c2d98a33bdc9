"""The attention pattern of a captured graph, found structurally (not by module names).

    scores = matmul(Q, K^T)                      K^T: transpose / permute of the last two dims of K
             [* c | / c] ...                     scalings by Python or 0-d constants
             [+ mask] ...                        additive masks that depend on neither Q nor K
    P      = softmax(scores, dim=-1)             [dropout in eval, a same-dtype cast, clone]
    out    = matmul(P, V)

`find_attention(graph)` returns one `AttentionMatch` per P x V matmul whose first operand comes
from a softmax: `reason` is None when the pattern holds, else why this attention is not the
pattern (custom score arithmetic, a softmax over another dim, ...), for the reports. HF BERT's and
LLaMA's eager attention match as captured; `aten.scaled_dot_product_attention` matches after
passes/decompose_sdpa.py rewrote it into these ops.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from .nodes import MATMUL, is_op, tensor_val

aten = torch.ops.aten
QOPS = torch.ops.qcompile

SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
SCALE_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
MASK_ADD = {aten.add.Tensor}
# Between softmax and the P x V matmul: ops that leave the probabilities as they are in eval.
PROBS_PASS = {aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
              aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}
TRANSPOSES = {aten.transpose.int, aten.permute.default, aten.t.default}


@dataclass
class AttentionMatch:
    pv: fx.Node                                   # the P x V matmul
    softmax: fx.Node | None = None
    qk: fx.Node | None = None                     # the Q x K^T matmul
    scale: float = 1.0                            # product of the constant scalings of the scores
    masks: list = field(default_factory=list)     # additive mask nodes, in the order they are added
    score_ops: list = field(default_factory=list)  # the nodes between qk and softmax, in order
    reason: str | None = None                      # None: the pattern holds

    @property
    def query(self) -> fx.Node:
        return self.qk.args[0]

    @property
    def key_t(self) -> fx.Node:
        return self.qk.args[1]

    @property
    def probs(self) -> fx.Node:
        return self.pv.args[0]

    @property
    def value(self) -> fx.Node:
        return self.pv.args[1]


def _constant(arg, constants) -> float | None:
    """A Python number, or a one-element constant tensor (get_attr) resolved by `constants`."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    if isinstance(arg, fx.Node) and arg.op == "get_attr" and constants is not None:
        t = constants(arg)
        if isinstance(t, torch.Tensor) and t.numel() == 1 and t.is_floating_point():
            return float(t)
    return None


def _is_last_two_swap(node: fx.Node) -> bool:
    val = tensor_val(node)
    if not is_op(node, TRANSPOSES) or val is None or val.dim() < 2:
        return False
    rank = val.dim()
    if node.target == aten.t.default:
        return rank == 2
    if node.target == aten.transpose.int:
        return {d % rank for d in node.args[1:3]} == {rank - 2, rank - 1}
    return [d % rank for d in node.args[1]] == list(range(rank - 2)) + [rank - 1, rank - 2]


def _reaches_matmul(node, depth: int = 16) -> bool:
    """Whether `node` is, through scalings and adds, the output of a matmul (the scores' side)."""
    if depth == 0 or not isinstance(node, fx.Node):
        return False
    if is_op(node, MATMUL):
        return True
    if is_op(node, SCALE_OPS | MASK_ADD):
        return any(_reaches_matmul(a, depth - 1) for a in node.args[:2])
    return False


def _depends_on(node: fx.Node, target: fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is target:
            return True
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return False


def strip_qdq(node):
    """x for dequantize(quantize(x, ...)) (the reference graph's Q/DQ pair on an edge), else node."""
    if is_op(node, {QOPS.dequantize.default}) and isinstance(node.args[0], fx.Node) and \
            is_op(node.args[0], {QOPS.quantize.default}):
        return node.args[0].args[0]
    return node


def match_attention(pv: fx.Node, constants=None, through_qdq: bool = False) -> AttentionMatch | None:
    """The pattern ending at `pv`, or None when `pv` is not a matmul of softmax probabilities of
    Q x K^T. `constants(get_attr node) -> tensor` resolves 0-d constant scalings (optional);
    `through_qdq`: the matmul operands may be Q/DQ pairs (a reference QDQ graph)."""
    if not is_op(pv, MATMUL) or not all(isinstance(a, fx.Node) for a in pv.args[:2]):
        return None
    operand = strip_qdq if through_qdq else (lambda n: n)
    m = AttentionMatch(pv=pv)
    p = operand(pv.args[0])
    while is_op(p, PROBS_PASS):
        before, after = tensor_val(p.args[0]), tensor_val(p)
        if p.target == aten.dropout.default and len(p.args) > 2 and p.args[2]:
            m.reason = "dropout on the probabilities is in training mode"
            return m
        if before is None or after is None or before.dtype != after.dtype:
            return None
        p = p.args[0]
    if not is_op(p, SOFTMAX):
        return None
    m.softmax = p
    # walk the scores back from softmax to the Q x K^T matmul
    s, chain = p.args[0], []
    while isinstance(s, fx.Node) and not is_op(s, MATMUL):
        if is_op(s, SCALE_OPS):
            c = _constant(s.args[1], constants) if len(s.args) > 1 else None
            if c is None or not _reaches_matmul(s.args[0]):
                if not _reaches_matmul(s):
                    return None
                m.reason = (f"custom score arithmetic: {s.name} ({_name(s)}) scales the scores by a tensor, not a "
                            "constant; the integer kernels take one constant scale and additive masks")
                return m
            m.scale *= (1.0 / c) if s.target in (aten.div.Tensor, aten.div.Scalar) else c
            chain.append(s)
            s = s.args[0]
        elif is_op(s, MASK_ADD) and all(isinstance(a, fx.Node) for a in s.args[:2]) and (len(s.args) < 3 and
                                                                                        s.kwargs.get("alpha", 1) == 1):
            sides = [a for a in s.args[:2] if _reaches_matmul(a)]
            if not sides:
                return None
            chain.append(s)
            s = sides[0]
        else:
            if not _reaches_matmul(s):
                return None
            m.reason = (f"custom score arithmetic: {s.name} ({_name(s)}) between Q x K^T and softmax is "
                        "neither a constant scale nor an additive mask")
            return m
    if not is_op(s, MATMUL) or not (isinstance(s.args[1], fx.Node) and _is_last_two_swap(operand(s.args[1]))):
        return None   # probabilities times something that is not softmax(Q x K^T): not attention
    m.qk = s
    m.score_ops = list(reversed(chain))
    dim = p.args[1] if len(p.args) > 1 else -1
    val = tensor_val(p)
    if val is None or dim % val.dim() != val.dim() - 1:
        m.reason = f"softmax over dim {dim}, not the last (keys) dim"
        return m
    for n in [m.qk] + m.score_ops:
        if len(n.users) > 1:
            m.reason = f"the scores ({n.name}) are read outside the attention pattern"
            return m
    on_path = set(m.score_ops) | {m.qk}
    for op in m.score_ops:
        if not is_op(op, MASK_ADD):
            continue
        a, b = op.args[:2]
        if a in on_path and b in on_path:
            m.reason = f"custom mask arithmetic: {op.name} adds the scores to themselves"
            return m
        mask = b if a in on_path else a
        if _depends_on(mask, m.qk):
            m.reason = f"custom mask arithmetic: the mask added at {op.name} is computed from the scores"
            return m
        mv, sv = tensor_val(mask), tensor_val(op)
        if mv is None or not mv.is_floating_point() or sv is None or tuple(torch.broadcast_shapes(mv.shape, sv.shape)) != tuple(sv.shape):
            m.reason = f"the mask added at {op.name} is not a float tensor that broadcasts to the scores"
            return m
        m.masks.append(mask)
    return m


def _name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def find_attention(graph: fx.Graph, constants=None, through_qdq: bool = False) -> list[AttentionMatch]:
    """Every P x V matmul of softmax probabilities, in graph order, matched or with its reason."""
    out = []
    for node in graph.nodes:
        m = match_attention(node, constants, through_qdq)
        if m is not None:
            out.append(m)
    return out
