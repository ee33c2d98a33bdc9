"""How a model is cut into stages, and what flows into each.

A model is run as: prologue (everything before the first block: embeddings, rotary tables,
masks) -> blocks (the decoder layers, one stage each) -> head (the modules after the last block,
e.g. the final norm and lm_head, one stage each). The prologue runs in float, once, to produce
the inputs of block 0; every stage is then captured, calibrated and converted on its own.

- Blocks: a `torch.nn.ModuleList` path (`"model.layers"`), a list of module names, or found
  automatically: the ModuleList of same-class modules holding the most parameters.
- Block inputs: the prologue runs with block 0 replaced by a catcher that records its arguments.
  Argument 0 (the hidden states) is carried from stage to stage; the other tensor arguments
  (position embeddings, position ids, masks) are those block 0 received, and every block gets
  them (true of LLaMA-style decoders; models whose layers take different masks, e.g. sliding-window
  layers, are refused). Non-tensor arguments (`use_cache=False`, `cache=None`) are constants of
  the captured stage.
- Head: the top-level modules that run after the last block, in call order, found by running the
  model once with the blocks skipped; accepted only when applying them in turn to the last hidden
  state gives the model's output exactly.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from ..capture import normalize_inputs
from ..errors import CheckpointError, InvalidInputsError, InvalidModelError
from .checkpoint import Checkpoint


# ------------------------------------------------------------------------------------------------
# finding the blocks
# ------------------------------------------------------------------------------------------------

def find_blocks(model: nn.Module, blocks=None) -> list[str]:
    """Module names of the blocks, in order."""
    names = dict(model.named_modules())
    if blocks is None:
        best, best_size = None, 0
        for name, mod in names.items():
            if isinstance(mod, nn.ModuleList) and len(mod) >= 1 and len({type(m) for m in mod}) == 1:
                size = sum(p.numel() for p in mod.parameters())
                if size > best_size:
                    best, best_size = name, size
        if best is None:
            raise InvalidModelError(f"{type(model).__name__} has no nn.ModuleList of repeated blocks; pass "
                                    "blocks= (a ModuleList path like 'model.layers', or a list of module names)")
        blocks = best
    if isinstance(blocks, str):
        mod = names.get(blocks)
        if not isinstance(mod, nn.ModuleList):
            raise InvalidModelError(f"blocks={blocks!r} is not an nn.ModuleList of the model "
                                    f"(module names as in model.named_modules())")
        return [f"{blocks}.{i}" for i in range(len(mod))]
    blocks = list(blocks)
    missing = [b for b in blocks if b not in names]
    if missing or not blocks:
        raise InvalidModelError(f"blocks names no module of the model: {missing or blocks}")
    return blocks


def check_uniform_layers(model: nn.Module) -> None:
    """Refuse models whose layers take different attention masks (block 0's are carried to all)."""
    kinds = getattr(getattr(model, "config", None), "layer_types", None)
    if kinds and len(set(kinds)) > 1:
        raise InvalidModelError(f"this model's layers take different attention masks ({sorted(set(kinds))}); "
                                "sequential quantization carries block 0's inputs to every block and does not "
                                "handle that yet: quantize it in memory with qc.prepare")


# ------------------------------------------------------------------------------------------------
# weights: a meta copy of the model, tensors loaded per module
# ------------------------------------------------------------------------------------------------

def meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy whose parameters are on the meta device (the model itself is untouched,
    and its weights, if it has any in memory, are not copied). Buffers keep their values."""
    memo = {}
    for p in model.parameters():
        if not p.is_meta:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def tensor_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Full tensor name -> every name of the same tensor (tied weights: lm_head / embed_tokens)."""
    groups: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(t), []).append(name)
    aliases = {n: g for g in groups.values() for n in g}
    # the ties transformers declares (only those its config turns on): a model built under
    # accelerate.init_empty_weights() has them untied (transformers 5.24: lm_head and
    # embed_tokens are two meta tensors), and a tied checkpoint stores only one of the two
    declared = getattr(model, "all_tied_weights_keys", None)
    for target, source in (declared.items() if isinstance(declared, dict) else ()):
        if target in aliases and source in aliases and aliases[target] is not aliases[source]:
            merged = aliases[source] + [n for n in aliases[target] if n not in aliases[source]]
            for n in merged:
                aliases[n] = merged
    return aliases


