"""quantize_sequential: PTQ of a model larger than memory, one block at a time.

The model is a structure on the `meta` device; its weights stay in the checkpoint. For each stage
(every block, then the head modules): the stage's weights are read, the stage is captured,
calibrated (PTQ algorithms included) and converted by the same `prepare` / `calibrate` /
`convert` passes as a whole model, on the activations the previous *quantized* stages produced
(errors propagate as in deployment, as GPTQ intends), written out, and freed. With
`propagate_error=False` each stage is calibrated instead on what the previous stages compute
calibrated but not yet converted (their algorithms applied, activations in float): what a whole
model's observers see in `qc.calibrate`, so the codes equal the whole model's for every recipe,
activation-quantizing ones (w8a8 + SmoothQuant) included. Where GPTQ fits the
float model's outputs (`float_targets`), the float model's activations are carried beside them,
each stage run once more with its float weights, so the codes equal the whole model's. Observers,
Hessians and AWQ statistics live only while their stage is processed. The passes know nothing
about disks: this driver only decides what goes in and out of them.

Under torch.distributed (torchrun), every rank passes its shard of the calibration batches; the
statistics of each stage are reduced across ranks (see qcompile.distributed), every rank computes
the same quantized stage, and rank 0 writes it.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import time
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..api import _check_patterns, calibrate, convert, prepare_captured, resolve_recipe
from ..errors import CalibrationError, CalibrationWarning, CheckpointError, InvalidModelError, RecipeError
from ..graph import STATE
from ..graph.recorder import observers_disabled
from ..memory import return_freed_heap
from ..passes.algorithm import make_algorithm
from . import onnx_output
from .checkpoint import open_checkpoint
from .result import QuantizedCheckpoint, stage_info
from .stages import (StageModule, WeightSource, capture_block_inputs, check_uniform_layers, dynamic_shapes_for,
                     find_blocks, find_head, meta_copy, output_arity, tensor_aliases)
from .store import CarryFiles, OutputDir


def quantize_sequential(model, batches, output_dir, recipe="w4a16", *, checkpoint=None, algorithms=None,
                        blocks=None, head=None, dynamic: bool = True, onnx: bool = False,
                        propagate_error: bool = True, progress: bool = True) -> QuantizedCheckpoint:
    """Quantize `model` block by block with its weights read from `checkpoint`; returns the
    quantized checkpoint written to `output_dir` (rerun with the same arguments to resume).

    model: an nn.Module whose parameters are on the meta device (e.g. built under
        `accelerate.init_empty_weights()`), or a model with its weights in memory (checkpoint=None),
        or the path of a transformers model folder / a .gguf file (the model is built from its config).
    batches: calibration inputs of the whole model (token ids, tuples or dicts), this rank's shard
        under torch.distributed.
    checkpoint: a .safetensors file, a folder of (sharded) safetensors, a .gguf file, or None.
    recipe / algorithms: as for `qc.prepare`; module patterns name modules of the whole model.
    blocks: the ModuleList path of the blocks ("model.layers") or a list of module names; found
        automatically when None.
    head: module names run after the last block (each its own stage); found when None; [] keeps
        them in float.
    dynamic: capture stages with dynamic batch and sequence sizes (so the result runs on any).
    onnx: also write QDQ ONNX with external data, each stage as it is finished, then the float
        parts and `onnx/model.onnx` chaining them (token ids in, logits out; see onnx_output.py).
    """
    model, checkpoint = _resolve_model(model, checkpoint)
    recipe = resolve_recipe(recipe, algorithms)
    if recipe.kv_cache is not None:
        raise RecipeError("quantize_sequential captures each block's plain forward, without a KV cache, so it has no "
                          "cache to quantize; use a recipe with kv_cache=None (or quantize the whole model with "
                          "qc.prepare(..., kv_cache=...) where it fits in memory)")
    _check_patterns(model, recipe)
    batches = list(batches)
    if not batches:
        raise CalibrationError("calibration got no batches; pass a non-empty iterable of representative inputs")
    distributed.check_same_count(len(batches))
    block_names = find_blocks(model, blocks)
    check_uniform_layers(model)
    weights = WeightSource(open_checkpoint(checkpoint, model), tensor_aliases(model))
    weights.check(model)
    fingerprint = {
        "model": _model_description(model), "checkpoint": weights.checkpoint.identity(),
        "recipe": recipe.to_dict(), "blocks": block_names, "head": head, "dynamic": dynamic,
        "data": _data_hashes(batches), "world_size": distributed.world_size(), "onnx": bool(onnx),
        **({} if propagate_error else {"propagate_error": False}),   # folders of older runs stay resumable
    }
    # every rank reads the folder before rank 0 writes to it, so all ranks resume from the same stage
    # (a rank that skipped a stage would skip its collectives too)
    out = OutputDir(output_dir, fingerprint, writer=distributed.rank() == 0)
    distributed.barrier()
    if out.complete:
        return QuantizedCheckpoint(output_dir, model)
    out.cleanup_partial()
    out.write_manifest()
    _map_large_allocations()
    work = meta_copy(model)
    inputs = capture_block_inputs(meta_copy(model), block_names[0], work.get_submodule(block_names[0]), batches,
                                  weights, skip=block_names)
    out.manifest["inputs"] = {"hidden": inputs.hidden_name, "tensors": inputs.tensor_names,
                              "constants": inputs.constants}
    carry = inputs.hidden
    float_carry = list(carry) if _reads_float_inputs(recipe, propagate_error) else None
    arity = None
    bar = tqdm(total=len(block_names), desc="quantizing blocks", unit="block", disable=not progress)
    carries = CarryFiles(out, enabled=not propagate_error)
    saved = None   # the last stage written: its calibrated outputs are on disk until the next one is
    once = WarnOnce(CalibrationWarning)   # every block saw the same rows: one GPTQ warning, not one per block
    for name in block_names:
        examples = None if carry is None else [(h, *t) for h, t in zip(carry, inputs.tensors)]
        float_examples = None if float_carry is None else [(h, *t) for h, t in zip(float_carry, inputs.tensors)]
        with once:
            carry, info = _advance(out, carries, name, work, weights, examples, recipe, dynamic,
                                   inputs.tensor_names, inputs.constants, onnx, float_examples)
        carries.drop(saved)
        saved, arity = name, info["arity"]
        if float_carry is not None:
            float_carry = _run_float(work, weights, name, float_examples, inputs.tensor_names, inputs.constants)
        bar.update(1)
    bar.close()
    examples = float_examples = None
    _release_freed_memory()
    if head is None:   # any last hidden state finds it (block outputs are shaped like block inputs)
        head = find_head(meta_copy(model), block_names, arity, (carry or inputs.hidden)[0], batches[0], weights)
    head_stages = [h for h in head if _quantizes_something(model, h, recipe)]
    # the head runs up to its last quantized stage (all of it when ONNX needs every module's part)
    last = len(head) - 1 if onnx else max((i for i, h in enumerate(head) if h in head_stages), default=-1)
    write_onnx = onnx and out.writer
    parts = [(onnx_output.PROLOGUE + ".onnx", onnx_output.PROLOGUE)] + \
        [(out.manifest["stages"][b]["onnx"], "block") for b in block_names] if write_onnx else []
    for name in head[:last + 1]:
        examples = None if carry is None else [(h,) for h in carry]
        float_examples = None if float_carry is None else [(h,) for h in float_carry]
        needed = name != head[last]   # the last stage's outputs (the logits) feed nothing
        if name in head_stages:
            with once:
                carry, info = _advance(out, carries, name, work, weights, examples, recipe, dynamic, [], {}, onnx,
                                       float_examples, needed)
            carries.drop(saved)
            saved = name
            if write_onnx:
                parts.append((info["onnx"], "head"))
        else:  # nothing to quantize (a final norm under w4a16): it runs in float, its tensors are stored as they are
            runner = weights.materialize(_meta_module(work, name), name)
            if write_onnx:
                example = examples[0] if examples else (inputs.hidden[0],)   # only its shape matters
                parts.append((onnx_output.write_float(out.path, name, runner, example), "head"))
            # None when a later stage finished before: nothing unfinished reads it
            carry = _run(runner, examples) if needed and examples is not None else None
            del runner
        if needed and float_carry is not None:
            float_carry = _run_float(work, weights, name, float_examples, [], {})
    out.manifest["blocks"], out.manifest["head"] = block_names, head_stages
    if "float" not in out.manifest:
        _save_floats(out, model, weights, block_names + head_stages)
    if write_onnx:
        onnx_output.write_prologue(out.path, model, block_names, head, weights, inputs, batches[0])
        onnx_output.assemble(out.path, parts, n_shared=_n_shared(inputs))
        out.manifest["onnx"] = {"model": f"{onnx_output.FOLDER}/{onnx_output.MODEL}", "opset": onnx_output.OPSET,
                                "parts": [f for f, _ in parts]}
    out.manifest["complete"] = True
    out.write_manifest()
    carries.clear()
    distributed.barrier()  # the files exist for every rank when it returns
    return QuantizedCheckpoint(output_dir, model)


class WarnOnce:
    """Inside `with`, a warning of `category` whose text was shown before in this run is dropped
    (Python's own once-per-location rule does not hold across stages: torch.export and the ONNX
    exporter reset the warning filters, which clears what was already shown)."""

    def __init__(self, category: type[Warning]):
        self.category, self.seen, self.saved = category, set(), None

    def __enter__(self):
        self.saved = show = warnings.showwarning

        def show_new(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, self.category):
                if str(message) in self.seen:
                    return
                self.seen.add(str(message))
            show(message, category, filename, lineno, file, line)

        warnings.showwarning = show_new
        return self

    def __exit__(self, *exc):
        warnings.showwarning = self.saved
        return False


def _advance(out: OutputDir, carries: "CarryFiles", name: str, work: nn.Module, weights: WeightSource,
             examples: list | None, recipe, dynamic: bool, tensor_names, constants, onnx: bool = False,
             float_examples: list | None = None, outputs_needed: bool = True) -> tuple[list | None, dict]:
    """Process stage `name` (or reuse it when a previous run finished it); returns what the next
    stage is calibrated on and the stage's info."""
    if examples is None and not out.finished(name):
        raise CheckpointError(f"{carries.path(name).parent} lacks the calibrated outputs of the stage before "
                              f"{name!r} (propagate_error=False keeps them to resume); delete {out.path} to start over")
    runner, info, calibrated = _stage(out, name, work, weights, examples, recipe, dynamic, tensor_names, constants,
                                      onnx, float_examples, carries if outputs_needed else None)
    if not outputs_needed:
        return None, info
    if not carries.enabled:
        return _run(runner, examples), info
    return (calibrated if calibrated is not None else carries.load(name)), info


