"""Op families of the captured (pre-dispatch ATen) graph, node predicates and parameter access."""
from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

LINEAR = {aten.linear.default}
CONV = {aten.conv1d.default, aten.conv2d.default}
WEIGHTED = LINEAR | CONV
MATMUL = {aten.matmul.default, aten.bmm.default, aten.mm.default}
ADD = {aten.add.Tensor}
MUL = {aten.mul.Tensor}
CAT = {aten.cat.default}
EMBEDDING = {aten.embedding.default}
# Pointwise activations that keep a tensor in the integer region of a CNN (annotate.py looks through
# them); the in-place forms are rewritten to these by passes/functionalize_inplace.py.
ACTIVATIONS = {aten.relu.default, aten.relu_.default, aten.gelu.default, aten.silu.default, aten.silu_.default,
               aten.hardtanh.default, aten.hardswish.default}


def activation_name(node: fx.Node) -> str | None:
    """The name a recipe's `fused_activations` uses for this node ("relu", "relu6", "gelu",
    "silu"), or None. relu6 is hardtanh(x, 0, 6) (nn.ReLU6): a clip the runtimes fuse like ReLU."""
    if node.op != "call_function":
        return None
    if node.target in (aten.relu.default, aten.relu_.default):
        return "relu"
    if node.target in (aten.silu.default, aten.silu_.default):
        return "silu"
    if node.target is aten.gelu.default:
        return "gelu"
    if node.target is aten.hardtanh.default:
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        return "relu6" if lo == 0 else None
    return None
AVG_POOL = {
    aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
    aten.avg_pool1d.default, aten.avg_pool2d.default,
}
POOL = AVG_POOL | {aten.max_pool1d.default, aten.max_pool2d.default}
# Ops whose output takes the qparams of their input: they move or select values, never make new ones.
# Average pools make new values: annotate.py gives their output its own observer. Sharing the input's scale made the mean of
# 16 codes land on exact .5 ties (sum = 8 mod 16), where float summation order decided the code:
# onnxruntime and the reference then disagreed on 0.1% of the digits CNN's pooled codes; with its
# own (narrower) range the step is finer and ties are not systematic (100% equal codes).
RESHAPE = {
    aten.view.default, aten.reshape.default, aten.flatten.using_ints, aten.permute.default,
    aten.transpose.int, aten.squeeze.dim, aten.unsqueeze.default, aten.contiguous.default,
    aten.max_pool1d.default, aten.max_pool2d.default, aten.dropout.default,
}
SHARE_WITH_INPUT = RESHAPE | POOL


def is_op(node: fx.Node, targets) -> bool:
    return node.op == "call_function" and node.target in targets


def tensor_val(node) -> torch.Tensor | None:
    """The fake tensor `torch.export` recorded for a node's output, if it is one tensor."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def module_name(node: fx.Node) -> str:
    """Dotted name of the innermost nn.Module that produced `node` ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return path


def get_param(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    assert node.op == "get_attr", node
    return _resolve(gm, node.target)


def reaches(node: fx.Node, through, found) -> bool:
    """Whether some user of `node`, following users only through ops in `through` (a set of op
    targets, or a predicate on the user), satisfies `found(user, producer)` (producer: the node
    whose output the user reads)."""
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop()
        for user in current.users:
            if user in seen:
                continue
            seen.add(user)
            if found(user, current):
                return True
            if through(user) if callable(through) else is_op(user, through):
                frontier.append(user)
    return False


def held_alone(gm: fx.GraphModule, w: torch.Tensor) -> bool:
    """Whether `w` is a whole storage that no other parameter or buffer of gm reads (a tied weight):
    a pass may then write a weight's new value over the old one (gm owns its tensors: prepare copied
    the user's model; the sequential driver read its block into memory of its own)."""
    storage = w.untyped_storage()
    if not w.is_contiguous() or w.storage_offset() or storage.nbytes() != w.numel() * w.element_size():
        return False
    tensors = [t for _, t in gm.named_parameters(remove_duplicate=False)] + \
              [t for _, t in gm.named_buffers(remove_duplicate=False)]
    return sum(t.untyped_storage().data_ptr() == storage.data_ptr() for t in tensors) == 1


def set_param(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor) -> None:
    """Store `value` under the get_attr node's target, as a parameter when the old one was.

    `value` is stored as given, not copied: the passes hand over a tensor they just computed (a
    copy here held an lm_head's weight three times while SmoothQuant rescaled it)."""
    owner_path, _, attr = node.target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = getattr(owner, attr, None)
    if isinstance(old, torch.nn.Parameter):
        value = torch.nn.Parameter(value.detach(), requires_grad=old.requires_grad)
        setattr(owner, attr, value)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)


def _resolve(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
