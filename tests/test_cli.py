"""The `qcompile` command in a subprocess: help, quantize -> ONNX + report, inspect, bad input.

Runs the installed `qcompile` console script (next to this Python, as `pip install` puts it),
from a folder holding a small user module, as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

USER_MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()

    def batches():
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(8, 16, generator=g),) for _ in range(4)]
""")


COMMAND = os.path.join(os.path.dirname(sys.executable), "qcompile")


def qcompile(*args, cwd):
    assert os.path.exists(COMMAND), "the qcompile console script is not installed: pip install -e ."
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([COMMAND, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "usermodels.py").write_text(USER_MODULE)
    return d


def test_help_names_every_command(workdir):
    out = qcompile("--help", cwd=workdir)
    assert out.returncode == 0
    for word in ("quantize", "inspect", "demo", "MODULE:FACTORY", "--calib"):
        assert word in out.stdout


def test_quantize_writes_onnx_and_report_then_inspect_reads_it(workdir):
    out = qcompile("quantize", "usermodels:build", "--calib", "usermodels:batches", "--recipe", "w8a16",
                   "--onnx", "m.onnx", "--report", "r.html", "--save-recipe", "recipe.json", cwd=workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "first divergence" not in out.stdout and "no node below" in out.stdout
    assert (workdir / "r.html").read_text().count("<svg") >= 3
    info = qcompile("inspect", "m.onnx", cwd=workdir)
    assert info.returncode == 0, info.stderr
    # two Linear weights, 16x32 and 32x4, stored as INT8 codes
    assert "2 quantized initializers, 8.000 average bits over the 640 weight elements" in info.stdout
    assert '"name": "w8a16"' in (workdir / "recipe.json").read_text()


def test_bad_input_exits_non_zero_with_one_line(workdir):
    out = qcompile("quantize", "usermodels:missing", cwd=workdir)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == ["qcompile: error: module 'usermodels' has no 'missing' (for the model factory)"], out.stderr


# More bad input, in process (each subprocess pays for importing torch).
@pytest.mark.parametrize("args, message", [
    (["quantize", "usermodels:build", "--calib", "usermodels:batches", "--recipe", "w9a9"], "unknown recipe 'w9a9'"),
    (["quantize", "usermodels"], "must look like module.path:function"),
    (["quantize", "usermodels:build"], "give calibration data with --calib"),
    (["quantize", "usermodels:build", "--calib", "usermodels:batches", "--recipe", "nope.json"], "does not exist"),
    (["inspect", "nothing.onnx"], "nothing.onnx does not exist"),
    (["inspect", "usermodels.py"], "neither an .onnx file nor a dump directory"),
])
def test_bad_input_in_process(workdir, monkeypatch, capsys, args, message):
    from qcompile.cli import main

    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qcompile: error: ") and message in err[0], err