def _stage(out: OutputDir, name: str, work: nn.Module, weights: WeightSource, examples: list, recipe,
           dynamic: bool, tensor_names, constants, onnx: bool = False, float_examples: list | None = None,
           carries: "CarryFiles | None" = None):
    """The quantized stage `name` as an ExportedProgram's module: computed and saved, or loaded
    when a previous run finished it, and the calibrated stage's outputs when `carries` keeps them
    (None for a loaded stage: the run that finished it saved them).
    `float_examples`: the float model's inputs to the stage, for GPTQ's float_targets and
    SmoothQuant's statistics."""
    if out.finished(name):
        return out.load_stage(name).module(), out.manifest["stages"][name], None
    start, cpu = time.perf_counter(), time.process_time()
    module = weights.materialize(_meta_module(work, name), name)
    stage = StageModule(name, module, tensor_names, constants)
    with torch.no_grad():
        arity = output_arity(stage.get_submodule(name)(examples[0][0], **dict(zip(tensor_names, examples[0][1:])),
                                                       **constants))
    shapes = dynamic_shapes_for(examples[0]) if dynamic else None
    # StageModule.forward(hidden_states, *tensors): torch.export names the varargs "tensors"; the
    # converted graph has flat inputs again, so its re-export takes the shapes as a flat tuple
    stage_shapes = None
    if dynamic:
        stage_shapes = {"hidden_states": shapes[0], **({"tensors": tuple(shapes[1:])} if len(shapes) > 1 else {})}
    prepared = prepare_captured(stage, examples[0], recipe, dynamic_shapes=stage_shapes, copy_model=False)
    del stage, module
    _release_freed_memory()   # each phase starts from what is live, not from the last phase's garbage
    prepared.meta[STATE].float_inputs = float_examples
    calibrate(prepared, examples, progress=False)
    prepared.meta[STATE].float_inputs = None   # convert copies the state: not the activations with it
    calibrated = None
    if carries is not None and carries.enabled:
        with observers_disabled(prepared):   # the values the whole model's observers would see next
            calibrated = _run(prepared, examples)
        carries.save(name, calibrated)   # before the manifest lists the stage: a resumed run reads it
    _release_freed_memory()
    quantized = convert(prepared)
    reports = prepared.meta[STATE].algorithm_reports
    del prepared
    _release_freed_memory()
    exported = torch.export.export(quantized, examples[0], dynamic_shapes=shapes, strict=False)
    info = stage_info(quantized, tensor_names, constants, arity)
    info["algorithms"] = {k: len(v) for k, v in reports.items()}
    if onnx and out.writer:  # before save_stage: a stage the manifest lists has its ONNX part too
        info["onnx"] = onnx_output.write_stage(out.path, name, quantized, examples[0], exported)
    del quantized
    info["seconds"] = round(time.perf_counter() - start, 3)
    info["cpu_seconds"] = round(time.process_time() - cpu, 3)  # all threads; on a shared machine wall time is not ours
    out.save_stage(name, exported, info)
    _release_freed_memory()
    return exported.module(), info, calibrated


