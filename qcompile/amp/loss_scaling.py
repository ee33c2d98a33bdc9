"""Dynamic loss scaling for models whose gradients are computed in FP16.

FP16's smallest subnormal is 2**-24 (about 6e-8): gradients below half of it become zero in the
backward pass. Multiplying the loss by a scale S moves every gradient up by S so it stays
representable; the optimizer sees the gradients divided by S again, in float32. When a scaled
gradient overflows (inf/NaN), that step is skipped and S is multiplied by `backoff_factor`; after
`growth_interval` finite steps in a row S is multiplied by `growth_factor`.

`DynamicLossScaler` has the contract of `torch.amp.GradScaler` (scale / unscale_ / step / update /
get_scale / state_dict; one `update()` per iteration, any number of optimizers) and makes the same
decisions (tests/test_amp.py runs both on one sequence). It exists because GradScaler refuses a model
trained entirely in FP16: its `unscale_` raises "Attempting to unscale FP16 gradients". This scaler
accepts FP16 gradients (it unscales them in float32 and rounds once), and records its history (scale
per step, skipped steps) for inspection. The best setup for an FP16 model is the scaler plus
`MasterWeights`: gradients then reach the optimizer as float32 and unscaling cannot underflow; with
MasterWeights, `torch.amp.GradScaler` itself works too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import QCompileError


class LossScalerError(QCompileError):
    """The loss scaler was used out of order or configured with impossible factors."""


@dataclass
class _OptimizerState:
    unscaled: bool = False
    stepped: bool = False
    found_inf: bool = False


@dataclass
class ScalerStep:
    scale: float        # the scale the step's gradients were computed with
    skipped: bool       # True when a gradient was inf/NaN and the optimizer step was skipped


class DynamicLossScaler:
    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True):
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise LossScalerError(f"init_scale must be a positive finite number, got {init_scale}")
        if not growth_factor > 1.0:
            raise LossScalerError(f"growth_factor must be > 1 (the scale grows after finite steps), got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise LossScalerError(f"backoff_factor must be in (0, 1) (the scale shrinks on overflow), got {backoff_factor}")
        if growth_interval < 1:
            raise LossScalerError(f"growth_interval must be a positive number of steps, got {growth_interval}")
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self._enabled = enabled
        self._scale = float(init_scale)
        self._growth_tracker = 0
        self._per_optimizer: dict[int, _OptimizerState] = {}
        self.history: list[ScalerStep] = []

    # --- the GradScaler contract -------------------------------------------------------------------
    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        return self._scale if self._enabled else 1.0

    def scale(self, outputs):
        """outputs * S in float32 (a tensor, or tensors nested in lists/tuples). Float32 because S itself
        may exceed FP16's max (65504 < 2**16): the gradient flowing back into an FP16 graph is
        S * dloss/dout, which is what must fit."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, Tensor):
            return outputs.float() * self._scale
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        raise LossScalerError(f"scale() takes a tensor or a list/tuple of tensors, got {type(outputs).__name__}")

    def unscale_(self, optimizer) -> None:
        """Divide the gradients of `optimizer`'s parameters by S in place and look for inf/NaN."""
        if not self._enabled:
            return
        state = self._state(optimizer)
        if state.unscaled:
            raise LossScalerError("unscale_() was already called on this optimizer since the last update(); "
                                  "call it once per optimizer per iteration")
        if state.stepped:
            raise LossScalerError("unscale_() is being called after step(); call it before step()")
        inv = 1.0 / self._scale
        found_inf = False
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p.grad.is_sparse:
                        raise LossScalerError("sparse gradients are not supported by DynamicLossScaler")
                    g32 = p.grad.float()
                    if not torch.isfinite(g32).all():
                        found_inf = True
                    # one rounding from the float32 product back to the gradient's dtype
                    p.grad.copy_(g32 * inv)
        state.unscaled = True
        state.found_inf = found_inf

    def step(self, optimizer, *args, **kwargs):
        """optimizer.step(...) unless a gradient was inf/NaN; returns what it returns, or None if skipped."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise LossScalerError("closures are not supported: the loss must be scaled before backward")
        state = self._state(optimizer)
        if state.stepped:
            raise LossScalerError("step() has already been called on this optimizer since the last update()")
        if not state.unscaled:
            self.unscale_(optimizer)
        state.stepped = True
        if state.found_inf:
            return None
        return optimizer.step(*args, **kwargs)

    def update(self, new_scale: float | None = None) -> None:
        """Back off after an overflow, grow after `growth_interval` finite steps; once per iteration."""
        if not self._enabled:
            return
        if not self._per_optimizer and new_scale is None:
            raise LossScalerError("update() found no step() or unscale_() since the last update(); "
                                  "call scaler.step(optimizer) first")
        found_inf = any(s.found_inf for s in self._per_optimizer.values())
        self.history.append(ScalerStep(self._scale, found_inf))
        if new_scale is not None:
            self._scale = float(new_scale)
        elif found_inf:
            self._scale *= self.backoff_factor
            self._growth_tracker = 0
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                grown = self._scale * self.growth_factor
                if math.isfinite(grown):        # as GradScaler: never grow to inf
                    self._scale = grown
                self._growth_tracker = 0
        self._per_optimizer.clear()

    def state_dict(self) -> dict:
        return {"scale": self._scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": self._growth_tracker} if self._enabled else {}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            raise LossScalerError("the state dict is empty (it came from a disabled scaler)")
        self._scale = float(state["scale"])
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self._growth_tracker = int(state["_growth_tracker"])

    # --- inspection --------------------------------------------------------------------------------
    @property
    def skipped_steps(self) -> int:
        return sum(s.skipped for s in self.history)

    def _state(self, optimizer) -> _OptimizerState:
        return self._per_optimizer.setdefault(id(optimizer), _OptimizerState())
