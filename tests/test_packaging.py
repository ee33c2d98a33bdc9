"""Packaging: the core install needs no runtime (onnxruntime or onnxruntime-gpu, triton: extras),
and what needs one says which extra to install."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")   # python >= 3.11
ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_dependencies_are_tested_ranges_and_runtimes_are_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = [Requirement(r) for r in project["dependencies"]]
    assert {r.name for r in core} == {"torch", "numpy", "networkx", "tqdm", "onnx", "onnxscript", "onnx-ir",
                                       "scipy"}
    for r in core:   # a floor and a ceiling, not one exact version
        ops = {s.operator for s in r.specifier}
        assert ops == {">=", "<"}, f"{r}: expected a >= / < range"
    torch_req = next(r for r in core if r.name == "torch")
    assert "2.13.0" in torch_req.specifier and "2.12.0" not in torch_req.specifier
    extras = {name: {Requirement(r).name for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    assert extras["cpu"] == {"onnxruntime"} and extras["gpu"] == {"onnxruntime-gpu", "triton"}
    assert "qcompile" in extras["test"]    # the test extra takes the CPU runtime


LAZY_ONNX = """
import sys, qcompile as qc
assert not any(m == "onnx" or m.startswith(("onnx.", "onnxscript")) for m in sys.modules), "loaded by import"
assert callable(qc.export_onnx) and callable(qc.verify)
assert "onnxscript" in sys.modules
"""


def test_import_loads_the_onnx_exporter_only_when_it_is_used():
    """`import qcompile` leaves onnx and onnxscript (70 MB of a process, 1.4 s) until export_onnx or
    verify is first read: a sequential GPTQ run's memory is measured against a 1.5 GB budget."""
    result = subprocess.run([sys.executable, "-c", LAZY_ONNX], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


NO_RUNTIME = """
import sys
for name in ("onnxruntime", "triton"):
    sys.modules[name] = None   # as if not installed
import torch, qcompile as qc
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
prepared = qc.prepare(model, torch.randn(2, 8))
qc.calibrate(prepared, [torch.randn(16, 8)], progress=False)
quantized = qc.convert(prepared)
assert qc.lower(quantized, backend="torch")(torch.randn(3, 8)).shape == (3, 4)
qc.export_onnx(quantized, sys.argv[1])
try:
    qc.verify(quantized, sys.argv[1], [torch.randn(2, 8)])
except qc.QCompileError as e:
    print("QCompileError:", e)
"""


def test_the_core_install_quantizes_lowers_and_exports_without_a_runtime(tmp_path):
    out = subprocess.run([sys.executable, "-c", NO_RUNTIME, str(tmp_path / "m.onnx")], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "m.onnx").is_file()
    assert "QCompileError: running ONNX files needs onnxruntime: pip install 'qcompile[cpu]'" in out.stdout
    assert "'qcompile[gpu]' (onnxruntime-gpu" in out.stdout
