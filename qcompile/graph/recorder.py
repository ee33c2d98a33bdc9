"""Run calibration batches through a prepared graph and hand the inputs of chosen nodes to a callback.

Algorithm passes (SmoothQuant, AWQ, GPTQ, outlier split) need what flows into a layer: per-channel
maxima, a Hessian, a sample of rows. `record_inputs` inserts a temporary recorder node on one
argument of each chosen node, runs the batches with every observer switched off (so that
calibration statistics are not polluted), and removes the recorders again. The callback decides
what to keep, so memory stays bounded by what the caller accumulates.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, fx, nn

from ..capture import normalize_inputs
from ..graph.annotation import get_arg, set_arg

RECORDER_PREFIX = "qc_recorder_"


class _Recorder(nn.Module):
    def __init__(self, key: str, callback: Callable[[str, Tensor], None]):
        super().__init__()
        self.key, self.callback = key, callback

    def forward(self, x: Tensor) -> Tensor:
        self.callback(self.key, x.detach())
        return x


class _Stop(Exception):
    """Raised by the last recorder to skip the rest of the forward pass."""


@contextlib.contextmanager
def observers_disabled(gm: fx.GraphModule):
    """Observers and fake-quant modules pass values through without recording statistics."""
    from ..observers import Observer

    saved = []
    for mod in gm.modules():
        if isinstance(mod, Observer):
            saved.append((mod, None))
            mod.forward = lambda x: x
    try:
        yield
    finally:
        for mod, _ in saved:
            del mod.forward


def record_inputs(gm: fx.GraphModule, nodes: Sequence[fx.Node], batches: Iterable,
                  callback: Callable[[str, Tensor], None], *, arg: int = 0, stop_early: bool = True) -> None:
    """Call `callback(node.name, x)` for argument `arg` of every node in `nodes`, per batch.

    With `stop_early`, the forward pass stops after the last recorded node runs (cheap when one
    early layer is recorded at a time, as GPTQ does)."""
    if not nodes:
        return
    inserted: list[tuple[fx.Node, fx.Node, fx.Node]] = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = max(nodes, key=order.__getitem__).name
    seen_last = []

    def record(key: str, x: Tensor) -> None:
        callback(key, x)
        if stop_early and key == last:
            seen_last.append(True)
            raise _Stop

    try:
        for i, node in enumerate(nodes):
            attr = f"{RECORDER_PREFIX}{i}"
            gm.add_submodule(attr, _Recorder(node.name, record))
            x = get_arg(node, arg)
            with gm.graph.inserting_before(node):
                rec = gm.graph.call_module(attr, (x,))
            rec.meta["val"] = x.meta.get("val")
            set_arg(node, arg, rec)
            inserted.append((node, rec, x))
        gm.recompile()
        with torch.no_grad(), observers_disabled(gm):
            for batch in batches:
                args, kwargs = normalize_inputs(batch, what="calibration batch")
                try:
                    gm(*args, **kwargs)
                except _Stop:
                    pass
    finally:
        for i, (node, rec, x) in enumerate(inserted):
            set_arg(node, arg, x)
            gm.graph.erase_node(rec)
            delattr(gm, f"{RECORDER_PREFIX}{i}")
        gm.recompile()
