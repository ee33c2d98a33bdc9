"""Each pass on a tiny exported model: a positive case with op counts, one negative case per skip
reason, numerics against the graph before the pass, and the graph verifier."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

import qcompile as qc
from qcompile.capture import capture
from qcompile.graph import ANNOTATION, STATE
from qcompile.passes import (
    Annotate, ConvertToQDQ, FoldBatchNorm, InsertObservers, PassManager, ShareQParams, op_counts, verify_graph,
)
from qcompile.state import QState

aten = torch.ops.aten


def targets(gm) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def captured(model, x, recipe="w8a8"):
    gm = capture(model, (x,))
    gm.meta[STATE] = QState(recipe=qc.recipes[recipe] if isinstance(recipe, str) else recipe)
    return gm


def random_bn(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


class ConvBN(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.bn = random_bn(nn.BatchNorm2d(conv.out_channels) if isinstance(conv, nn.Conv2d) else nn.BatchNorm1d(conv.out_channels))

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


# ---------------------------------------------------------------- fold_bn

@pytest.mark.parametrize("conv, shape", [
    (nn.Conv2d(3, 8, 3, padding=1), (2, 3, 9, 9)),
    (nn.Conv2d(3, 8, 3, padding=1, bias=False), (2, 3, 9, 9)),
    (nn.Conv1d(4, 6, 3), (2, 4, 11)),
])
def test_fold_bn_conv_removes_bn_and_matches_float(conv, shape):
    torch.manual_seed(0)
    model, x = ConvBN(conv).eval(), torch.randn(shape)
    gm = captured(model, x)
    before = gm(x)
    result = FoldBatchNorm()(gm)
    gm.recompile()
    verify_graph(gm)
    assert result.modified and result.stats["folded"] == 1
    assert targets(gm)[aten.batch_norm.default] == 0
    conv_op = aten.conv2d.default if isinstance(conv, nn.Conv2d) else aten.conv1d.default
    assert targets(gm)[conv_op] == 1
    torch.testing.assert_close(gm(x), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


class LinearBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 7)
        self.bn = random_bn(nn.BatchNorm1d(7))

    def forward(self, x):
        return self.bn(self.fc(x))


def test_fold_bn_linear_2d_folds():
    torch.manual_seed(0)
    model, x = LinearBN().eval(), torch.randn(4, 5)
    gm = captured(model, x)
    assert FoldBatchNorm()(gm).stats["folded"] == 1
    gm.recompile()
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_linear_bn_fusion_skipped_for_3d_input():
    """torchao #4116: BatchNorm1d on [B, C, L] normalizes dim 1, not the linear's features."""
    model = nn.Sequential(nn.Linear(5, 5), random_bn(nn.BatchNorm1d(3))).eval()
    x = torch.randn(2, 3, 5)
    gm = captured(model, x)
    result = FoldBatchNorm()(gm)
    assert not result.modified
    assert result.stats == {"folded": 0, "skipped: linear on >2-D input": 1}
    assert targets(gm)[aten.batch_norm.default] == 1


class ProducerWithTwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 1), random_bn(nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), random_bn(nn.BatchNorm2d(4))

    def forward(self, x):
        return self.bn(self.conv(x)) + nn.functional.conv2d(x, self.conv.weight)


@pytest.mark.parametrize("model, reason", [
    (ProducerWithTwoUsers(), "producer has other users"),
    (SharedWeight(), "weight shared or not a constant"),
])
def test_fold_bn_skips(model, reason):
    x = torch.randn(2, model.conv.in_channels, 5, 5)
    gm = captured(model.eval(), x)
    before = gm(x)
    result = FoldBatchNorm()(gm)
    assert not result.modified and result.stats[f"skipped: {reason}"] == 1
    gm.recompile()
    assert targets(gm)[aten.batch_norm.default] == 1
    torch.testing.assert_close(gm(x), before, atol=0, rtol=0)


def test_fold_bn_skips_training_mode_batch_norm():
    model = ConvBN(nn.Conv2d(2, 4, 1)).train()
    x = torch.randn(2, 2, 4, 4)
    ep = torch.export.export(model, (x,), strict=False).module()  # captured in train mode on purpose
    ep.meta[STATE] = QState(recipe=qc.recipes["w8a8"])
    result = FoldBatchNorm()(ep)
    assert result.stats.get("skipped: batch_norm in training mode") == 1 and not result.modified


