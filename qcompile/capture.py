"""torch.export capture: input normalization, checks of what the user gave, readable failures.

The batch is dynamic by default (`dynamic_shapes="batch"`): the leading dim of every tensor input
is `torch.export.Dim.AUTO`, so a model captured on two examples calibrates on batches of 64 and
runs (reference graph, lowered modules, ONNX file) at any batch size. AUTO keeps a dim static
where the model specializes it (a reshape to a fixed batch, a leading dim that is not a batch);
batches must then have the example's size there, and calibrate's check says so.

torch.export specializes every size-1 dim to 1, so a one-sample example (every leading dim 1)
is traced on itself repeated to a batch of 2; the graph is kept only if it reproduces the eager
output of the one-sample example, else the example is captured as given (batch fixed to 1).
`dynamic_shapes=None` captures every dim static (torch.export's meaning); a torch.export spec asks
for more (sequence dims) or for something else.
"""
from __future__ import annotations

import copy
import inspect
import os
import traceback
from typing import Any

import torch
from torch import fx, nn

from .errors import CaptureError, InvalidInputsError, InvalidModelError

Args = tuple
Kwargs = dict


def normalize_inputs(inputs: Any, what: str = "example_inputs") -> tuple[Args, Kwargs]:
    """A tensor, a tuple/list of positional arguments, or a dict of keyword arguments."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise InvalidInputsError(
        f"{what} must be a tensor, a tuple of positional arguments or a dict of keyword arguments, "
        f"got {type(inputs).__name__}"
    )


def flatten_for_graph(gm: fx.GraphModule, args: Args, kwargs: Kwargs) -> list:
    """The flat placeholder values of a captured graph for a batch, re-split into the positional /
    keyword structure it was captured with (a user may give a tuple where the example was a dict,
    or the other way round). Raises InvalidInputsError when the batch does not fit."""
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        return list(args)
    try:
        return list(torch.fx._pytree.tree_flatten_spec((args, kwargs), spec))
    except Exception:
        pass
    try:
        given = inspect.signature(gm.forward).bind(*args, **kwargs).arguments
        args_spec, kwargs_spec = spec.children()
        names = list(given)
        captured_args = tuple(given[n] for n in names[:args_spec.num_children])
        captured_kwargs = {k: given[k] for k in kwargs_spec.context}
        return list(torch.fx._pytree.tree_flatten_spec((captured_args, captured_kwargs), spec))
    except Exception as e:
        raise InvalidInputsError(f"{e}. Give batches structured like the example inputs") from e


def _tensors(args: Args, kwargs: Kwargs) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    return [t for t in leaves if isinstance(t, torch.Tensor)]


DYNAMIC_BATCH = "batch"


def batch_dynamic_shapes(model: nn.Module, args: Args, kwargs: Kwargs) -> dict:
    """`{0: Dim.AUTO}` for every tensor input of rank >= 1, keyed by argument name as torch.export
    binds them (`inspect.signature(model.forward)`); None for everything else."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments

    def leading(value):
        return {0: torch.export.Dim.AUTO} if isinstance(value, torch.Tensor) and value.ndim >= 1 else None

    return {name: torch.utils._pytree.tree_map(leading, value) for name, value in bound.items()}


def one_sample(args: Args, kwargs: Kwargs) -> bool:
    """Whether every tensor input of rank >= 1 has a leading dim of 1 (a batch of one)."""
    leading = [t.shape[0] for t in _tensors(args, kwargs) if t.ndim >= 1]
    return bool(leading) and all(n == 1 for n in leading)


def _repeat_batch(args: Args, kwargs: Kwargs, n: int) -> tuple[Args, Kwargs]:
    def rep(x):
        return x.expand(n, *x.shape[1:]).clone() if isinstance(x, torch.Tensor) and x.ndim >= 1 else x
    return torch.utils._pytree.tree_map(rep, (args, kwargs))


