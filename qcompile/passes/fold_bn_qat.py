"""Simulate BatchNorm folding during QAT (the "fold" of Jacob et al. 2018, as torch.ao does it).

`conv -> batch_norm` (or `linear -> batch_norm`) becomes

    w_fold = qc_bnfold_<i>_weight(w)          # w * gamma / sqrt(running_var + eps)
    y      = conv(x, w_fold, None)            # weight fake-quant goes on w_fold (insert_fake_quant)
    out    = qc_bnfold_<i>(y)                 # BN correction, see FoldedBatchNorm

so the weight that is fake-quantized is the folded weight that `convert` will quantize, while
BatchNorm keeps normalizing with batch statistics and updating its running statistics in
training. After `freeze_bn`, and in eval mode, the output is exactly `conv(x, w_fold) + b_fold`,
the folded conv that `convert` materializes (finalize_qat.py): QAT eval accuracy is the
converted model's accuracy. The same checks as fold_bn decide which pairs are folded.
"""
from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from ..graph import FROM_PASS, get_param
from .base import Pass, PassResult
from .convert_qdq import ConvertToQDQ
from .fold_bn import FoldBatchNorm

BN_FOLD_PREFIX = "qc_bnfold_"


class BatchNormFoldState(nn.Module):
    """The BatchNorm's parameters and statistics, plus the conv bias it absorbs."""

    def __init__(self, gamma, beta, mean, var, eps: float, momentum: float, bias: Tensor | None, channels: int):
        super().__init__()
        self.weight = nn.Parameter(gamma.detach().clone() if gamma is not None else torch.ones(channels))
        self.bias = nn.Parameter(beta.detach().clone() if beta is not None else torch.zeros(channels))
        self.conv_bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.register_buffer("running_mean", mean.detach().clone())
        self.register_buffer("running_var", var.detach().clone())
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.register_buffer("frozen", torch.tensor(False))
        self.eps, self.momentum = float(eps), momentum

    def factor(self) -> Tensor:
        """gamma / sqrt(running_var + eps): the per-output-channel scale folded into the weight."""
        return self.weight * torch.rsqrt(self.running_var + self.eps)

    def folded_bias(self) -> Tensor:
        b = self.conv_bias if self.conv_bias is not None else torch.zeros_like(self.running_mean)
        return (b - self.running_mean) * self.factor() + self.bias


def _per_channel(t: Tensor, ndim: int, axis: int) -> Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


class FoldedWeight(nn.Module):
    def __init__(self, state: BatchNormFoldState):
        super().__init__()
        self.state = state

    def forward(self, w: Tensor) -> Tensor:
        return w * _per_channel(self.state.factor(), w.ndim, 0)


class FoldedBatchNorm(nn.Module):
    """Training (not frozen): y / factor + conv_bias, then BatchNorm with batch statistics, which
    also updates the running statistics. Eval or frozen: y + folded bias (running statistics)."""

    def __init__(self, state: BatchNormFoldState):
        super().__init__()
        self.state = state

    def forward(self, y: Tensor) -> Tensor:
        st = self.state
        if self.training and not bool(st.frozen):
            unscaled = y / _per_channel(st.factor(), y.ndim, 1)
            if st.conv_bias is not None:
                unscaled = unscaled + _per_channel(st.conv_bias, y.ndim, 1)
            st.num_batches_tracked += 1
            momentum = st.momentum if st.momentum is not None else 1.0 / float(st.num_batches_tracked)
            # batch_norm updates the statistics it is given; autograd saves them, so hand it copies
            # and write the copies back (averaged across ranks) instead of mutating saved tensors.
            mean, var = st.running_mean.clone(), st.running_var.clone()
            out = nn.functional.batch_norm(unscaled, mean, var, st.weight, st.bias,
                                           training=True, momentum=momentum, eps=st.eps)
            with torch.no_grad():
                st.running_mean.copy_(mean)
                st.running_var.copy_(var)
            _average_across_ranks(st.running_mean, st.running_var)
            return out
        return y + _per_channel(st.folded_bias(), y.ndim, 1)


def _average_across_ranks(*buffers: Tensor) -> None:
    """Under DDP each rank normalizes with its own batch (as plain BatchNorm does) but the running
    statistics, which the folded weight is built from, are averaged so every rank converts alike."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for b in buffers:
        dist.all_reduce(b)
        b /= dist.get_world_size()


def is_folded_weight(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and node.target.startswith(BN_FOLD_PREFIX) \
        and node.target.endswith("_weight")


def is_folded_batch_norm(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and node.target.startswith(BN_FOLD_PREFIX) \
        and not node.target.endswith("_weight")


class FoldBatchNormForQAT(Pass):
    name = "fold_bn_qat"

    def call(self, gm: fx.GraphModule) -> PassResult:
        pairs, reasons = FoldBatchNorm().candidates(gm)
        for index, (producer, bn) in enumerate(pairs):
            self._simulate_fold(gm, producer, bn, index)
        folded = len(pairs)
        skipped = {f"skipped: {reason}": n for reason, n in reasons.items()}
        if folded:
            gm.graph.eliminate_dead_code()
            # The BatchNorm parameters and conv biases now live in the fold modules; leaving the
            # originals would hand optimizers (and DDP's unused-parameter check) dead parameters.
            ConvertToQDQ._drop_unused_attributes(gm)
        return PassResult(gm, modified=folded > 0, stats={"conv/linear + batch_norm": folded, **skipped})

    def _simulate_fold(self, gm: fx.GraphModule, producer: fx.Node, bn: fx.Node, index: int) -> None:
        weight_node = producer.args[1]
        bias_node = producer.args[2] if len(producer.args) > 2 else None
        gamma, beta, mean, var = (get_param(gm, a) if a is not None else None for a in bn.args[1:5])
        momentum, eps = bn.args[6], bn.args[7]
        bias = get_param(gm, bias_node) if bias_node is not None else None
        state = BatchNormFoldState(gamma, beta, mean, var, eps, momentum, bias, mean.numel())
        name = f"{BN_FOLD_PREFIX}{index}"
        gm.add_submodule(name, FoldedBatchNorm(state))
        gm.add_submodule(name + "_weight", FoldedWeight(state))
        with gm.graph.inserting_before(producer):
            w_fold = gm.graph.call_module(name + "_weight", (weight_node,))
        with gm.graph.inserting_after(producer):
            post = gm.graph.call_module(name, (producer,))
        for node, like in ((w_fold, weight_node), (post, bn)):
            node.meta.update({k: like.meta[k] for k in ("val", "nn_module_stack") if k in like.meta})
            node.meta[FROM_PASS] = self.name
        args = list(producer.args) + [None] * (3 - len(producer.args))
        args[1], args[2] = w_fold, None
        producer.args = tuple(args)
        bn.replace_all_uses_with(post)
        post.args = (producer,)
        gm.graph.erase_node(bn)