@dataclass
class WeightSource:
    """Loads a module's meta tensors from the checkpoint, resolving tied names."""

    checkpoint: Checkpoint
    aliases: dict[str, list[str]]
    available: set = field(default_factory=set)

    def __post_init__(self):
        self.available = self.checkpoint.names()

    def resolve(self, name: str) -> str | None:
        for candidate in self.aliases.get(name, [name]):
            if candidate in self.available:
                return candidate
        return None

    def check(self, model: nn.Module) -> None:
        """Every meta tensor of the model is in the checkpoint with its shape, before any work."""
        missing, wrong = [], []
        for name, t in _tensors(model):
            if not t.is_meta:
                continue
            src = self.resolve(name)
            if src is None:
                missing.append(name)
            elif tuple(self.checkpoint.shape(src)) != tuple(t.shape):
                wrong.append(f"{name}: {tuple(self.checkpoint.shape(src))} in the checkpoint, "
                             f"{tuple(t.shape)} in the model")
        if missing or wrong:
            what = []
            if missing:
                what.append(f"{len(missing)} tensor(s) of the model are not in it (e.g. {', '.join(missing[:3])})")
            if wrong:
                what.append(f"{len(wrong)} have another shape ({'; '.join(wrong[:3])})")
            raise CheckpointError(f"the checkpoint {self.checkpoint.path} does not match the model: "
                                  f"{' and '.join(what)}. Build the model from the checkpoint's own config")

    def materialize(self, module: nn.Module, prefix: str, recurse: bool = True) -> nn.Module:
        """Replace `module`'s meta tensors (in place: `module` is the driver's own copy) by the
        checkpoint's, cast to the model's dtype; tied tensors stay tied."""
        meta = [(n, t) for n, t in _tensors(module, recurse=recurse) if t.is_meta]
        if not meta:
            return module
        full = {n: f"{prefix}.{n}" if prefix else n for n, _ in meta}
        for n, t in meta:
            if self.resolve(full[n]) is None:
                hint = (" It is a non-persistent buffer, never saved in checkpoints: build the model with "
                        "accelerate.init_empty_weights(), which keeps buffers on the CPU"
                        if _is_nonpersistent_buffer(module, n) else "")
                raise CheckpointError(f"the checkpoint {self.checkpoint.path} holds no tensor {full[n]!r}.{hint}")
        loaded = self.checkpoint.load(sorted({self.resolve(full[n]) for n, _ in meta}))
        done: dict[int, torch.Tensor] = {}
        for n, t in meta:
            if id(t) not in done:
                value = loaded[self.resolve(full[n])]
                if tuple(value.shape) != tuple(t.shape):
                    raise CheckpointError(f"tensor {full[n]!r} has shape {tuple(value.shape)} in the checkpoint "
                                          f"{self.checkpoint.path}, {tuple(t.shape)} in the model")
                value = value.to(t.dtype)
                done[id(t)] = nn.Parameter(value, requires_grad=False) if isinstance(t, nn.Parameter) else value
            owner_name, _, attr = n.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if attr in owner._parameters:
                owner._parameters[attr] = done[id(t)]
            else:
                owner._buffers[attr] = done[id(t)]
        return module


def _tensors(module: nn.Module, recurse: bool = True):
    return list(module.named_parameters(remove_duplicate=False, recurse=recurse)) + \
        list(module.named_buffers(remove_duplicate=False, recurse=recurse))


def _is_nonpersistent_buffer(module: nn.Module, name: str) -> bool:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return attr in owner._buffers and attr in owner._non_persistent_buffers_set


def lazy_weights(work: nn.Module, skip: list[str], weights: WeightSource) -> list:
    """Forward pre-hooks that load each module's own tensors the first time it runs (modules
    outside the `skip` subtrees): only what the prologue or head really uses is read."""
    handles = []
    for name, mod in work.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if any(t.is_meta for _, t in _tensors(mod, recurse=False)):
            def load(m, args, name=name):
                weights.materialize(m, name, recurse=False)  # a pre-hook returning a value would replace args

            handles.append(mod.register_forward_pre_hook(load))
    return handles


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)  # nn.ModuleList items too: they are attributes "0", "1", ...


# ------------------------------------------------------------------------------------------------
# block inputs
# ------------------------------------------------------------------------------------------------

class _Caught(Exception):
    def __init__(self, args, kwargs):
        super().__init__("block inputs caught")
        self.args_, self.kwargs_ = args, kwargs


class _Catcher(nn.Module):
    def forward(self, *args, **kwargs):
        raise _Caught(args, kwargs)


def _is_tensor_arg(v) -> bool:
    return isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and v and
                                            all(isinstance(t, torch.Tensor) for t in v))


