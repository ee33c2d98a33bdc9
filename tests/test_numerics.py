"""The numerics contract (design section 4) checked against independent references.

- `qcompile::quantize` / `qcompile::dequantize` against ONNX `QuantizeLinear` / `DequantizeLinear` as
  onnxruntime's CPU provider runs them (opset 21), bit for bit: per tensor, per channel (`axis`),
  blocked (`block_size`), INT8/UINT8/INT4/UINT4, on random data, exact ties, saturation, zeros, +-inf.
  onnxruntime 1.32 runs INT4/UINT4 QuantizeLinear; numpy has no int4 type, so its output is read
  as the raw packed bytes of the OrtValue and unpacked by onnx's own `numpy_helper`.
- dequantize against a float64 reference; `choose_qparams` against the formulas of section 4.
- the per-token qparams op, the INT4 nibble packing against onnx's own packing, and the ops staying
  opaque under `torch.export`.

NaN policy (numerics.py docstring): NaN quantizes to the zero point, so it dequantizes to 0.0.
onnxruntime 1.32 differs (measured: NaN -> -128 for INT8 and 0 for UINT8 whatever the zero point,
the saturating cast of NaN), so NaN is checked against qcompile's documented policy only.
"""
from __future__ import annotations

import ctypes

import ml_dtypes  # onnx's own dependency: the numpy int4/uint4 types onnx packs from
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qcompile  # noqa: F401  (registers the qcompile:: ops)
from qcompile.numerics import SCALE_EPS, choose_qparams, pack_int4, unpack_int4
from qcompile.testing.tolerances import E64, U32, half_step, seeded  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

qops = torch.ops.qcompile

# dtype name -> (qmin, qmax, qcompile storage dtype, ONNX element type)
DTYPES = {
    "int8": (-128, 127, torch.int8, TensorProto.INT8),
    "uint8": (0, 255, torch.uint8, TensorProto.UINT8),
    "int4": (-8, 7, torch.int8, TensorProto.INT4),
    "uint4": (0, 15, torch.uint8, TensorProto.UINT4),
}


# ----------------------------------------------------------------------------------------------------------
# onnxruntime reference
# ----------------------------------------------------------------------------------------------------------

def _int_tensor(name: str, v: torch.Tensor, onnx_type: int) -> onnx.TensorProto:
    return helper.make_tensor(name, onnx_type, list(v.shape), [int(e) for e in v.flatten().tolist()])