# ---------------------------------------------------------------- annotate / share / observe / convert

class Block(nn.Module):
    """conv -> relu, residual add, cat, max-pool, flatten, linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(8 * 2 * 2, 3)

    def forward(self, x):
        y = torch.relu(self.a(x))
        z = y + torch.relu(self.b(y))
        c = torch.cat([z, y], 1)
        return self.fc(nn.functional.max_pool2d(c, 2).flatten(1))


def annotated(recipe="w8a8"):
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 1, 4, 4)
    gm = captured(model, x, recipe)
    Annotate(gm.meta[STATE].recipe)(gm)
    return model, x, gm


def test_annotate_w8a8_covers_every_family():
    _, _, gm = annotated()
    reasons = Counter(n.meta[ANNOTATION].reason for n in gm.graph.nodes if ANNOTATION in n.meta)
    # 2 convs, 1 linear, the residual add, the cat, and max-pool + flatten sharing with their inputs
    assert reasons == {"conv2d": 2, "linear": 1, "add": 1, "cat": 1, "shared with input": 2}
    weights = [n for n in gm.graph.nodes if ANNOTATION in n.meta and n.meta[ANNOTATION].weight]
    assert len(weights) == 3


class PreLNBlock(nn.Module):
    """A pre-LN transformer MLP block twice (LLaMA-style residual stream: add after add, each read
    by a LayerNorm), then a final LayerNorm."""

    def __init__(self, d=16):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3))
        self.up = nn.ModuleList(nn.Linear(d, 2 * d) for _ in range(2))
        self.down = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(2))

    def forward(self, x):
        for i in range(2):
            x = x + self.down[i](torch.relu(self.up[i](self.norms[i](x))))
        return self.norms[2](x)


def test_pre_ln_residual_adds_stay_float():
    # the second add reads an add and a linear (the region rule's inputs) but feeds only a
    # LayerNorm: quantizing it would put the residual stream on one per-tensor scale
    gm = captured(PreLNBlock().eval(), torch.randn(2, 5, 16))
    Annotate(gm.meta[STATE].recipe)(gm)
    reasons = Counter(n.meta[ANNOTATION].reason for n in gm.graph.nodes if ANNOTATION in n.meta)
    assert reasons == {"linear": 4}


def test_annotate_respects_exclude_and_weight_only():
    _, _, gm = annotated(qc.recipes["w8a8"].replace(exclude=("b",)))
    assert not any(ANNOTATION in n.meta for n in gm.graph.nodes if n.target == aten.conv2d.default and n.meta[
        "nn_module_stack"] and list(n.meta["nn_module_stack"].values())[-1][0] == "b")
    _, _, gm = annotated("w8a16")
    anns = [n.meta[ANNOTATION] for n in gm.graph.nodes if ANNOTATION in n.meta]
    assert len(anns) == 3 and all(a.inputs == {} and a.output is None for a in anns)


def test_share_qparams_groups_cat_pool_and_linear_input():
    _, _, gm = annotated()
    ShareQParams()(gm)
    groups = gm.meta[STATE].groups
    # conv a input | relu(a) read by conv b and the add (one tensor, quantized once) | the add's
    # other input | add out + cat in/out + pool + flatten + fc input
    assert len(groups) == 4
    shared_input = [g for g in groups if len(g.members) == 2]
    assert len(shared_input) == 1 and {m[1].split("_")[0] for m in shared_input[0].members} == {"conv2d", "add"}
    big = max(groups, key=lambda g: len(g.members))
    kinds = Counter((m[0], m[1].split("_")[0]) for m in big.members)
    assert kinds[("out", "add")] == 1 and kinds[("out", "cat")] == 1 and kinds[("in", "linear")] == 1


def test_insert_observers_and_convert_counts_and_error_bound():
    model, x, gm = annotated()
    ShareQParams()(gm)
    InsertObservers()(gm)
    gm.recompile()
    counts = op_counts(gm)
    # conv a in, relu(a) once for conv b and the add, the add's other input, add out, cat in (relu
    # branch), cat out; max-pool and flatten keep values on the cat's grid, which the linear reads
    assert counts["HistogramObserver"] == 6
    assert len(gm.meta[STATE].observers) == 4
    for _ in range(3):
        gm(torch.randn_like(x))
    gm(x)
    ConvertToQDQ()(gm)
    gm.recompile()
    verify_graph(gm)
    t = targets(gm)
    q, dq = torch.ops.qcompile.quantize.default, torch.ops.qcompile.dequantize.default
    assert t[q] == 6 and t[dq] == 6 + 3  # activations, plus one dequantize per weight
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    # 8-bit activations and weights through 3 layers: SQNR well above 30 dB (a wrong zero point or
    # scale layout drops it below 10 dB).
    ref, out = model(x), gm(x)
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())
    assert sqnr > 30, sqnr


def test_pass_manager_records_time_stats_and_changes():
    torch.manual_seed(0)
    model, x = ConvBN(nn.Conv2d(1, 2, 3)).eval(), torch.randn(1, 1, 5, 5)
    gm = captured(model, x)
    pm = PassManager([FoldBatchNorm(), Annotate(gm.meta[STATE].recipe), ShareQParams(), InsertObservers()])
    pm(gm)
    assert [r.name for r in pm.records] == ["fold_bn", "annotate", "share_qparams", "insert_observers"]
    assert pm.records[0].changes() == "-1 aten.batch_norm"
    assert pm.records[2].modified is False
    assert all(r.seconds >= 0 for r in pm.records)


def test_quantize_outputs_observes_after_the_fused_activation():
    """With quantize_outputs, linear -> relu is one unit: the output QDQ sits after the ReLU,
    never between the GEMM and its activation (which backends fuse into the epilogue)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(4, 8)
    prepared = qc.prepare(model, x, recipe=qc.recipes["w8a8"].replace(quantize_outputs=True))
    qc.calibrate(prepared, [torch.randn(4, 8) for _ in range(4)], progress=False)
    quantized = qc.convert(prepared)
    relu = next(n for n in quantized.graph.nodes if n.target == aten.relu.default)
    assert relu.args[0].target == aten.linear.default                      # nothing between
    assert [u.target for u in relu.users] == [torch.ops.qcompile.quantize.default]
    # the second linear reads the ReLU's QDQ directly (one group), and its own output is observed
    second = [n for n in quantized.graph.nodes if n.target == aten.linear.default][1]
    assert second.args[0].args[0].args[0] is relu
    assert targets(quantized)[torch.ops.qcompile.quantize.default] == 3   # input, relu out, output