@dataclass
class BlockInputs:
    """What block 0 received: per batch the hidden states and the other tensor arguments."""

    hidden: list[torch.Tensor]
    tensor_names: list[str]                # keyword names of the other tensor arguments, in order
    tensors: list[tuple]                   # per batch, values in tensor_names order
    constants: dict                        # non-tensor keyword arguments (same for every batch)
    hidden_name: str


def model_call(model: nn.Module, batch, index: int) -> tuple[tuple, dict]:
    """(args, kwargs) for a calibration batch; use_cache=False where the model takes it (the
    sequential driver quantizes the plain, cache-free forward)."""
    args, kwargs = normalize_inputs(batch, what=f"calibration batch {index}")
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def capture_block_inputs(work: nn.Module, block0: str, block0_module: nn.Module, batches: list,
                         weights: WeightSource, skip: list[str]) -> BlockInputs:
    """Run the prologue of every batch (in float, weights loaded as used) up to block 0."""
    set_submodule(work, block0, _Catcher())
    handles = lazy_weights(work, skip, weights)
    sig = inspect.signature(block0_module.forward)
    hidden_name = next(iter(sig.parameters))
    hidden, tensors, names, constants = [], [], None, None
    try:
        for i, batch in enumerate(batches):
            args, kwargs = model_call(work, batch, i)
            try:
                with torch.no_grad():
                    work(*args, **kwargs)
            except _Caught as c:
                bound = sig.bind(*c.args_, **c.kwargs_).arguments
            except CheckpointError:
                raise
            except Exception as e:
                raise InvalidInputsError(f"the model rejects calibration batch {i}: {type(e).__name__}: {e}") from e
            else:
                raise InvalidModelError(f"the model never called its block {block0!r} on calibration batch {i}")
            flat = flat_arguments(sig, bound)
            h = flat.pop(hidden_name)
            t_names = [k for k, v in flat.items() if _is_tensor_arg(v)]
            consts = {k: v for k, v in flat.items() if k not in t_names}
            if names is None:
                names, constants = t_names, consts
            elif t_names != names or not _same_constants(consts, constants):
                raise InvalidInputsError(f"calibration batch {i} gives block 0 other arguments than batch 0 "
                                         f"({t_names} / {sorted(consts)} against {names} / {sorted(constants)}); "
                                         "give batches of one structure")
            for k, v in consts.items():
                if not isinstance(v, (type(None), bool, int, float, str)):
                    raise InvalidInputsError(f"block 0 receives {k}={type(v).__name__}; sequential quantization "
                                             "runs the plain forward without caches or other objects between "
                                             "blocks: pass use_cache=False")
            hidden.append(h)
            tensors.append(tuple(tuple(v) if isinstance(v, list) else v for v in (flat[k] for k in t_names)))
    finally:
        for h in handles:
            h.remove()
    return BlockInputs(hidden, names or [], tensors, constants or {}, hidden_name)


def flat_arguments(sig: inspect.Signature, bound: dict) -> dict:
    """A call's arguments by name (as `sig.bind(...).arguments` gives them), **kwargs spread out."""
    flat = {}
    for k, v in bound.items():
        if sig.parameters[k].kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(v)
        elif sig.parameters[k].kind is not inspect.Parameter.VAR_POSITIONAL:
            flat[k] = v
    return flat


def _same_constants(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] or a[k] == b[k] for k in a)


# ------------------------------------------------------------------------------------------------
# the module a stage captures
# ------------------------------------------------------------------------------------------------

class StageModule(nn.Module):
    """Holds the stage's module at its own path (so parameter names, recipe patterns and reports
    read as in the whole model: `model.layers.3.mlp.down_proj`) and calls it with the hidden
    states, the named tensor arguments and the constants."""

    def __init__(self, path: str, module: nn.Module, tensor_names=(), constants=None):
        super().__init__()
        self._stage_path, self._tensor_names = path, list(tensor_names)
        self._constants = dict(constants or {})
        parent = self
        *heads, last = path.split(".")
        for h in heads:
            if h not in parent._modules:
                parent.add_module(h, nn.Module())
            parent = parent._modules[h]
        parent.add_module(last, module)

    def forward(self, hidden_states, *tensors):
        kwargs = dict(zip(self._tensor_names, tensors))
        out = self.get_submodule(self._stage_path)(hidden_states, **kwargs, **self._constants)
        return out[0] if isinstance(out, (tuple, list)) else out


def output_arity(out) -> int:
    """0 when a block returns a tensor, else the length of the tuple it returns."""
    return len(out) if isinstance(out, (tuple, list)) else 0


