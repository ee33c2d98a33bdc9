"""torch.export capture: input normalization, checks of what the user gave, readable failures."""
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


def capture(model: nn.Module, example_inputs: Any, dynamic_shapes=None, copy_model: bool = True) -> fx.GraphModule:
    """Export an eval-mode copy of `model`; the user's model is left as it was (`copy_model=False`:
    the caller owns `model`, which is exported as it is, without a copy of its weights)."""
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"qcompile quantizes torch.nn.Module objects, got {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs)
    if not _tensors(args, kwargs):
        raise InvalidInputsError("example_inputs hold no tensor; pass the tensors the model's forward takes")
    model = (copy.deepcopy(model) if copy_model else model).eval()
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:
        raise InvalidInputsError(
            f"the model rejects the example inputs: {type(e).__name__}: {_first_line(e)}. "
            f"Pass inputs with the shapes and dtypes its forward expects."
        ) from e
    try:
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:
        raise CaptureError(_explain_export_failure(e)) from e
    gm = ep.module()
    _strip_guards(gm)
    return gm


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
