"""qc.report: a self-contained HTML page (no scripts, nothing fetched), rendered in headless
Chromium with its console checked; the screenshot stays in pytest's tmp_path."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

import qcompile as qc
from qcompile.debug.compare import compare
from qcompile.debug.report import report
from qcompile.debug.sensitivity import sensitivity


@pytest.fixture(scope="module")
def page(digits, one_thread, tmp_path_factory):
    model, (x_train, *_) = digits
    calib = [x_train[i:i + 64] for i in range(0, 256, 64)]
    prepared = qc.prepare(model, calib[0], recipe="w8a8")
    qc.calibrate(prepared, calib, progress=False)
    quantized = qc.convert(prepared)
    sens = sensitivity(model, calib[:2], ["w4a8"], progress=False)
    path = tmp_path_factory.mktemp("report") / "report.html"
    report(quantized, compare=compare(prepared, quantized, calib[:2]), sensitivity=sens,
           title="digits w8a8").to_html(path)
    return path, quantized


def test_report_holds_every_section_offline(page):
    path, quantized = page
    text = path.read_text()
    for section in ("Per-node error", "Sensitivity ranking", "Chosen precision per layer", "Pass log",
                    "Rewritten graph"):
        assert f">{section}" in text
    assert "<script" not in text and "<link" not in text and "src=" not in text
    # the only URL is the SVG namespace
    assert set(re.findall(r"https?://[^\"' <]+", text)) == {"http://www.w3.org/2000/svg"}
    # one box per drawn node: every node but the get_attr ones
    drawn = sum(1 for n in quantized.graph.nodes if n.op != "get_attr")
    graph = text[text.index('<div class="graph">'):]
    assert graph.count("<rect ") == drawn
    # one timing bar and one table row per pass of the log
    for r in quantized.meta["qcompile"].records:
        assert f"<td>{r.name}</td><td>{r.seconds * 1e3:.1f}</td>" in text


def _chromium(url: str, shot) -> tuple[int, list[str]]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,2400",
                           f"--screenshot={shot}", "--enable-logging=stderr", "--v=0", url],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")),
                    reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_report_renders_in_chromium_without_console_errors(page, tmp_path):
    path, _ = page
    # the check itself: a page with a script error must show up on the console lines
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    rc, console = _chromium(bad.as_uri(), tmp_path / "bad.png")
    assert rc == 0 and any("undefinedFunction" in ln for ln in console)
    shot = tmp_path / "report.png"   # kept by pytest under its basetemp, not in the repository
    rc, console = _chromium(path.as_uri(), shot)
    assert rc == 0 and console == []
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000   # a drawn page, not a blank one
    print(f"screenshot: {shot}")