def _reads_float_inputs(recipe, propagate_error: bool) -> bool:
    """Whether an algorithm of the recipe reads the float model's inputs to each stage: GPTQ's
    float_targets; SmoothQuant's statistics when the stages mirror the whole model's calibration
    (it computes them on the float model before any rewrite)."""
    for name, opts in recipe.algorithms:
        if make_algorithm(name, dict(opts)).options.get("float_targets"):
            return True
        if name == "smoothquant" and not propagate_error:
            return True
    return False


def _run_float(work: nn.Module, weights: WeightSource, name: str, float_examples: list, tensor_names,
               constants) -> list[torch.Tensor]:
    """The float stage's outputs on the float model's inputs (its weights read again, then freed)."""
    stage = StageModule(name, weights.materialize(_meta_module(work, name), name), tensor_names, constants)
    outputs = _run(stage, float_examples)
    del stage
    _release_freed_memory()
    return outputs


def _n_shared(inputs) -> int:
    """How many tensors a block takes besides the hidden states (tuples flattened)."""
    return sum(len(v) if isinstance(v, tuple) else 1 for v in inputs.tensors[0])


MMAP_THRESHOLD = 4 << 20


def _map_large_allocations() -> None:
    """Serve allocations of 4 MB and more from their own mappings, for the rest of the process.
    glibc takes allocations below its mmap threshold from the heap and raises that threshold (up
    to 32 MB) each time a mapped block is freed; a run's 4-32 MB temporaries (row chunks, a
    batch's activations) then fragment the heap, and the blocks' peaks rose by ~90 MB a block
    (4-layer TinyLlama-shape GPTQ: 1325, 1442, 1508 MB; with the threshold fixed: 1210, 1291,
    1303 MB). A mapped block goes back to the OS when it is freed; the fresh pages cost time (the
    4 blocks took 5-9% longer, measured side by side on busy cores)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)   # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _release_freed_memory() -> None:
    """Free the stage's temporaries and hand the heap back to the OS (glibc keeps it otherwise, and
    the next stage's peak would start from there). fx graphs are reference cycles (node <-> graph
    <-> module): `del` alone leaves a converted stage and its weights to the cyclic collector,
    which ran rarely enough that a 1B model's run grew by a block's weights per block."""
    import gc

    gc.collect()
    return_freed_heap()


def _meta_module(work: nn.Module, name: str) -> nn.Module:
    """A fresh meta copy of one stage's module (the driver's own, so it may be filled in place)."""
    import copy

    return copy.deepcopy(work.get_submodule(name))


def _run(runner, examples: list) -> list[torch.Tensor]:
    with torch.no_grad():
        return [runner(*ex) for ex in examples]


_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _quantizes_something(model: nn.Module, name: str, recipe) -> bool:
    """False when no module of the subtree gets quantized: all excluded, or a recipe that
    quantizes only weighted ops (w4a16, w8a16) over a subtree without linears or convs (a final
    norm). Such a stage stays in float: its tensors go to the float file."""
    for n, mod in model.get_submodule(name).named_modules():
        r = recipe.recipe_for(f"{name}.{n}" if n else name)
        if r is None:
            continue
        if not set(r.ops) <= {"linear", "conv"} or isinstance(mod, _WEIGHTED):
            return True
    return False


def _save_floats(out: OutputDir, model: nn.Module, weights: WeightSource, stages: list[str]) -> None:
    """The model's tensors outside every quantized stage (embeddings, a float head), once per tie."""
    aliases = tensor_aliases(model)
    under = lambda n: any(n == s or n.startswith(s + ".") for s in stages)  # noqa: E731
    keep, stored = {}, {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if under(name) or _nonpersistent(model, name):
            continue
        key = next((a for a in aliases.get(name, [name]) if a in keep), None)
        if key is not None:
            stored[name] = key
            continue
        source = weights.resolve(name)
        keep[name] = (weights.checkpoint.load([source])[source] if t.is_meta else t.detach().clone()).to(t.dtype)
        stored[name] = name
    out.save_floats(keep, stored)


def _nonpersistent(model: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    return attr in mod._non_persistent_buffers_set


def _model_description(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    shapes = {n: list(t.shape) for n, t in model.state_dict().items()}
    digest = hashlib.sha256(repr(sorted(shapes.items())).encode()).hexdigest()[:16]
    desc = {"class": type(model).__name__, "tensors": len(shapes), "shapes_sha256": digest}
    if config is not None and hasattr(config, "to_json_string"):
        desc["config_sha256"] = hashlib.sha256(config.to_json_string().encode()).hexdigest()[:16]
    return desc


def _data_hashes(batches: list) -> list[str]:
    """A digest of this rank's calibration data, per rank (a resumed run must see the same data)."""
    h = hashlib.sha256()
    for batch in batches:
        for t in torch.utils._pytree.tree_leaves(batch):
            if isinstance(t, torch.Tensor):
                h.update(str((t.dtype, tuple(t.shape))).encode())
                h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(t).encode())
    mine = h.hexdigest()[:16]
    if not distributed.active():
        return [mine]
    gathered = [None] * distributed.world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def _resolve_model(model, checkpoint):
    """A path becomes a meta-device transformers model built from its config, and the checkpoint."""
    if isinstance(model, nn.Module):
        return model, checkpoint
    if not isinstance(model, (str, os.PathLike)):
        raise InvalidModelError(f"model is an nn.Module (on the meta device, or in memory) or the path of a "
                                f"transformers model folder or .gguf file; got {type(model).__name__}")
    try:
        import accelerate
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        raise InvalidModelError(f"building a model from {model} needs transformers and accelerate ({e})") from e
    path = pathlib.Path(model)
    if not path.exists():
        raise InvalidModelError(f"{path} does not exist")
    if path.suffix == ".gguf":
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    else:
        config = AutoConfig.from_pretrained(path)
    with accelerate.init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    return meta.eval(), checkpoint if checkpoint is not None else str(path)
