"""FP32 master weights for a model stored and run in FP16 or BF16.

An update lr * g smaller than half a unit in the last place of a weight is lost when it is added to
an FP16/BF16 weight (FP16 keeps 11 significant bits, BF16 8): many small steps then add up to nothing.
`MasterWeights` keeps a float32 copy of every trainable parameter, lets the optimizer update those
copies, and writes them back, rounded, into the low-precision model after each optimizer step.

    mw = MasterWeights(model, torch.optim.AdamW, dtype=torch.float16, lr=1e-3)
    out = mw.model(x.half())                       # forward and backward in FP16
    scaler.scale(loss_fn(out.float(), y)).backward()
    scaler.step(mw); scaler.update(); mw.zero_grad()

The wrapper trains a copy: `mw.model` is a deep copy of `model` cast to `dtype` (the user's model is
left as it was). Gradients move to the masters during backward (a post-accumulate-grad hook adds each
low-precision gradient, converted exactly to float32, into the master's `.grad` and frees the low-
precision one), so gradient accumulation over micro-batches sums in float32 and any optimizer, and
`torch.amp.GradScaler` or `DynamicLossScaler`, see float32 parameters and gradients only.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from ..errors import QCompileError

LOW_PRECISION = (torch.float16, torch.bfloat16)


class MasterWeightsError(QCompileError):
    """MasterWeights was given something it cannot wrap."""


class MasterWeights:
    def __init__(self, model: nn.Module, optimizer: Callable[..., torch.optim.Optimizer],
                 dtype: torch.dtype = torch.float16, keep_fp32: tuple[type, ...] = (), **optimizer_kwargs):
        """`optimizer` is an optimizer class or any callable taking (params, **optimizer_kwargs).
        Modules of the types in `keep_fp32` stay float32 in the model (their parameters are their own
        masters), e.g. (nn.BatchNorm2d,) when a kernel lacks a low-precision variant."""
        if not isinstance(model, nn.Module):
            raise MasterWeightsError(f"MasterWeights wraps a torch.nn.Module, got {type(model).__name__}")
        if dtype not in LOW_PRECISION:
            raise MasterWeightsError(f"dtype must be torch.float16 or torch.bfloat16 (the low-precision storage), "
                                     f"got {dtype}")
        self.dtype = dtype
        self.model = copy.deepcopy(model)
        for module in self.model.modules():
            if not isinstance(module, keep_fp32):
                for name, p in module.named_parameters(recurse=False):
                    p.data = p.data.to(dtype)
                for name, b in module.named_buffers(recurse=False):
                    if b.is_floating_point():
                        setattr(module, name, b.to(dtype))
        self._pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        self._hooks = []
        for p in self.model.parameters():
            if not p.requires_grad:
                continue
            if p.dtype == torch.float32:
                master = p                          # kept in float32: it is its own master
            else:
                master = nn.Parameter(p.detach().float().clone())
                self._hooks.append(p.register_post_accumulate_grad_hook(_move_grad_to(master)))
            self._pairs.append((p, master))
        if not self._pairs:
            raise MasterWeightsError("the model has no trainable parameters")
        self.optimizer = optimizer([m for _, m in self._pairs], **optimizer_kwargs)

    @property
    def masters(self) -> list[nn.Parameter]:
        return [m for _, m in self._pairs]

    @property
    def param_groups(self):
        """The optimizer's groups (over the masters): what schedulers and loss scalers read."""
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for p, _ in self._pairs:
            p.grad = None

    def step(self, *args, **kwargs):
        """One optimizer step on the float32 masters, then the rounded copy back into the model."""
        result = self.optimizer.step(*args, **kwargs)
        self.copy_to_model()
        return result

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, master in self._pairs:
            if p is not master:
                p.copy_(master)             # one round-to-nearest-even per weight

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "masters": [m.detach().clone() for m in self.masters]}

    def load_state_dict(self, state: dict) -> None:
        masters = state["masters"]
        if len(masters) != len(self._pairs):
            raise MasterWeightsError(f"the state holds {len(masters)} master tensors, this wrapper has {len(self._pairs)}")
        with torch.no_grad():
            for (_, m), saved in zip(self._pairs, masters):
                m.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.copy_to_model()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def _move_grad_to(master: nn.Parameter):
    def hook(p: torch.Tensor) -> None:
        g = p.grad.detach().float()     # exact: every FP16/BF16 value is a float32 value
        if master.grad is None:
            master.grad = g
        else:
            master.grad.add_(g)
        p.grad = None
    return hook