def dynamic_shapes_for(example: tuple):
    """Dim.AUTO on every dimension of every tensor input: torch.export keeps batch and sequence
    dynamic and specializes what the weights fix."""
    auto = torch.export.Dim.AUTO

    def spec(v):
        if isinstance(v, torch.Tensor):
            return {d: auto for d in range(v.dim())}
        return tuple(spec(t) for t in v)

    return tuple(spec(v) for v in example)


# ------------------------------------------------------------------------------------------------
# the head
# ------------------------------------------------------------------------------------------------

class _Inject(nn.Module):
    """Stands for the blocks when finding the head: block 0 returns the last block's output."""

    def __init__(self, value, arity: int, first: bool, last: bool, state: dict):
        super().__init__()
        self.value, self.arity, self.first, self.last, self.state = value, arity, first, last, state

    def forward(self, hidden_states, *args, **kwargs):
        h = self.value if self.first else hidden_states
        if self.last:
            self.state["after_blocks"] = True
        return (h,) + (None,) * (self.arity - 1) if self.arity else h


def model_output(out):
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out


def _run_for_head(work, blocks, weights, state, called, args, kwargs, unload_prologue: bool):
    """The model's output with the blocks injected, recording the modules called after them.
    `unload_prologue`: each module that runs before the blocks goes back to the meta device once it
    ran (the injected blocks ignore its output), so the embedding and the lm_head are never both
    in memory; one that runs again after the blocks is read again."""
    outside = lambda n: not any(n == b or n.startswith(b + ".") for b in blocks)  # noqa: E731
    handles = lazy_weights(work, blocks, weights)
    for name, mod in work.named_modules():
        if not outside(name):
            continue
        if name:
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, name=name: called.append(name) if state["after_blocks"] else None))
        from_checkpoint = [n for n, t in _tensors(mod, recurse=False) if t.is_meta]
        if unload_prologue and from_checkpoint:
            handles.append(mod.register_forward_hook(
                lambda m, a, out, names=tuple(from_checkpoint): None if state["after_blocks"] else _to_meta(m, names)))
    try:
        with torch.no_grad():
            return model_output(work(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()


def _to_meta(module: nn.Module, names) -> None:
    """Put the module's own tensors `names` back on the meta device (freeing the loaded ones)."""
    for attr in names:
        table = module._parameters if attr in module._parameters else module._buffers
        t = table[attr]
        meta = torch.empty_like(t, device="meta")
        table[attr] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta


def _digest(t) -> tuple | None:
    """(shape, dtype, sha256 of the bytes) of a tensor, None for anything else: equal digests are
    equal tensors, bit for bit, without keeping the first one."""
    if not isinstance(t, torch.Tensor):
        return None
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return tuple(t.shape), t.dtype, hashlib.sha256(memoryview(data)).hexdigest()


def find_head(work: nn.Module, blocks: list[str], arity: int, final_hidden: torch.Tensor, batch,
              weights: WeightSource) -> list[str]:
    """The modules that run after the last block, outermost first, in call order, checked to
    reproduce the model's output from the last hidden state."""
    state = {"after_blocks": False}
    for i, b in enumerate(blocks):
        set_submodule(work, b, _Inject(final_hidden, arity, i == 0, i == len(blocks) - 1, state))
    called: list[str] = []
    args, kwargs = model_call(work, batch, 0)
    try:
        expected = _run_for_head(work, blocks, weights, state, called, args, kwargs, unload_prologue=True)
    except Exception:  # noqa: BLE001 - the top-level forward reads a prologue weight itself: keep them
        called.clear()
        state["after_blocks"] = False
        expected = _run_for_head(work, blocks, weights, state, called, args, kwargs, unload_prologue=False)
    head = [n for n in called if not any(n.startswith(o + ".") for o in called if o != n)]
    head = list(dict.fromkeys(head))
    # the logits of a batch are a vocabulary per token (131 MB for 4 x 256 tokens of a 32000-word
    # LLaMA): compared bit for bit through a digest, so they are not held twice
    expected = _digest(expected)
    y = final_hidden
    with torch.no_grad():
        for name in head:
            y = work.get_submodule(name)(y)
    if expected is None or _digest(y) != expected:
        raise InvalidModelError(f"the modules after the last block ({', '.join(head) or 'none'}) applied in turn "
                                "do not give the model's output; pass head=[module names] (applied in turn to the "
                                "last block's output), or head=[] to keep the head in float")
    return head