def _run_qdq(op: str, inp, inits, out_type: int, shape, axis, block_size):
    """One-node opset-21 model; `inp` is the float input x (QuantizeLinear) or None (DequantizeLinear,
    whose codes are an initializer so that INT4 needs no numpy int4 input). Returns the OrtValue."""
    attrs = {}
    if axis is not None:
        attrs["axis"] = axis
    if block_size:
        attrs["block_size"] = block_size
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))] if inp is not None else []
    graph = helper.make_graph([helper.make_node(op, ["x", "s", "z"], ["y"], **attrs)], "g", inputs,
                              [helper.make_tensor_value_info("y", out_type, list(shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run the kernel, no folding
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"x": ort.OrtValue.ortvalue_from_numpy(inp.numpy())} if inp is not None else {}
    return sess.run_with_ort_values(["y"], feeds)[0]


def ort_quantize(x, s, z, dtype, axis=None, block_size=0):
    """ORT QuantizeLinear: (codes in qcompile's storage dtype, raw bytes of ORT's output tensor)."""
    onnx_type = DTYPES[dtype][3]
    out = _run_qdq("QuantizeLinear", x, [numpy_helper.from_array(s.numpy(), "s"), _int_tensor("z", z, onnx_type)],
                   onnx_type, x.shape, axis, block_size)
    raw = ctypes.string_at(out.data_ptr(), out.tensor_size_in_bytes())
    codes = numpy_helper.to_array(helper.make_tensor("y", onnx_type, list(x.shape), raw, raw=True))
    return torch.from_numpy(codes.astype(np.int8 if DTYPES[dtype][2] == torch.int8 else np.uint8)), raw


def ort_dequantize(q, s, z, dtype, axis=None, block_size=0):
    onnx_type = DTYPES[dtype][3]
    inits = [_int_tensor("x", q, onnx_type), numpy_helper.from_array(s.numpy(), "s"), _int_tensor("z", z, onnx_type)]
    out = _run_qdq("DequantizeLinear", None, inits, TensorProto.FLOAT, q.shape, axis, block_size)
    return torch.from_numpy(out.numpy())


def qc_quantize(x, s, z, dtype, axis=0, block_size=0):
    qmin, qmax, store, _ = DTYPES[dtype]
    return qops.quantize(x, s, z, axis, block_size, qmin, qmax, store)


def qc_dequantize(q, s, z, axis=0, block_size=0):
    return qops.dequantize(q, s, z, axis, block_size, torch.float32)


def assert_codes_equal(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor):
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    bad = (got.to(torch.int32) != want.to(torch.int32)).nonzero()
    if bad.numel():
        i = tuple(bad[0].tolist())
        pytest.fail(f"{bad.shape[0]} of {got.numel()} codes differ from onnxruntime; first at {i}: "
                    f"x={x[i].item()!r} qcompile={got[i].item()} onnxruntime={want[i].item()}")


# ----------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------

SPECIAL = [0.0, -0.0, 1e30, -1e30, 3.4e38, -3.4e38, float("inf"), float("-inf"), 1e-45, -1e-45]


def tie_values(s: float, k_range: int) -> torch.Tensor:
    """float32 x with x / s exactly k + 0.5 in float32 division, for k in [-k_range, k_range)."""
    k = torch.arange(-k_range, k_range, dtype=torch.float32)
    x = ((k + 0.5).double() * s).float()
    return x[x / torch.tensor(s, dtype=torch.float32) == k + 0.5]


def adversarial_values(s: float, qmin: int, qmax: int, gen: torch.Generator) -> torch.Tensor:
    """Random values over and beyond the grid, exact ties inside and outside the clamp range (both
    signs), huge values, zeros, subnormals, +-inf."""
    span = (qmax - qmin + 1) * s
    rand = (torch.rand(400, generator=gen) * 3 - 1.5) * span
    return torch.cat([rand, tie_values(s, 2 * (qmax - qmin) + 3), torch.tensor(SPECIAL)])


# ----------------------------------------------------------------------------------------------------------
# quantize / dequantize against onnxruntime, bit for bit
# ----------------------------------------------------------------------------------------------------------

PER_TENSOR_CASES = [
    # dtype, scale, zero point. Power-of-two scales make every (k + 0.5) * s an exact tie.
    ("int8", 0.25, 0), ("int8", 0.0371, -7), ("int8", 2.0 ** -7, 100), ("int8", 3.3e-3, -128),
    ("uint8", 0.25, 0), ("uint8", 0.0371, 128), ("uint8", 2.0 ** -7, 37), ("uint8", 1.7, 255),
    ("int4", 0.5, 0), ("int4", 0.0371, -3), ("uint4", 0.5, 8), ("uint4", 0.0371, 3),
]


@pytest.mark.parametrize("dtype, scale, zp", PER_TENSOR_CASES)
def test_quantize_per_tensor_matches_onnxruntime(dtype, scale, zp):
    qmin, qmax = DTYPES[dtype][:2]
    x = adversarial_values(scale, qmin, qmax, seeded(dtype, scale, zp))
    s, z = torch.tensor(scale), torch.tensor(zp, dtype=torch.int32)
    want, raw = ort_quantize(x, s, z, dtype)
    got = qc_quantize(x, s, z, dtype)
    assert_codes_equal(got, want, x)
    # the inputs exercise saturation on both sides and the zero point
    assert (got == qmin).any() and (got == qmax).any() and (got == zp).any()
    if dtype.endswith("int4"):  # and qcompile's packing of its codes is byte for byte ORT's output
        assert pack_int4(got).numpy().tobytes() == raw


@pytest.mark.parametrize("dtype, scale, zp", [
    ("int8", 0.25, 0), ("int8", 2.0 ** -5, 3), ("uint8", 0.125, 128), ("int8", 0.0371, 0), ("int4", 2.0 ** -9, 0),
])
def test_exact_ties_round_half_to_even(dtype, scale, zp):
    qmin, qmax = DTYPES[dtype][:2]
    x = tie_values(scale, 300)
    assert (x > 0).sum() > 100 and (x < 0).sum() > 100  # many exact ties of both signs
    s, z = torch.tensor(scale), torch.tensor(zp, dtype=torch.int32)
    got = qc_quantize(x, s, z, dtype).to(torch.int32)
    k = torch.floor(x / s).to(torch.int32)                # x / s == k + 0.5 exactly
    even = torch.where(k % 2 == 0, k, k + 1)
    assert torch.equal(got, torch.clamp(even + zp, qmin, qmax))
    # the inputs tell half-to-even from half-away-from-zero
    t = x.double() / scale
    away = (torch.sign(t) * torch.floor(t.abs() + 0.5)).to(torch.int32)
    assert not torch.equal(got, torch.clamp(away + zp, qmin, qmax))
    want, _ = ort_quantize(x, s, z, dtype)
    assert_codes_equal(got.to(want.dtype), want, x)


def _channel_data(shape, axis, dtype, gen):
    qmin, qmax = DTYPES[dtype][:2]
    c = shape[axis]
    s = torch.rand(c, generator=gen) * 0.1 + 0.005
    s[0] = 0.25  # one power-of-two channel, where the constructed ties below are exact
    z = torch.randint(qmin, qmax + 1, (c,), generator=gen, dtype=torch.int32)
    x = torch.randn(shape, generator=gen) * (qmax - qmin) * s.max()
    if x.ndim == 1:  # one element per channel
        x[1:4] = torch.tensor([float("inf"), float("-inf"), 0.0])
        return x, s, z
    rows = x.movedim(axis, -1).reshape(-1, c)
    rows[:3] = torch.tensor([float("inf"), float("-inf"), 0.0])[:, None]
    rows[3:, 0] = (torch.arange(rows.shape[0] - 3) - 8 + 0.5) * 0.25   # exact ties on channel 0
    x = rows.reshape(x.movedim(axis, -1).shape).movedim(-1, axis).contiguous()
    return x, s, z


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int4", "uint4"])
@pytest.mark.parametrize("shape, axis", [((5, 7, 4), 0), ((4, 6, 4), 1), ((3, 4, 9), -1), ((9,), 0)])
def test_quantize_per_channel_matches_onnxruntime(dtype, shape, axis):
    qmin, qmax = DTYPES[dtype][:2]
    x, s, z = _channel_data(shape, axis, dtype, seeded(dtype, shape, axis))
    want, raw = ort_quantize(x, s, z, dtype, axis=axis)
    got = qc_quantize(x, s, z, dtype, axis=axis)
    assert_codes_equal(got, want, x)
    assert (got == qmin).any() and (got == qmax).any()
    # the scale really is applied per channel: channel 0's scale for all channels gives other codes
    assert not torch.equal(qc_quantize(x, s[:1].expand_as(s).contiguous(), z, dtype, axis=axis), got)


def _blocked_data(shape, axis, block, dtype, gen):
    qmin, qmax = DTYPES[dtype][:2]
    sshape = list(shape)
    sshape[axis] = -(-shape[axis] // block)
    s = torch.rand(sshape, generator=gen) * 0.05 + 0.01
    z = torch.randint(qmin, qmax + 1, sshape, generator=gen, dtype=torch.int32)
    x = torch.randn(shape, generator=gen) * (qmax - qmin) * 0.04
    x.view(-1)[:3] = torch.tensor([float("inf"), float("-inf"), 0.0])
    return x, s, z


BLOCKED = [((6, 10), 1, 4), ((6, 12), -1, 4), ((10, 6), 0, 4), ((2, 7, 5), 1, 3), ((3, 8), 1, 8)]


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int4", "uint4"])
@pytest.mark.parametrize("shape, axis, block", BLOCKED)
def test_quantize_blocked_matches_onnxruntime(dtype, shape, axis, block):
    """Opset 21 blocked layout: the scale has x's rank with ceil(K / block) entries along `axis`
    (K not a multiple of the block in three of the shapes)."""
    qmin, qmax = DTYPES[dtype][:2]
    x, s, z = _blocked_data(shape, axis, block, dtype, seeded(dtype, shape, axis, block))
    want, raw = ort_quantize(x, s, z, dtype, axis=axis, block_size=block)
    got = qc_quantize(x, s, z, dtype, axis=axis, block_size=block)
    assert_codes_equal(got, want, x)
    assert (got == qmin).any() and (got == qmax).any()
    if dtype.endswith("int4") and shape[-1] % 2 == 0:
        # ONNX packs the flattened tensor; pack_int4 packs rows, the same bytes when rows are even
        assert pack_int4(got).numpy().tobytes() == raw
    if s.shape[axis] > 1:  # the scale really varies per block: block 0's scale everywhere gives other codes
        s0 = s.narrow(axis, 0, 1).expand_as(s).contiguous()
        assert not torch.equal(qc_quantize(x, s0, z, dtype, axis=axis, block_size=block), got)


def test_quantize_one_element_1d_scale_on_1d_input_matches_onnxruntime():
    # ONNX accepts a 1-element 1-D scale as per tensor (checker, full_check) and onnxruntime runs it
    # so; on an input of rank >= 2 qcompile does too. A 0-d scale on the same input works.
    x = torch.linspace(-1, 1, 5)
    s, z = torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32)
    want, _ = ort_quantize(x, s, z, "int8")
    assert torch.equal(qc_quantize(x, s.reshape(()), z.reshape(()), "int8"), want)
    assert torch.equal(qc_quantize(x, s, z, "int8"), want)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int4", "uint4"])
def test_dequantize_matches_onnxruntime(dtype):
    qmin, qmax, store, _ = DTYPES[dtype]
    gen = seeded("dq", dtype)
    # every code, per tensor
    q = torch.arange(qmin, qmax + 1).to(store)
    for s, z in [(torch.tensor(0.0371), torch.tensor(qmin // 2 + qmax // 2, dtype=torch.int32)),
                 (torch.tensor(3.1e-5), torch.tensor(qmax, dtype=torch.int32))]:
        assert torch.equal(qc_dequantize(q, s, z), ort_dequantize(q, s, z, dtype))
    # per channel
    shape, axis = (4, 6, 4), 1
    q = torch.randint(qmin, qmax + 1, shape, generator=gen).to(store)
    s = torch.rand(6, generator=gen) * 0.1 + 1e-3
    z = torch.randint(qmin, qmax + 1, (6,), generator=gen, dtype=torch.int32)
    assert torch.equal(qc_dequantize(q, s, z, axis=axis), ort_dequantize(q, s, z, dtype, axis=axis))
    # blocked, K not a multiple of the block
    for shape, axis, block in BLOCKED:
        q = torch.randint(qmin, qmax + 1, shape, generator=gen).to(store)
        _, s, z = _blocked_data(shape, axis, block, dtype, gen)
        got = qc_dequantize(q, s, z, axis=axis, block_size=block)
        assert torch.equal(got, ort_dequantize(q, s, z, dtype, axis=axis, block_size=block))


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int4", "uint4"])
def test_nan_quantizes_to_the_zero_point(dtype):
    qmin, qmax = DTYPES[dtype][:2]
    z = torch.tensor([qmin, qmax, (qmin + qmax) // 2], dtype=torch.int32)
    s = torch.tensor([0.1, 0.02, 1.0])
    x = torch.tensor([[float("nan"), 1.0, float("nan")]] * 3)  # [3 channels, 3]
    q = qc_quantize(x, s, z, dtype, axis=0)
    assert torch.equal(q[:, 0].to(torch.int32), z) and torch.equal(q[:, 2].to(torch.int32), z)
    assert torch.equal(qc_dequantize(q, s, z, axis=0)[:, [0, 2]], torch.zeros(3, 2))
    # and NaN does not leak into its neighbours' codes
    assert torch.equal(q[:, 1], qc_quantize(torch.ones(3, 1), s, z, dtype, axis=0)[:, 0])


def test_dequantize_matches_float64_reference():
    gen = seeded("dq64")
    for dtype in ("int8", "uint8", "int4"):
        qmin, qmax, store, _ = DTYPES[dtype]
        q = torch.randint(qmin, qmax + 1, (64, 33), generator=gen).to(store)
        s = torch.exp(torch.randn(64, generator=gen) * 6)          # scales from ~1e-8 to ~1e8
        z = torch.randint(qmin, qmax + 1, (64,), generator=gen, dtype=torch.int32)
        got = qc_dequantize(q, s, z, axis=0)
        assert got.dtype == torch.float32
        ref = (q.double() - z.double()[:, None]) * s.double()[:, None]
        # within float32 rounding of the exact value: one correctly rounded product
        assert ((got.double() - ref).abs() <= U32 * ref.abs()).all()


# ----------------------------------------------------------------------------------------------------------
# choose_qparams
# ----------------------------------------------------------------------------------------------------------

def random_ranges(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n (min, max) pairs: straddling 0, all positive, all negative, tiny, huge."""
    a = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 4)
    b = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 4)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    third = n // 3
    lo[:third] = lo[:third].abs()                     # one-sided positive
    hi[:third] = lo[:third] + hi[:third].abs() + 1e-3
    hi[third:2 * third] = -hi[third:2 * third].abs()  # one-sided negative
    lo[third:2 * third] = hi[third:2 * third] - lo[third:2 * third].abs() - 1e-3
    return lo, hi


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int4", "uint4"])
def test_choose_qparams_asymmetric_formula(dtype):
    qmin, qmax, store, _ = DTYPES[dtype]
    lo, hi = random_ranges(300, seeded("asym", dtype))
    s, z = choose_qparams(lo, hi, qmin, qmax, symmetric=False)
    assert s.dtype == torch.float32 and z.dtype == torch.int32 and s.shape == z.shape == lo.shape
    lo64, hi64 = lo.double().clamp(max=0), hi.double().clamp(min=0)
    s_ref = ((hi64 - lo64) / (qmax - qmin)).clamp(min=SCALE_EPS)
    # float32: one same-sign addition and one division, each rounded once
    assert ((s.double() - s_ref).abs() <= 2 * U32 * s_ref).all()
    # z = qmin - round(min(xmin, 0) / s): within half a code of the real-valued one, up to the float32
    # rounding of min(xmin, 0) / s, a quotient of at most qmax - qmin codes
    z_real = qmin - lo64 / s.double()
    assert ((z.double() - z_real).abs() <= 0.5 + U32 * (qmax - qmin)).all()
    assert ((z >= qmin) & (z <= qmax)).all()
    # 0.0 is exactly representable: quantize(0) dequantizes to exactly 0.0, for every range
    zeros = torch.zeros(300, 2)
    zeros[:, 1] = -0.0
    dq = qc_dequantize(qc_quantize(zeros, s, z, dtype, axis=0), s, z, axis=0)
    assert (dq == 0.0).all()
    # the grid covers [min(xmin, 0), max(xmax, 0)] to within half a step: both ends round-trip
    ends = torch.stack([lo64.float(), hi64.float()], 1)
    err = (qc_dequantize(qc_quantize(ends, s, z, dtype, axis=0), s, z, axis=0).double() - ends.double()).abs()
    assert (err <= half_step(s.double()[:, None], qmax - qmin)).all()


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_choose_qparams_symmetric_formula(dtype):
    qmin, qmax = DTYPES[dtype][:2]
    lo, hi = random_ranges(300, seeded("sym", dtype))
    s, z = choose_qparams(lo, hi, qmin, qmax, symmetric=True)
    amax = torch.maximum(lo.abs(), hi.abs()).double()
    # one correctly rounded float32 division (float64 then float32 rounds the same: 53 >= 2 * 24 + 2)
    assert torch.equal(s, (amax / qmax).clamp(min=SCALE_EPS).float())
    assert torch.equal(z, torch.zeros(300, dtype=torch.int32))
    # |x| <= amax round-trips within half a step (no clipping at +-amax)
    x = torch.stack([lo, hi, -amax.float(), amax.float()], 1)
    err = (qc_dequantize(qc_quantize(x, s, z, dtype, axis=0), s, z, axis=0).double() - x.double()).abs()
    assert (err <= half_step(s.double()[:, None], 2 * qmax)).all()


@pytest.mark.parametrize("symmetric, dtype", [(False, "uint8"), (False, "int8"), (True, "int8"), (True, "int4")])
@pytest.mark.parametrize("value", [0.0, 3.5, -3.5, 1e-30, -1e-42])
def test_choose_qparams_degenerate_range_finite(symmetric, dtype, value):
    qmin, qmax = DTYPES[dtype][:2]
    v = torch.tensor(value)
    s, z = choose_qparams(v, v, qmin, qmax, symmetric)
    assert torch.isfinite(s).all() and (s > 0).all() and not torch.isnan(s).any()
    assert qmin <= int(z) <= qmax
    x = torch.tensor([value, 0.0])
    dq = qc_dequantize(qc_quantize(x, s, z, dtype), s, z)
    assert not torch.isnan(dq).any() and dq[1] == 0.0
    assert abs(float(dq[0]) - value) <= half_step(float(s), qmax - qmin)
    if value == 0.0:
        assert float(s) == SCALE_EPS


def test_choose_qparams_uncalibrated_range_is_finite():
    # an observer that saw nothing holds (+inf, -inf)
    s, z = choose_qparams(torch.tensor(float("inf")), torch.tensor(float("-inf")), 0, 255, False)
    assert torch.isfinite(s) and float(s) > 0 and 0 <= int(z) <= 255


# ----------------------------------------------------------------------------------------------------------
# per-token qparams
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7, 33), (2, 5, 16), (1, 1), (3, 1, 64)])
def test_choose_qparams_per_token_round_trips_each_row(shape):
    gen = seeded("tok", shape)
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(*shape[:-1], 1, generator=gen) * 3)
    x.reshape(-1, shape[-1])[0] = 0.0  # an all-zero row
    s, z = qops.choose_qparams_per_token(x, -128, 127)
    assert s.shape == z.shape == (*shape[:-1], 1) and s.dtype == torch.float32 and z.dtype == torch.int32
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.equal(s, torch.where(amax > 0, amax / 127, torch.tensor(SCALE_EPS)))  # one per row
    assert (z == 0).all()
    k = shape[-1]
    q = qops.quantize(x, s, z, -1, k, -128, 127, torch.int8)
    dq = qops.dequantize(q, s, z, -1, k, torch.float32)
    assert ((x - dq).abs() <= half_step(s, 254)).all()  # half a step of each row's own scale
    # the largest element of each non-zero row maps to +-127 (the row's own range is used)
    rows = q.reshape(-1, k).abs().amax(-1)[1:]
    assert (rows == 127).all()


# ----------------------------------------------------------------------------------------------------------
# INT4 packing
# ----------------------------------------------------------------------------------------------------------

def onnx_int4_bytes(values, signed: bool) -> bytes:
    arr = np.array(values, dtype=ml_dtypes.int4 if signed else ml_dtypes.uint4)
    return numpy_helper.from_array(arr, "t").raw_data


@pytest.mark.parametrize("signed", [True, False])
def test_pack_int4_round_trips_all_values(signed):
    vals = torch.arange(-8, 8) if signed else torch.arange(0, 16)
    store = torch.int8 if signed else torch.uint8
    # every ordered pair of nibbles, so every byte value appears
    pairs = torch.cartesian_prod(vals, vals).flatten().to(store)
    packed = pack_int4(pairs)
    assert packed.dtype == torch.uint8 and packed.numel() == 256
    assert sorted(packed.tolist()) == list(range(256))
    assert torch.equal(unpack_int4(packed, pairs.numel(), signed=signed), pairs)
    assert packed.numpy().tobytes() == onnx_int4_bytes(pairs.tolist(), signed)


@pytest.mark.parametrize("n", [1, 3, 5, 17, 31])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_int4_odd_lengths(n, signed):
    gen = seeded("odd", n, signed)
    lo, hi = (-8, 8) if signed else (0, 16)
    q = torch.randint(lo, hi, (n,), generator=gen).to(torch.int8 if signed else torch.uint8)
    packed = pack_int4(q)
    assert packed.numel() == (n + 1) // 2
    assert packed.numpy().tobytes() == onnx_int4_bytes(q.tolist(), signed)  # padding nibble 0, as onnx
    assert torch.equal(unpack_int4(packed, n, signed=signed), q)
    # rows of odd length: each row packed (and padded) on its own
    rows = q.repeat(3, 1)
    assert torch.equal(unpack_int4(pack_int4(rows), n, signed=signed), rows)


def test_pack_int4_element_zero_in_low_nibble():
    q = torch.tensor([1, -2, 7, -8], dtype=torch.int8)
    assert pack_int4(q).tolist() == [0xE1, 0x87]
    assert pack_int4(q).numpy().tobytes() == onnx_int4_bytes([1, -2, 7, -8], True) == bytes([0xE1, 0x87])
    # the same bytes through onnx's other API: helper.make_tensor packs INT4 into int32_data
    assert list(helper.make_tensor("t", TensorProto.INT4, [4], [1, -2, 7, -8]).int32_data) == [0xE1, 0x87]
    # a 2-D tensor with even rows packs row-major, as ONNX packs the flattened tensor
    m = torch.arange(-8, 8, dtype=torch.int8).reshape(4, 4)
    assert pack_int4(m).numpy().tobytes() == onnx_int4_bytes(m.flatten().tolist(), True)


# ----------------------------------------------------------------------------------------------------------
# the ops under torch.export
# ----------------------------------------------------------------------------------------------------------

class QDQ(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("s", torch.tensor([0.02, 0.05, 0.1]))
        self.register_buffer("z", torch.tensor([0, 3, -4], dtype=torch.int32))

    def forward(self, x):
        q = qops.quantize(x, self.s, self.z, 1, 0, -128, 127, torch.int8)
        y = qops.dequantize(q, self.s, self.z, 1, 0, torch.float32)
        ts, tz = qops.choose_qparams_per_token(y, -128, 127)
        qt = qops.quantize(y, ts, tz, -1, y.shape[-1], -128, 127, torch.int8)
        return qops.dequantize(qt, ts, tz, -1, y.shape[-1], torch.float32)


def test_ops_stay_opaque_under_torch_export():
    x = torch.randn(4, 3, 8, generator=seeded("export"))
    ep = torch.export.export(QDQ(), (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(qops.quantize.default) == 2
    assert targets.count(qops.dequantize.default) == 2
    assert targets.count(qops.choose_qparams_per_token.default) == 1
    # not decomposed: no rounding, clamping or division in the graph
    assert not {t for t in targets if str(t).startswith("aten.") and ("round" in str(t) or "clamp" in str(t)
                                                                      or "div" in str(t))}
    node = next(n for n in ep.graph.nodes if n.target == qops.quantize.default)
    assert node.meta["val"].dtype == torch.int8 and tuple(node.meta["val"].shape) == (4, 3, 8)
    assert torch.equal(ep.module()(x), QDQ()(x))


@pytest.mark.parametrize("layout", ["per_tensor", "per_channel_rows", "per_channel_cols", "groups_ragged",
                                    "float_offset", "conv_per_channel", "blocks_along_rows"])
@pytest.mark.parametrize("rounding", ["nearest", "half_up"])
def test_weight_quantization_by_row_chunks_equals_one_call(layout, rounding):
    """quantize_weight / dequantize_weight run quantize_math / dequantize_math a few rows at a time
    (bounded temporaries for wide weights): every code and value equal to one call, in each scale
    layout, including those that cannot be split by rows (blocks along dim 0: one call)."""
    from qcompile.numerics import dequantize_math, dequantize_weight, quantize_math, quantize_weight

    gen = seeded(f"weight-rows-{layout}")
    w = torch.randn(37, 45, generator=gen) * 3
    axis, block = 0, 0
    z_dtype = torch.int32
    if layout == "per_tensor":
        s, z = torch.tensor(0.05), torch.tensor(3, dtype=torch.int32)
    elif layout == "per_channel_rows":
        s, z = torch.rand(37, generator=gen) * 0.1 + 0.01, torch.randint(-3, 3, (37,), generator=gen, dtype=z_dtype)
    elif layout == "per_channel_cols":
        axis = 1
        s, z = torch.rand(45, generator=gen) * 0.1 + 0.01, torch.randint(-3, 3, (45,), generator=gen, dtype=z_dtype)
    elif layout in ("groups_ragged", "float_offset"):
        axis, block = -1, 8   # 45 columns: the last group holds 5
        s = torch.rand(37, 6, generator=gen) * 0.1 + 0.01
        z = torch.randint(-3, 3, (37, 6), generator=gen, dtype=z_dtype) if layout == "groups_ragged" \
            else torch.randn(37, 6, generator=gen)
    elif layout == "conv_per_channel":
        w = torch.randn(37, 3, 5, 5, generator=gen)
        s, z = torch.rand(37, generator=gen) * 0.1 + 0.01, torch.zeros(37, dtype=z_dtype)
    else:  # blocks of 4 rows along dim 0
        axis, block = 0, 4
        s, z = torch.rand(10, 45, generator=gen) * 0.1 + 0.01, torch.zeros(10, 45, dtype=z_dtype)
    one = quantize_math(w, s, z, axis, block, -8, 7, torch.int8, rounding)
    chunked = quantize_weight(w, s, z, axis, block, -8, 7, torch.int8, rounding, rows=5)
    assert torch.equal(one, chunked)
    assert len(one.unique()) > 8   # the codes span the grid: the comparison sees real rounding
    assert torch.equal(dequantize_math(one, s, z, axis, block, torch.float32),
                       dequantize_weight(one, s, z, axis, block, torch.float32, rows=5))
