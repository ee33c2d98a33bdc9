"""The batch is dynamic by default (capture.py): a model captured on two examples calibrates on
batches of 64, and the reference graph, the torch lowering and the ONNX file run any batch size
with the numbers of a model captured static at that size. Where the model fixes its batch, the
capture stays static and calibrate says why."""
from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import qcompile as qc
from qcompile.backends.torch_cpu import lower as lower_torch
from qcompile.graph import STATE
from qcompile.testing.tolerances import seeded

pytestmark = pytest.mark.usefixtures("one_thread")
Q = torch.ops.qcompile.quantize.default


class SmallCNN(nn.Module):
    """conv+BN+ReLU, a residual add, max-pool, flatten and a linear head: every op family that
    reads the batch dim through a reshape (flatten) or not at all."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool, self.head = nn.MaxPool2d(2), nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.pool(h + torch.relu(self.conv2(h)))
        return self.head(h.flatten(1))


@pytest.fixture(scope="module")
def cnn_and_data():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():   # BN statistics that are not the identity
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 2.0)
    x = torch.randn(128, 1, 8, 8, generator=seeded("dynamic batch data"))
    return model, x


def _qparams(gm):
    """Every quantize node's scale and zero point, in graph order."""
    out = []
    for n in gm.graph.nodes:
        if n.target == Q:
            out.append(tuple(float(getattr(gm, a.target)) for a in n.args[1:3]))
    return out


def test_a_first_script_with_mismatched_batch_sizes_works(cnn_and_data, tmp_path):
    """The newcomer's script: prepare on x[:2], calibrate on batches of 64, then use every stage at
    other batch sizes. Same qparams and bit-identical outputs as a capture at batch 64."""
    model, x = cnn_and_data
    batches = [x[:64], x[64:]]
    prepared = qc.prepare(model, (x[:2],))
    qc.calibrate(prepared, batches, progress=False)
    quantized = qc.convert(prepared)

    static = qc.prepare(model, (x[:64],), dynamic_shapes=None)
    qc.calibrate(static, batches, progress=False)
    static_q = qc.convert(static)
    assert len(_qparams(quantized)) == 4 and _qparams(quantized) == _qparams(static_q)
    assert torch.equal(quantized(x[:64]), static_q(x[:64]))   # the same ops on the same shapes

    # the torch backend: the kernels of a static capture at its size, and any other size. The
    # integer convs make rows independent of the batch; the head (a weight-only linear here, FP32)
    # switches from its GEMV kernel to dequantize + GEMM above 32 rows: float roundoff apart.
    low = lower_torch(quantized, weight_only_dtype=torch.float32)
    assert torch.equal(low(x[:64]), lower_torch(static_q, weight_only_dtype=torch.float32)(x[:64]))
    full = low(x)
    for n in (1, 5, 33):
        torch.testing.assert_close(low(x[:n]), full[:n], rtol=1e-5, atol=1e-5)

    # the ONNX file keeps a symbolic batch and agrees with the reference graph at other sizes
    path = tmp_path / "cnn_dynamic.onnx"
    proto = qc.export_onnx(quantized, path)
    dim = proto.graph.input[0].type.tensor_type.shape.dim
    assert dim[0].dim_param and [d.dim_value for d in dim[1:]] == [1, 8, 8]
    report = qc.verify(quantized, path, [x[:1], x[:5], x[:64]])
    assert report.first_divergence is None
    # onnxruntime's QLinearConv rounds a few ties the other way: 0.13% of conv2's input codes by one,
    # measured alike for a static file of the static capture at batch 64
    assert all(t.equal_fraction >= 0.998 and t.max_diff <= 1 for t in report.tensors), report

    # a static file when asked for, at the size asked for
    proto = qc.export_onnx(quantized, None, (x[:8],), dynamic_shapes=False)
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [8, 1, 8, 8]


