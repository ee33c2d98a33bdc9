"""QState: what qcompile keeps on a prepared or quantized GraphModule (`gm.meta["qcompile"]`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .spec import Recipe


@dataclass
class QState:
    recipe: Recipe
    stage: str = "captured"                           # captured -> prepared -> calibrated -> quantized
    groups: list = field(default_factory=list)        # share_qparams.Group
    observers: dict = field(default_factory=dict)     # group id -> observer attribute name
    records: list = field(default_factory=list)       # PassRecord of every pass run so far
    calibration_batches: int = 0
    # Filled by convert, read by inspect: one row per quantized tensor.
    qparams: list = field(default_factory=list)