def test_w4a16_group_wise_weights_with_k_not_a_multiple_of_the_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 24)).eval()      # K = 200: groups of 128 and 72
    x = torch.randn(3, 200)
    quantized = qc.convert(qc.prepare(model, x, recipe="w4a16"))
    dq = next(n for n in quantized.graph.nodes if n.target == torch.ops.qcompile.dequantize.default)
    codes, scale = getattr(quantized, dq.args[0].target), getattr(quantized, dq.args[1].target)
    assert codes.dtype == torch.int8 and codes.shape == (24, 200)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert scale.shape == (24, 2) and tuple(dq.args[3:5]) == (-1, 128)   # [N, ceil(K / group)]
    w = model[0].weight.detach()
    step = scale.repeat_interleave(128, dim=1)[:, :200]
    zero_point = getattr(quantized, dq.args[2].target)
    err = (torch.ops.qcompile.dequantize(codes, scale, zero_point, -1, 128, torch.float32) - w).abs()
    assert bool((err <= step / 2 + 1e-7).all())           # round to nearest: half a step at most
    # asymmetric groups: each group's min and max land on codes -8 and 7, so the scale and zero point
    # are the group's own, not the row's
    for group in (codes[:, :128], codes[:, 128:]):
        assert (group.amin(1) == -8).all() and (group.amax(1) == 7).all()


def test_dynamic_per_token_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 5, 16)
    quantized = qc.convert(qc.prepare(model, x, recipe="w8a8-dynamic"))
    t = targets(quantized)
    assert t[torch.ops.qcompile.choose_qparams_per_token.default] == 2
    assert t[torch.ops.qcompile.quantize.default] == 2
    assert t[torch.ops.qcompile.dequantize.default] == 4
    # per-token: each row's error is bounded by its own step, so a row 1000x larger elsewhere
    # does not change this row's result
    x2 = x.clone()
    x2[0, 0] *= 1000
    assert torch.equal(quantized(x)[1], quantized(x2)[1])
