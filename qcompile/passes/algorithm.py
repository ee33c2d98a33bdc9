"""PTQ algorithm passes (SmoothQuant, AWQ, GPTQ, outlier split): the interface and the registry.

An algorithm pass runs inside `qc.calibrate`, on the prepared graph, before the observers see the
calibration batches, so that the activation ranges are those of the rewritten graph. It may read
the batches (through `graph.recorder.record_inputs`), rewrite weights and parameters, insert
nodes, fix a weight's qparams in `state.weight_qparams`, and report what it found in
`state.algorithm_reports[name]`. It must leave the graph's float output as it was, or say in its
docstring how it changes it.
"""
from __future__ import annotations

import importlib
from typing import Any, Sequence

from torch import fx

from ..errors import RecipeError
from .base import Pass, PassResult

# name -> "module:class", imported on first use so that an algorithm's dependencies load lazily.
ALGORITHMS: dict[str, str] = {
    "smoothquant": "qcompile.passes.smoothquant:SmoothQuant",
    "awq": "qcompile.passes.awq:AWQ",
    "gptq": "qcompile.passes.gptq:GPTQ",
    "outlier_split": "qcompile.passes.outliers:OutlierSplit",
}


class AlgorithmPass(Pass):
    """Subclasses set `name`, accept their options as keyword arguments in `__init__`, and
    implement `run(gm, batches) -> dict` (the stats of the PassRecord)."""

    def __init__(self, **options: Any):
        self.options = options
        self.batches: Sequence = ()

    def with_batches(self, batches: Sequence) -> "AlgorithmPass":
        self.batches = batches
        return self

    def run(self, gm: fx.GraphModule, batches: Sequence) -> dict:
        raise NotImplementedError

    def call(self, gm: fx.GraphModule) -> PassResult:
        stats = self.run(gm, self.batches)
        return PassResult(gm, modified=True, stats=stats or {})


def make_algorithm(name: str, options: dict) -> AlgorithmPass:
    if name not in ALGORITHMS:
        raise RecipeError(f"unknown PTQ algorithm {name!r}; known: {', '.join(ALGORITHMS)}")
    module, cls = ALGORITHMS[name].split(":")
    try:
        algorithm = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise RecipeError(f"the PTQ algorithm {name!r} is not available in this build: {e}") from e
    try:
        return algorithm(**options)
    except TypeError as e:
        raise RecipeError(f"bad options for the PTQ algorithm {name!r}: {e}") from e
