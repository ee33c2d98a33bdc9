"""NF4 with double quantization: the published levels, the block round trip against a float64
reference, the packed layout, and the `nf4` recipe end to end (dequantize_nf4 op, exact codes)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qcompile as qc
from qcompile.algorithms.nf4 import NF4_LEVELS, dequantize_nf4_math, quantize_nf4
from qcompile.errors import RecipeError
from qcompile.spec import PerChannel, QuantSpec
from qcompile.testing.tolerances import U32, seeded

pytestmark = pytest.mark.usefixtures("one_thread")


def qlora_normal_map(offset=0.9677083):
    """QLoRA's construction of the NF4 levels (bitsandbytes create_normal_map, use_extra_value=True):
    8 quantiles of N(0, 1) for the positive half, 7 for the negative, and 0, scaled to [-1, 1]."""
    norm = pytest.importorskip("scipy.stats").norm
    import numpy as np

    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1]).tolist()
    neg = (-norm.ppf(np.linspace(offset, 0.5, 8)[:-1])).tolist()
    v = torch.tensor(sorted(pos + [0.0] + neg), dtype=torch.float64)
    return v / v.abs().max()


def test_levels_are_the_published_normal_float_table():
    ref = qlora_normal_map()
    assert NF4_LEVELS.shape == (16,) and NF4_LEVELS[7] == 0.0
    assert torch.allclose(NF4_LEVELS.double(), ref, rtol=0, atol=2 * U32)  # float32 rounding of the table
    assert (NF4_LEVELS[1:] > NF4_LEVELS[:-1]).all()


def reference_nf4(w: torch.Tensor, block: int, absmax_block: int):
    """NF4 + double quantization in float64, straight from the definitions."""
    flat = w.double().flatten()
    blocks = flat.reshape(-1, block)
    absmax = blocks.abs().amax(1)
    mean = absmax.mean()
    centered = (absmax - mean).reshape(-1, absmax_block)
    scale = centered.abs().amax(1, keepdim=True) / 127
    codes8 = torch.round(centered / scale).clamp(-128, 127)
    decoded = (codes8 * scale).flatten() + mean
    normalized = blocks / decoded.unsqueeze(1)
    codes = (normalized.unsqueeze(-1) - NF4_LEVELS.double()).abs().argmin(-1)
    return codes.flatten(), codes8.flatten(), decoded, (NF4_LEVELS.double()[codes] * decoded.unsqueeze(1)).flatten()


def test_round_trip_matches_float64_reference_and_bounds():
    gen = seeded("nf4-roundtrip")
    w = torch.randn(256, 128, generator=gen) * torch.rand(256, 1, generator=gen)  # 512 blocks, 2 absmax blocks
    t = quantize_nf4(w)
    codes, codes8, decoded, deq = reference_nf4(w, 64, 256)
    assert t.packed.dtype == torch.uint8 and t.packed.numel() == w.numel() // 2
    assert torch.equal(t.absmax_codes.long(), codes8.long())
    assert (t.codes().long() == codes).float().mean() > 0.9999  # float32 vs float64 near level midpoints
    # the decoded absmax is within half an int8 step of the true one (the double quantization)
    absmax = w.abs().reshape(-1, 64).amax(1).double()
    step = t.absmax_scale.double().repeat_interleave(256)
    assert ((t.dequantize_absmax().double() - absmax).abs() <= step * (0.5 + 1e-5)).all()
    out = t.dequantize()
    assert out.shape == w.shape and out.dtype == torch.float32
    # equal codes decode alike, up to float32 roundings of code8 * s + mean (which cancel when the
    # absmax is near the mean: the bound is in units of |code8 * s| + |mean|, not of the result)
    same = t.codes().long() == codes
    magnitude = (codes8.abs() * step + t.absmax_mean.abs().double())[: decoded.numel()].repeat_interleave(64)
    assert ((out.double().flatten() - deq).abs()[same] <= (4 * U32 * magnitude + 2 * U32 * deq.abs())[same]).all()
    # each element is within half the widest level gap (0.1519 of the decoded absmax) of the
    # original, plus what clamping to +-|decoded absmax| cuts off when it came out too small (it
    # can even decode negative for a small block among large ones: the sign cancels on decode)
    assert (decoded < 0).any()  # this seed holds such blocks
    gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2
    bound = (gap * decoded.abs() + (absmax - decoded.abs()).clamp(min=0)).repeat_interleave(64)
    assert ((out.double().flatten() - w.double().flatten()).abs() <= bound * (1 + 1e-5)).all()


def test_packing_puts_element_zero_in_the_low_nibble_and_handles_ragged_sizes():
    w = torch.zeros(3, 50)  # 150 elements: a ragged block and a ragged absmax block
    w[0, 0], w[0, 1] = 1.0, -1.0
    t = quantize_nf4(w)
    assert int(t.packed[0]) == 15 | (0 << 4)  # code 15 (+1.0) low, code 0 (-1.0) high
    assert torch.equal(t.dequantize(), w)  # 0 and +-absmax are exact levels
    gen = seeded("nf4-ragged")
    w = torch.randn(7, 33, generator=gen)
    assert torch.allclose(quantize_nf4(w).dequantize(), w, atol=0.16 * float(w.abs().max()) + 1e-3)


def test_error_is_no_worse_than_torchao_nf4():
    """Same format as torchao's NF4Tensor (block 64, scaler block 256, mean-offset int8 scalers);
    ours picks codes against the decoded absmax, so its error should not be larger."""
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor
    except Exception as e:  # pragma: no cover - depends on the torchao build
        pytest.skip(f"torchao NF4 not importable: {e}")
    gen = seeded("nf4-torchao")
    w = torch.randn(512, 256, generator=gen) * 0.02
    ours = (quantize_nf4(w).dequantize() - w).norm()
    theirs = (NF4Tensor.from_tensor(w, 64, 256).get_original_weight() - w).norm()
    print(f"||W - NF4(W)||: qcompile {ours:.5f}  torchao {theirs:.5f}")
    assert ours <= theirs * 1.001


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_nf4_recipe_end_to_end():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(16, 64, generator=seeded("nf4-e2e"))
    prepared = qc.prepare(model, x, recipe="nf4")
    qc.calibrate(prepared, [x], progress=False)
    quantized = qc.convert(prepared)
    ops = [n.target for n in quantized.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.qcompile.dequantize_nf4.default) == 2
    assert torch.ops.qcompile.dequantize.default not in ops
    for name in ("fc1", "fc2"):
        ref = quantize_nf4(getattr(model, name).weight)
        assert torch.equal(getattr(quantized, f"qc_w_{name}_weight_nf4"), ref.packed)
        assert torch.equal(getattr(quantized, f"qc_w_{name}_weight_absmax_codes"), ref.absmax_codes)
    # no float weights left: 4.5 bits per weight (+ int8 absmax per 64, fp32 scale per 256 absmaxes)
    assert not [n for n, _ in quantized.named_parameters() if n.endswith("weight")]
    w1, w2 = quantize_nf4(model.fc1.weight).dequantize(), quantize_nf4(model.fc2.weight).dequantize()
    expected = nn.functional.linear(torch.relu(nn.functional.linear(x, w1, model.fc1.bias)), w2, model.fc2.bias)
    with torch.no_grad():
        assert torch.equal(quantized(x), expected)
        # the custom op has a fake implementation: the quantized graph exports again as one op
        ep = torch.export.export(quantized, (x,))
    assert sum(n.target == torch.ops.qcompile.dequantize_nf4.default for n in ep.graph.nodes) == 2


def test_nf4_spec_errors():
    with pytest.raises(RecipeError, match="PerGroup"):
        QuantSpec("nf4", PerChannel(0))
    with pytest.raises(RecipeError, match="weights only"):
        qc.Recipe("bad", weight=QuantSpec("int8"), activation=QuantSpec("nf4", qc.PerGroup(64)))
