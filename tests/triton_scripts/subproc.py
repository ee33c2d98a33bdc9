"""Run a test file again in a child pytest with TRITON_INTERPRET=1 (or without it, for AOT compiles).

Triton decides at decoration time whether a @triton.jit kernel is interpreted, so interpreter tests
and ahead-of-time compiles cannot share a process: each test file that needs one of them re-runs
itself in a child process whose environment is set before anything imports triton.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
CHILD = "QCOMPILE_TRITON_CHILD"   # set in the child: its tests run for real there


def in_child() -> bool:
    return os.environ.get(CHILD) == "1"


def run_child(path: str, *, interpret: bool, min_passed: int, timeout: int = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({CHILD: "1", "TRITON_DEFAULT_FP_FUSION": "1", "OMP_NUM_THREADS": "1"})
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", path]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    tail = r.stdout[-6000:] + r.stderr[-2000:]
    assert r.returncode == 0, f"child pytest failed (rc {r.returncode}):\n{tail}"
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= min_passed, f"expected >= {min_passed} passed:\n{tail}"
    return r.stdout