def test_a_one_sample_example_still_gives_a_dynamic_batch(cnn_and_data):
    """torch.export fixes size-1 dims; the capture traces the sample repeated to a batch of 2."""
    model, x = cnn_and_data
    prepared = qc.prepare(model, x[:1])
    val = next(n for n in prepared.graph.nodes if n.op == "placeholder").meta["val"]
    assert not isinstance(val.shape[0], int) and tuple(val.shape[1:]) == (1, 8, 8)
    qc.calibrate(prepared, [x[:64], x[64:127], x[127:]], progress=False)   # 64, 63 and 1 rows
    quantized = qc.convert(prepared)
    assert quantized(x[:3]).shape == (3, 10)
    assert prepared.meta[STATE].calibration_batches == 3


class SingleSampleBranch(nn.Module):
    """A Python branch on the batch size: a trace at batch 2 takes the other one."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.fc(x)
        return 2 * y if x.shape[0] == 1 else y


def test_a_model_that_needs_its_batch_of_one_is_captured_as_given():
    """Traced at batch 2, the graph would not double the output the model doubles at batch 1: the
    capture notices, keeps the batch of 1, and calibrate names the fixed dim."""
    model = SingleSampleBranch().eval()
    prepared = qc.prepare(model, torch.randn(1, 8))
    assert tuple(next(n for n in prepared.graph.nodes if n.op == "placeholder").meta["val"].shape) == (1, 8)
    with pytest.raises(qc.InvalidInputsError, match=r"size 3 in dim 0 \(shape \(3, 8\)\), captured as \(1, 8\) "
                                                    r"\(the batch dim is dynamic by default; this model fixes it"):
        qc.calibrate(prepared, [torch.randn(3, 8)], progress=False)


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x).reshape(4, 2, 2)   # only a batch of 4 fits


def test_a_model_that_fixes_its_batch_is_captured_static_and_calibrate_says_so():
    prepared = qc.prepare(FixedBatch().eval(), torch.randn(4, 8))
    with pytest.raises(qc.InvalidInputsError, match=r"size 64 in dim 0 \(shape \(64, 8\)\), captured as \(4, 8\) "
                                                    r"\(the batch dim is dynamic by default; this model fixes it"):
        qc.calibrate(prepared, [torch.randn(64, 8)], progress=False)
    qc.calibrate(prepared, [torch.randn(4, 8)], progress=False)


def test_static_capture_when_asked_rejects_other_batch_sizes():
    prepared = qc.prepare(nn.Linear(8, 4).eval(), torch.randn(4, 8), dynamic_shapes=None)
    with pytest.raises(qc.InvalidInputsError,
                       match=r"size 5 in dim 0 \(shape \(5, 8\)\), captured as \(4, 8\) .*prepare got "
                             r"dynamic_shapes=None\); give batches of that size, or pass dynamic_shapes= to prepare"):
        qc.calibrate(prepared, [torch.randn(5, 8)], progress=False)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, mask):
        return self.fc(x * mask)


def test_inputs_that_share_the_batch_must_agree_within_a_batch():
    """x and mask were captured with one batch symbol: any batch size, but one per batch."""
    prepared = qc.prepare(TwoInputs().eval(), (torch.randn(2, 8), torch.ones(2, 8)))
    qc.calibrate(prepared, [(torch.randn(6, 8), torch.ones(6, 8))], progress=False)
    with pytest.raises(qc.InvalidInputsError, match=r"input 'mask' has size 3 in dim 0 \(shape \(3, 8\)\) where "
                                                    r"input 'x' has 6 in dim 0"):
        qc.calibrate(prepared, [(torch.randn(6, 8), torch.ones(3, 8))], progress=False)


def test_dynamic_shapes_takes_batch_none_or_a_spec_only():
    with pytest.raises(qc.InvalidInputsError, match=r"dynamic_shapes='sequence': give 'batch'"):
        qc.prepare(nn.Linear(8, 4), torch.randn(2, 8), dynamic_shapes="sequence")
