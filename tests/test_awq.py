"""AWQ: the searches on one layer with outlier input channels, the pass's float-preserving
rewrite (folded into a LayerNorm, into a producer linear, or an explicit mul), exact codes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qcompile as qc
from qcompile.algorithms.awq import fake_quantize, search_clip, search_scales
from qcompile.errors import RecipeError
from qcompile.graph import STATE
from qcompile.numerics import quantize_math
from qcompile.observers import weight_qparams
from qcompile.spec import PerGroup, QuantSpec
from qcompile.testing.tolerances import U32, seeded

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = QuantSpec("int4", PerGroup(32))


def outlier_inputs(rows, k, gen, outliers=(3, 17, 40), factor=30.0):
    x = torch.randn(rows, k, generator=gen)
    x[:, list(outliers)] *= factor  # a few salient channels, as in LLM / BERT activations
    return x


def rel_error(w, w_eff_x, x):
    ref = x.double() @ w.double().T
    return float((w_eff_x - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", ["int4", "int3"])
def test_awq_lowers_output_error_on_outlier_channels(dtype):
    gen = seeded("awq-layer", dtype)
    spec = QuantSpec(dtype, PerGroup(32))
    w = torch.randn(48, 64, generator=gen)
    calib, held_out = outlier_inputs(512, 64, gen), outlier_inputs(512, 64, gen)
    s, alpha, errors = search_scales([w], calib, calib.abs().mean(0), spec)
    assert alpha > 0 and errors[alpha] < errors[0.0]  # the search prefers scaling to plain RTN
    qparams = search_clip(w * s, calib / s, spec)
    awq = rel_error(w, (held_out / s).double() @ fake_quantize(w * s, spec, qparams).double().T, held_out)
    rtn = rel_error(w, held_out.double() @ fake_quantize(w, spec).double().T, held_out)
    print(f"{dtype}: held-out ||XW^T - XQ^T|| / ||XW^T||: RTN {rtn:.4f}  AWQ {awq:.4f} (alpha {alpha})")
    assert awq < 0.7 * rtn  # measured 0.30 of RTN (int4 and int3) on these seeds


def test_clip_search_never_worse_than_full_range_per_group():
    gen = seeded("awq-clip")
    w, x = torch.randn(16, 64, generator=gen), torch.randn(256, 64, generator=gen)
    s_clip, z_clip = search_clip(w, x, SPEC)
    s_full, z_full = weight_qparams(w, SPEC)
    assert (s_clip <= s_full).all() and (s_clip < s_full).any()  # it only shrinks, and here it does

    def group_errors(qparams):
        d = (w - fake_quantize(w, SPEC, qparams)).reshape(16, 2, 32)
        return torch.einsum("ngk,rgk->ngr", d, x.reshape(256, 2, 32)).pow(2).sum(-1)

    assert (group_errors((s_clip, z_clip)) <= group_errors((s_full, z_full)) * (1 + 1e-5)).all()


class Blocks(nn.Module):
    """The three places AWQ can put 1/s: a LayerNorm feeding only its linears, a linear feeding
    only the next one, and a GELU (a mul must be inserted)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.q, self.k = nn.Linear(64, 64), nn.Linear(64, 64)
        self.up = nn.Linear(64, 96)
        self.down = nn.Linear(96, 64)
        self.out = nn.Linear(64, 32)

    def forward(self, x):
        h = self.norm(x)
        h = self.q(h) + self.k(h)
        h = self.down(self.up(h))
        return self.out(torch.nn.functional.gelu(h))


def _model_and_batches(seed):
    gen = seeded("awq-model", seed)
    torch.manual_seed(0)
    model = Blocks().eval()
    with torch.no_grad():  # a trained-looking LayerNorm and salient channels after it
        model.norm.weight.copy_(torch.rand(64, generator=gen) + 0.5)
        model.norm.weight[[5, 9]] *= 20
        model.norm.bias.copy_(0.1 * torch.randn(64, generator=gen))
    return model, [torch.randn(8, 16, 64, generator=gen) for _ in range(4)]