def capture(model: nn.Module, example_inputs: Any, dynamic_shapes=DYNAMIC_BATCH,
            copy_model: bool = True) -> fx.GraphModule:
    """Export an eval-mode copy of `model`; the user's model is left as it was (`copy_model=False`:
    the caller owns `model`, which is exported as it is, without a copy of its weights).

    `dynamic_shapes`: "batch" (default: the leading dim of every tensor input dynamic where the
    model allows it, see the module docstring), None (all static) or a torch.export spec."""
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"qcompile quantizes torch.nn.Module objects, got {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs)
    if not _tensors(args, kwargs):
        raise InvalidInputsError("example_inputs hold no tensor; pass the tensors the model's forward takes")
    model = (copy.deepcopy(model) if copy_model else model).eval()
    try:
        with torch.no_grad():
            expected = model(*args, **kwargs)
    except Exception as e:
        raise InvalidInputsError(
            f"the model rejects the example inputs: {type(e).__name__}: {_first_line(e)}. "
            f"Pass inputs with the shapes and dtypes its forward expects."
        ) from e
    if isinstance(dynamic_shapes, str):
        if dynamic_shapes != DYNAMIC_BATCH:
            raise InvalidInputsError(f"dynamic_shapes={dynamic_shapes!r}: give {DYNAMIC_BATCH!r} (the default: a dynamic "
                                     "batch), None (every dim static) or a torch.export dynamic_shapes spec")
        gm = _capture_dynamic_batch(model, args, kwargs, expected)
    else:
        gm = _export(model, args, kwargs, dynamic_shapes)
    return gm


def _export(model: nn.Module, args: Args, kwargs: Kwargs, dynamic_shapes) -> fx.GraphModule:
    try:
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:
        raise CaptureError(_explain_export_failure(e)) from e
    gm = ep.module()
    _strip_guards(gm)
    return gm


def _capture_dynamic_batch(model: nn.Module, args: Args, kwargs: Kwargs, expected) -> fx.GraphModule:
    """Dynamic leading dims (Dim.AUTO). A model whose batch cannot be made dynamic at all is
    captured static rather than refused: the user asked for nothing, so nothing should fail."""
    spec = batch_dynamic_shapes(model, args, kwargs)
    if one_sample(args, kwargs):
        try:
            gm = _export(model, *_repeat_batch(args, kwargs, 2), spec)
            with torch.no_grad():
                if _same_outputs(gm(*args, **kwargs), expected):
                    return gm
        except Exception:   # noqa: BLE001 - the model needs its batch of 1: captured as given below
            pass
    try:
        return _export(model, args, kwargs, spec)
    except CaptureError:
        return _export(model, args, kwargs, None)


def _amax(t: torch.Tensor) -> float:
    return float(t.abs().amax()) if t.numel() else 0.0


def _same_outputs(got, want) -> bool:
    """Whether the captured graph reproduced the eager outputs at the example (structure, shapes, values)."""
    got_leaves, got_spec = torch.utils._pytree.tree_flatten(got)
    want_leaves, want_spec = torch.utils._pytree.tree_flatten(want)
    if got_spec != want_spec:
        return False
    for a, b in zip(got_leaves, want_leaves):
        if isinstance(b, torch.Tensor):
            if not isinstance(a, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
                return False
            if b.is_floating_point() and not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + _amax(b))):
                return False
            if not b.is_floating_point() and not torch.equal(a, b):
                return False
        elif a != b:
            return False
    return True


def _strip_guards(gm: fx.GraphModule) -> None:
    """Drop the input-guard submodule torch.export adds: later passes rewrite the graph it guards."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _user_frame(e: BaseException) -> str | None:
    """The innermost frame outside torch and site-packages: usually the construct that failed."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        name = frame.filename
        if name.startswith("<") or name.startswith(skip):
            continue  # generated code, torch itself, or qcompile
        return f"{name}:{frame.lineno} in {frame.name}: {frame.line}"
    return None


def _explain_export_failure(e: BaseException) -> str:
    text = str(e)
    where = _user_frame(e)
    lowered = text.lower()
    if "data-dependent" in lowered or "data dependent" in lowered or "guardondatadependent" in lowered:
        hint = ("the model branches on tensor values (data-dependent control flow). Rewrite the branch "
                "with torch.cond or torch.where, or exclude that module with recipe.replace(exclude=(...)) "
                "and quantize the rest")
    elif "constraint" in lowered or "dynamic" in lowered or "specializ" in lowered:
        hint = ("the dynamic_shapes you asked for conflict with what the model does; relax them "
                "(torch.export.Dim.AUTO) or pass static example shapes")
    else:
        hint = ("torch.export could not trace it (qcompile already uses strict=False). Simplify the "
                "failing construct, or exclude the module that contains it")
    location = f" at {where}" if where else ""
    return f"torch.export could not capture the model{location}: {type(e).__name__}: {_first_line(e)}. Hint: {hint}."
