"""Attention in a captured graph, found structurally (not by module names): the pattern

    scores = matmul(Q, K^T)                      K^T: transpose / permute of the last two dims of K
             [* c | / c] ...                     scalings by Python or 0-d constants
             [+ mask] ...                        additive masks that depend on neither Q nor K
    P      = softmax(scores, dim=-1)             [dropout in eval, a same-dtype cast, clone]
    out    = matmul(P, V)

and the model inputs that mask its scores.

`scores_product(node)` is the one definition of "attention scores" here: the Q x K^T matmul that a
node is, through scalings, masks (add, sub, where, masked_fill) and reshapes. `find_attention(graph)`
returns one `AttentionMatch` per P x V matmul whose first operand comes from a softmax of such
scores: `reason` is None when the pattern holds, else why this attention is not the pattern
(custom score arithmetic, a softmax over another dim, ...), for the reports. HF BERT's and
LLaMA's eager attention match as captured; `aten.scaled_dot_product_attention` matches after
passes/decompose_sdpa.py rewrote it into these ops.

`attention_mask_inputs(gm)` finds an attention mask by its role, not its name: a [batch, seq] input
whose values flow, through casts, broadcasts, indexing and elementwise ops (never through a linear,
a matmul or an embedding), into an op that combines them with attention scores (an add, where or
masked_fill whose other operand is `scores_product` of something, or scaled_dot_product_attention's
attn_mask). transformers' BERT, LLaMA and friends build their masks that way from `attention_mask`.
Boolean inputs are left out: PyTorch's own convention for them (nn.MultiheadAttention's
key_padding_mask) marks padding with True, the opposite of transformers' 1 for a real token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from .nodes import MATMUL, RESHAPE, WEIGHTED, is_op, reaches, tensor_val

aten = torch.ops.aten
QOPS = torch.ops.qcompile

SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
SCALE_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
MASK_ADD = {aten.add.Tensor}
# Ops that apply a mask to the scores (the pattern takes the additive ones), and which of their
# arguments are the scores' side.
APPLIES_MASK = {aten.add.Tensor: (0, 1), aten.sub.Tensor: (0, 1), aten.where.self: (1, 2),
                aten.masked_fill.Scalar: (0,), aten.masked_fill.Tensor: (0,)}
SCORE_COPIES = RESHAPE | {aten.clone.default, aten.contiguous.default}
SDPA = {aten.scaled_dot_product_attention.default}
# Ops a mask does not flow through on its way to the scores: they mix it with weights or only read its shape.
NOT_MASK_PATH = WEIGHTED | MATMUL | {aten.embedding.default, aten.sym_size.int, aten._assert_tensor_metadata.default}
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


def scores_product(node, operand=None, depth: int = 16) -> fx.Node | None:
    """The Q x K^T matmul that `node` is, through scalings, masks and reshapes/copies, else None.
    Q x K^T: a matmul of two activations whose second operand swaps the last two dims (K^T).
    `operand` maps a matmul operand to what it stands for (strip_qdq in a reference QDQ graph)."""
    if depth == 0 or not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if is_op(node, MATMUL):
        a, b = ((operand or (lambda n: n))(x) for x in node.args[:2])
        activations = all(isinstance(x, fx.Node) and x.op != "get_attr" for x in (a, b))
        return node if activations and _is_last_two_swap(b) else None
    if is_op(node, SCALE_OPS):
        sides = node.args[:2] if node.target == aten.mul.Tensor else node.args[:1]
    elif is_op(node, set(APPLIES_MASK)):
        sides = [node.args[i] for i in APPLIES_MASK[node.target] if i < len(node.args)]
    elif is_op(node, SCORE_COPIES):
        sides = node.args[:1]
    else:
        return None
    for side in sides:
        found = scores_product(side, operand, depth - 1)
        if found is not None:
            return found
    return None


def _reaches_matmul(node, operand=None) -> bool:
    return scores_product(node, operand) is not None


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
            if c is None or not _reaches_matmul(s.args[0], operand):
                if not _reaches_matmul(s, operand):
                    return None
                m.reason = (f"custom score arithmetic: {s.name} ({_name(s)}) scales the scores by a tensor, not a "
                            "constant; the integer kernels take one constant scale and additive masks")
                return m
            m.scale *= (1.0 / c) if s.target in (aten.div.Tensor, aten.div.Scalar) else c
            chain.append(s)
            s = s.args[0]
        elif is_op(s, MASK_ADD) and all(isinstance(a, fx.Node) for a in s.args[:2]) and (len(s.args) < 3 and
                                                                                        s.kwargs.get("alpha", 1) == 1):
            sides = [a for a in s.args[:2] if _reaches_matmul(a, operand)]
            if not sides:
                return None
            chain.append(s)
            s = sides[0]
        else:
            if not _reaches_matmul(s, operand):
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


# ---------------------------------------------------------------- the inputs that mask the scores

def is_attention_scores(node) -> bool:
    """Whether `node` is, through scalings, masks or reshapes, a Q x K^T product (scores_product)."""
    return scores_product(node) is not None


def _applies_to_scores(user: fx.Node, producer: fx.Node) -> bool:
    if is_op(user, SDPA):
        mask = user.args[3] if len(user.args) > 3 else user.kwargs.get("attn_mask")
        return mask is producer
    if is_op(user, set(APPLIES_MASK)):
        return any(a is not producer and is_attention_scores(a) for a in user.args if isinstance(a, fx.Node))
    return False


def _mask_path(node: fx.Node) -> bool:
    return node.op == "call_function" and not is_op(node, NOT_MASK_PATH)


def attention_mask_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """The placeholders that are [batch, seq] integer or float masks applied to attention scores."""
    found = []
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if not isinstance(val, torch.Tensor) or val.ndim != 2 or val.dtype == torch.bool or val.is_complex():
            continue
        if reaches(node, _mask_path, _applies_to_scores):
            found.append(node)
    return found