def test_awq_pass_keeps_float_output_and_folds_where_it_can():
    model, batches = _model_and_batches(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = qc.prepare(model, batches[0], recipe=qc.recipes["w4a16"].replace(weight=SPEC), algorithms=["awq"])
    qc.calibrate(prepared, batches, progress=False)
    report = prepared.meta[STATE].algorithm_reports["awq"]
    where = {k.split(".")[0]: r["input_divided_in"] for k, r in report.items()}
    assert all(r["alpha"] > 0 for r in report.values())  # every group here prefers some scaling
    assert where == {"q": "layer_norm", "k": "layer_norm", "up": "mul", "down": "linear", "out": "mul"}
    muls = [n for n in prepared.graph.nodes if n.target == torch.ops.aten.mul.Tensor]
    assert len(muls) == sum(v == "mul" for v in where.values())
    # float output unchanged up to float32 rounding: measured 3e-7..7e-7 of max|y| (5-12 U32)
    with torch.no_grad():
        for x in batches:
            y, y_awq = model(x), prepared(x)
            assert (y_awq - y).abs().max() <= 32 * U32 * y.abs().max()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"AWQ modified the user's model ({k})"


def test_awq_codes_are_the_searched_ones_and_beat_rtn_end_to_end():
    model, batches = _model_and_batches(1)
    recipe = qc.recipes["w4a16"].replace(weight=SPEC)
    prepared = qc.prepare(model, batches[0], recipe=recipe, algorithms=[{"name": "awq", "n_samples": 512}])
    qc.calibrate(prepared, batches, progress=False)
    quantized = qc.convert(prepared)
    state = prepared.meta[STATE]
    # q and k read the LayerNorm output: redo the search by hand on all 512 rows (the pass keeps
    # them all: 4 batches x 128 rows)
    x = torch.cat([model.norm(b).detach().reshape(-1, 64) for b in batches])
    ws = [model.q.weight.detach(), model.k.weight.detach()]
    s, alpha, _ = search_scales(ws, x, x.abs().mean(0), SPEC)
    assert alpha == state.algorithm_reports["awq"]["q.weight"]["alpha"]
    for name, w in zip(("q", "k"), ws):
        qparams = search_clip(w * s, x / s, SPEC)
        codes = quantize_math(w * s, *qparams, -1, 32, SPEC.qmin, SPEC.qmax, torch.int8)
        assert torch.equal(getattr(quantized, f"qc_w_{name}_weight"), codes)
    # and the whole model is closer to float than plain RTN on held-out inputs
    rtn = qc.prepare(model, batches[0], recipe=recipe)
    qc.calibrate(rtn, batches[:1], progress=False)
    rtn = qc.convert(rtn)
    held_out = torch.randn(64, 16, 64, generator=seeded("awq-held-out"))
    with torch.no_grad():
        y = model(held_out)
        e_awq, e_rtn = (quantized(held_out) - y).norm() / y.norm(), (rtn(held_out) - y).norm() / y.norm()
    print(f"whole model relative error: RTN {e_rtn:.4f}  AWQ {e_awq:.4f}")
    assert e_awq < 0.8 * e_rtn


class PaddedTokens(nn.Module):
    """A LayerNorm and two linears on [B, S, 64] tokens, pooled over the real positions of a
    [B, S] 0/1 mask: what padded positions hold never reaches the output."""

    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(64), nn.Linear(64, 96), nn.Linear(96, 32)

    def forward(self, x, attention_mask):
        h = self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        return (h * attention_mask.unsqueeze(-1).to(h.dtype)).sum(1)


def padded_batches(seed, pad_value):
    """Salient channels on the real tokens; padded positions (about half) hold other noise."""
    gen = seeded("awq-padded", seed)
    out = []
    for _ in range(4):
        mask = (torch.arange(16).unsqueeze(0) < torch.randint(2, 17, (8,), generator=gen).unsqueeze(1)).long()
        x = outlier_inputs(8 * 16, 64, gen).reshape(8, 16, 64)
        pad = pad_value * torch.randn(8, 16, 64, generator=gen)
        out.append((torch.where(mask.bool().unsqueeze(-1), x, pad), mask))
    return out


def test_awq_token_mask_keeps_only_real_token_statistics(monkeypatch):
    import qcompile.passes.awq as awq_pass

    torch.manual_seed(0)
    model = PaddedTokens().eval()
    recipe = qc.recipes["w4a16"].replace(weight=SPEC)
    seen = {}
    real_search = awq_pass.search_scales

    def spy(weights, x, absmean, spec, n_grid):
        seen[weights[0].shape] = (x.clone(), absmean.clone())
        return real_search(weights, x, absmean, spec, n_grid)

    monkeypatch.setattr(awq_pass, "search_scales", spy)
    codes = {}
    for pad_value in (0.0, 50.0):
        batches = padded_batches(0, pad_value)
        for token_mask in ("attention_mask", None):
            prepared = qc.prepare(model, batches[0], recipe=recipe,
                                  algorithms=[{"name": "awq", "n_samples": 1024, "token_mask": token_mask}])
            qc.calibrate(prepared, batches, progress=False)
            codes[pad_value, token_mask] = qc.convert(prepared).qc_w_up_weight.clone()
            if token_mask is not None:
                # the up layer reads the LayerNorm of the real tokens only: its mean |x| and its
                # sample rows (all of them here: n_samples exceeds the real rows)
                real = torch.cat([model.norm(x[m.bool()]).detach() for x, m in batches])
                x_seen, absmean = seen[(96, 64)]
                assert x_seen.shape == real.shape
                # the graph's LayerNorm and the eager one round differently, and the mean is rounded
                # to float32: measured 2.9 U32 at most
                assert torch.allclose(absmean, real.abs().mean(0), rtol=8 * U32, atol=0)
    assert torch.equal(codes[0.0, "attention_mask"], codes[50.0, "attention_mask"])  # pads are ignored
    assert not torch.equal(codes[0.0, None], codes[50.0, None])                        # pads steer plain AWQ


def test_awq_token_mask_errors_list_the_inputs():
    model = PaddedTokens().eval()
    batches = padded_batches(1, 1.0)
    with pytest.raises(RecipeError, match="token_mask"):
        qc.prepare(model, batches[0], recipe="w4a16", algorithms=[{"name": "awq", "token_mask": 0.5}])
    prepared = qc.prepare(model, batches[0], recipe="w4a16", algorithms=[{"name": "awq", "token_mask": "mask"}])
    with pytest.raises(RecipeError, match="its inputs are x, attention_mask"):
        qc.calibrate(prepared, batches, progress=False)
