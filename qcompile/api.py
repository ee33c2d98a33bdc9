"""The user's journey: prepare -> calibrate -> convert, each a short recipe of passes."""
from __future__ import annotations

import copy
import fnmatch
from typing import Any, Iterable

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from . import distributed
from .capture import DYNAMIC_BATCH, capture, flatten_for_graph, normalize_inputs
from .errors import QCompileError, CalibrationError, ConvertError, InvalidInputsError, InvalidModelError, RecipeError
from .graph import STATE
from .fake_quant import FakeQuantize, calibrating
from .passes.convert_qdq import weights_to_quantize
from .passes import Annotate, ConvertToQDQ, FoldBatchNorm, InsertObservers, PassManager, ShareQParams
from .passes.finalize_qat import FinalizeQAT
from .passes.fold_constant_weights import FoldConstantWeights
from .passes.functionalize_inplace import FunctionalizeInplace
from .passes.gemm_to_linear import GemmToLinear
from .passes.untie_weights import UntieWeights
from .passes.fold_bn_qat import BatchNormFoldState, FoldBatchNormForQAT, is_folded_batch_norm
from .passes.insert_fake_quant import InsertFakeQuant
from .passes.remove_redundant_casts import RemoveRedundantCasts
from .passes.algorithm import make_algorithm
from .attention_choice import apply_attention_choice, attention_choice, attention_matmuls
from .passes.annotate_attention import AnnotateAttention
from .passes.decompose_sdpa import DecomposeSDPA
from .passes.precision import PRECISION_RECIPES, AssignPrecision, PrecisionRecipe, freeze_fp8, get_precision_recipe, \
    prepare_precision, set_fp8_calibrating
from .passes.kv_cache import ObserveKVCache, QuantizeKVCache
from .spec import Recipe, get_kv_cache_spec, get_recipe, normalize_algorithms
from .state import QState
from .targets import attention_left_float, check_target_name, recipe_for_target


_UNSET = object()


def prepare(model: nn.Module, example_inputs: Any, recipe: "str | Recipe" = "w8a8", *,
            algorithms=None, target: str | None = None, dynamic_shapes=DYNAMIC_BATCH, dump_dir=None,
            kv_cache=_UNSET, max_seq_len: int | None = None) -> fx.GraphModule:
    """Capture `model` with torch.export and insert observers; the model itself is not touched.

    A transformers causal LM (LlamaForCausalLM, Qwen2ForCausalLM, ...) is captured as one step
    graph with its KV cache as explicit inputs and outputs (qcompile.llm: prefill and decode run
    the same quantized weights; `qc.generate` drives it), with dynamic batch and sequence lengths
    up to `max_seq_len` (default: the model's positions, at most 4096). `kv_cache` quantizes that
    cache: "int8" (static scales per KV head from the calibration text), "int8-dynamic" (a scale
    per token and head), "fp8" (E4M3, per KV head), or None / "fp32" (float); default: the
    recipe's `kv_cache`.

    `algorithms` (names, or {"name": ..., **options}) are appended to the recipe's own PTQ
    algorithms; they run in `calibrate`, before the observers see the batches. `target`
    ("ort-cpu", "tensorrt") adapts the recipe to the runtime that will run the model
    (`qcompile.targets.recipe_for_target`: the adapted recipe is `state.recipe`) and becomes
    `export_onnx`'s default target. A precision recipe
    ("bf16", "fp16", "fp8") gives a graph with casts or FP8 fake-quant instead of observers."""
    if target is not None:
        check_target_name(target)
    if _is_precision(recipe):   # a float model: a target has nothing to choose there
        if algorithms:
            raise RecipeError(f"PTQ algorithms do not apply to the precision recipe {_name(recipe)!r}; drop them")
        kv_spec = get_kv_cache_spec(None if kv_cache is _UNSET else kv_cache)
        return _prepare_precision(model, example_inputs, recipe, qat=False, dynamic_shapes=dynamic_shapes,
                                  dump_dir=dump_dir, kv_spec=kv_spec, max_seq_len=max_seq_len)
    recipe = resolve_recipe(recipe, algorithms, target, kv_cache)
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"qcompile quantizes torch.nn.Module objects, got {type(model).__name__}")
    _check_patterns(model, recipe)
    return prepare_captured(model, example_inputs, recipe, target=target, dynamic_shapes=dynamic_shapes,
                            dump_dir=dump_dir, max_seq_len=max_seq_len)


def resolve_recipe(recipe: "str | Recipe", algorithms=None, target: str | None = None, kv_cache=_UNSET) -> Recipe:
    """The Recipe `prepare` uses: the named one, `kv_cache` set, `algorithms` appended, adapted to
    `target`; unknown algorithm names and bad options fail here, before anything is captured."""
    recipe = get_recipe(recipe)
    if kv_cache is not _UNSET:
        recipe = recipe.replace(kv_cache=kv_cache)
    if algorithms:
        recipe = recipe.replace(algorithms=recipe.algorithms + normalize_algorithms(algorithms))
    if target is not None:
        recipe = recipe_for_target(recipe, target)
    for name, options in recipe.algorithms:
        make_algorithm(name, dict(options))  # unknown names and bad options fail here, not after capture
    return recipe


def prepare_captured(model: nn.Module, example_inputs: Any, recipe: Recipe, *, target: str | None = None,
                     dynamic_shapes=DYNAMIC_BATCH, dump_dir=None, max_seq_len: int | None = None,
                     copy_model: bool = True) -> fx.GraphModule:
    """Capture and insert observers for a resolved recipe (what `prepare` does after its checks).
    `copy_model=False` lets a driver that owns `model` (the sequential driver's block) skip the copy."""
    gm, cache = _capture(model, example_inputs, dynamic_shapes, recipe.kv_cache, max_seq_len, copy_model)
    gm.meta[STATE] = state = QState(recipe=recipe, target=target, model_config=_model_config(model), cache=cache)
    why_float = attention_left_float(target) if _static_recipe(recipe) else None
    if why_float:
        state.attention["left_float"] = why_float   # the target's choice, for qc.inspect
    attention = [DecomposeSDPA(), AnnotateAttention(recipe)] if _quantizes_attention(recipe) else []
    passes = [FunctionalizeInplace(), FoldConstantWeights(), GemmToLinear(), UntieWeights(recipe), FoldBatchNorm(), *attention,
              Annotate(recipe), ShareQParams(), InsertObservers()]
    if cache is not None:
        passes.append(ObserveKVCache())
    pm = PassManager(passes, dump_dir=dump_dir, stage="prepare")
    pm(gm)
    state.records.extend(pm.records)
    state.stage = "prepared"
    return gm


def prepare_qat(model: nn.Module, example_inputs: Any, recipe: "str | Recipe" = "w8a8", *,
                learn_scales: bool = False, precision: "str | PrecisionRecipe | None" = None,
                dynamic_shapes=DYNAMIC_BATCH, dump_dir=None) -> fx.GraphModule:
    """A trainable copy of `model` with fake quantization (STE; LSQ scales with `learn_scales`).

    Train it with any loop and optimizer; conv+BatchNorm pairs train with the fold simulated
    (fold_bn_qat.py). `qc.calibrate` before training starts the ranges from data; `freeze_observers`
    and `freeze_bn` fix ranges and BatchNorm statistics; `qc.convert` gives the reference QDQ graph.
    `recipe="fp8-qat"` trains with FP8 E4M3 weights and activations and E5M2 gradients instead.
    `precision="bf16"` / `"fp16"` computes the quantized ops in that dtype (fake-quant stays FP32,
    its output is cast; parameters stay FP32 masters), so training sees the deployed arithmetic."""
    if precision is not None:
        precision = get_precision_recipe(precision)
        if precision.fp8 is not None:
            raise RecipeError(f"precision={precision.name!r} with integer fake-quant is not supported; "
                              "use precision='bf16' or 'fp16', or recipe='fp8-qat' alone")
    if _is_precision(recipe):
        if precision is not None:
            raise RecipeError(f"recipe {_name(recipe)!r} is already a precision recipe; drop precision=")
        return _prepare_precision(model, example_inputs, recipe, qat=True,
                                  dynamic_shapes=dynamic_shapes, dump_dir=dump_dir)
    recipe = get_recipe(recipe)
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"qcompile quantizes torch.nn.Module objects, got {type(model).__name__}")
    if recipe.algorithms:
        raise RecipeError("PTQ algorithms (recipe.algorithms) do not apply to QAT; drop them for prepare_qat")
    _check_patterns(model, recipe)
    gm = capture(model, example_inputs, dynamic_shapes=dynamic_shapes)
    # torch.export's module refuses train(); QAT needs nn.Module's own train/eval back.
    for attr in ("train", "eval"):
        gm.__dict__.pop(attr, None)
    gm.meta[STATE] = state = QState(recipe=recipe, qat=True)
    # no FoldConstantWeights: a weight-normalized weight trains through its parameters
    pm = PassManager([FunctionalizeInplace(), GemmToLinear(), FoldBatchNormForQAT(),
                      Annotate(recipe), ShareQParams(),
                      InsertFakeQuant(learn_scales)],
                     dump_dir=dump_dir, stage="prepare_qat")
    pm(gm)
    state.records.extend(pm.records)
    if precision is not None:
        if any(is_folded_batch_norm(n) for n in gm.graph.nodes):
            # the fold simulation rescales the conv output in FP32; in BF16 convert could not match it
            raise RecipeError(f"precision={precision.name!r} does not support conv+BatchNorm pairs in QAT yet; "
                              "drop precision=, or train a model without BatchNorm after its convs")
        pm = PassManager([AssignPrecision(precision, keep_fp32_params=True), RemoveRedundantCasts()],
                         dump_dir=dump_dir, stage="prepare_qat_precision")
        pm(gm)
        state.records.extend(pm.records)
    state.stage = "prepared"
    for p in gm.parameters():
        p.requires_grad_(True)
    return gm.train()


def _capture(model, example_inputs, dynamic_shapes, kv_spec, max_seq_len, copy_model: bool = True):
    """(graph, KV-cache layout): causal LMs as a step graph with their cache (llm/capture.py),
    every other model as torch.export captures it (layout None)."""
    from .llm.capture import capture_causal_lm, is_causal_lm

    if not is_causal_lm(model):
        if kv_spec is not None or max_seq_len is not None:
            raise RecipeError(f"kv_cache and max_seq_len apply to transformers causal LMs; {type(model).__name__} "
                              "is not one. Drop them")
        return capture(model, example_inputs, dynamic_shapes=dynamic_shapes, copy_model=copy_model), None
    if dynamic_shapes not in (None, DYNAMIC_BATCH):
        raise InvalidInputsError("a causal LM is captured with dynamic batch, sequence and past lengths already; "
                                 "drop dynamic_shapes (max_seq_len= sets the longest sequence)")
    gm, layout = capture_causal_lm(model, example_inputs, max_seq_len=max_seq_len)
    return gm, layout.replace(spec=kv_spec)


def _static_recipe(recipe: Recipe) -> bool:
    return recipe.activation is not None and not recipe.activation.dynamic


def _quantizes_attention(recipe: Recipe) -> bool:
    return recipe.attention is not None or any(get_recipe(o).attention is not None for _, o in recipe.overrides)


def _model_config(model: nn.Module):
    """A copy of a transformers model's `config`: the model's own, or, for a wrapper module (a forward
    that calls `hf_model(input_ids=...).logits`), the first submodule's that has one. None otherwise."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            return copy.deepcopy(config)
    return None


def _is_precision(recipe) -> bool:
    return isinstance(recipe, PrecisionRecipe) or (isinstance(recipe, str) and recipe in PRECISION_RECIPES)


def _name(recipe) -> str:
    return recipe if isinstance(recipe, str) else recipe.name


def _prepare_precision(model, example_inputs, recipe, *, qat: bool, dynamic_shapes, dump_dir,
                       kv_spec=None, max_seq_len=None) -> fx.GraphModule:
    """bf16 / fp16 / fp8 / fp8-qat: a captured copy with casts (or FP8 fake-quant) per precision.py."""
    recipe = get_precision_recipe(recipe)
    if recipe.qat != qat:
        use = "prepare_qat" if recipe.qat else "prepare"
        raise RecipeError(f"the precision recipe {recipe.name!r} goes through qc.{use}")
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"qcompile quantizes torch.nn.Module objects, got {type(model).__name__}")
    if qat:
        gm, cache = capture(model, example_inputs, dynamic_shapes=dynamic_shapes), None
        for attr in ("train", "eval"):
            gm.__dict__.pop(attr, None)
    else:
        gm, cache = _capture(model, example_inputs, dynamic_shapes, kv_spec, max_seq_len)
    gm.meta[STATE] = state = QState(recipe=recipe, qat=qat, precision=True, model_config=_model_config(model),
                                    cache=cache)
    state.records.extend(prepare_precision(gm, recipe, dump_dir=dump_dir))
    if cache is not None:
        pm = PassManager([ObserveKVCache()], dump_dir=dump_dir, stage="prepare_kv_cache")
        pm(gm)
        state.records.extend(pm.records)
    state.stage = "prepared"
    if qat:
        for p in gm.parameters():
            p.requires_grad_(True)
        return gm.train()
    set_fp8_calibrating(gm, False)  # calibrate turns the FP8 amax histories on
    return gm


def freeze_observers(qat: fx.GraphModule, freeze: bool = True) -> fx.GraphModule:
    """Stop (or restart) the range updates of every activation fake-quant; learned scales still train."""
    _state(qat, "freeze_observers")
    for m in qat.modules():
        if isinstance(m, FakeQuantize):
            m.observer_enabled.fill_(not freeze)
    return qat


def freeze_bn(qat: fx.GraphModule, freeze: bool = True) -> fx.GraphModule:
    """Stop updating BatchNorm statistics and normalize with the running ones: from here on the
    training forward is the folded conv that convert will produce."""
    _state(qat, "freeze_bn")
    for m in qat.modules():
        if isinstance(m, BatchNormFoldState):
            m.frozen.fill_(freeze)
    return qat


def _check_patterns(model: nn.Module, recipe: Recipe) -> None:
    names = [n for n, _ in model.named_modules() if n]
    # the overrides the built-in recipes ship with are defaults for the models they name (w4a16's and
    # the GGUF recipes' *lm_head, *embed_tokens): they may match nothing, also in a recipe derived and
    # renamed with replace(); the user's own patterns must match something
    from .spec import recipes

    shipped = {o for r in recipes.values() for o in r.overrides}
    patterns = list(recipe.exclude) + [p for p, other in recipe.overrides if (p, other) not in shipped]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise RecipeError(f"the module pattern {pattern!r} matches no module of the model "
                              f"(fnmatch on names from model.named_modules(), e.g. {sample})")
    for _, other in recipe.overrides:
        get_recipe(other)


def _state(gm: Any, what: str) -> QState:
    state = getattr(gm, "meta", {}).get(STATE) if isinstance(gm, fx.GraphModule) else None
    if state is None:
        raise InvalidModelError(f"{what} takes the module that qc.prepare returned, got {type(gm).__name__}")
    return state


def calibrate(prepared: fx.GraphModule, batches: Iterable, *, progress: bool = True) -> fx.GraphModule:
    """Run batches through the observers. A batch is a tensor, a tuple of arguments or a dict.

    Under torch.distributed (e.g. launched with torchrun), each rank passes its own shard of the
    batches, the same number on every rank: observers and PTQ algorithms reduce their statistics
    across ranks, so every rank gets the qparams one process would get from the global batches
    (step t of all ranks, concatenated in rank order)."""
    state = _state(prepared, "calibrate")
    if state.stage == "quantized":
        raise CalibrationError("this module is already quantized; calibrate the prepared module before convert")
    try:
        batches = iter(batches)
    except TypeError:
        raise CalibrationError(f"batches must be an iterable of inputs (tensors, tuples or dicts), "
                               f"got {type(batches).__name__}") from None
    if state.cache is not None:  # a causal LM: token ids in, the step graph's empty past added
        batches = (state.cache.prefill_inputs(b) for b in batches)
    if state.precision:
        return _calibrate_precision(prepared, batches, progress)
    if distributed.active():  # data-parallel calibration: the ranks step through their shards together
        batches = list(batches)
        distributed.check_same_count(len(batches))
        batches = iter(batches)
    choose_attention = _chooses_attention(prepared)
    if choose_attention:
        kept = list(batches)   # the attention choice reads them again after the observers
        batches = iter(kept)
    if state.recipe.algorithms and not state.algorithms_done:
        batches = list(batches)  # the algorithms and then the observers read the same batches
        for i, batch in enumerate(batches):
            args, kwargs = normalize_inputs(batch, what=f"calibration batch {i}")
            _check_batch(prepared, args, kwargs, i)
        if not batches:
            raise CalibrationError("calibration got no batches; pass a non-empty iterable of representative inputs")
        passes = [make_algorithm(name, dict(opts)).with_batches(batches) for name, opts in state.recipe.algorithms]
        pm = PassManager(passes, stage="calibrate")
        pm(prepared)
        state.records.extend(pm.records)
        state.algorithms_done = True
        batches = iter(batches)
    count = 0
    with torch.no_grad(), calibrating(prepared):
        for i, batch in enumerate(tqdm(batches, desc="calibrating", unit="batch", disable=not progress)):
            args, kwargs = normalize_inputs(batch, what=f"calibration batch {i}")
            _check_batch(prepared, args, kwargs, i)
            try:
                prepared(*args, **kwargs)
            except Exception as e:
                raise InvalidInputsError(f"calibration batch {i} does not fit the captured graph: "
                                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                                         f"Give batches shaped like the example inputs.") from e
            count += 1
    if count == 0:
        raise CalibrationError("calibration got no batches; pass a non-empty iterable of representative inputs")
    state.calibration_batches += count
    state.stage = "calibrated"
    if choose_attention:
        apply_attention_choice(prepared, attention_choice(prepared, kept, max_cost=state.recipe.attention.max_cost))
    return prepared


def _chooses_attention(prepared: fx.GraphModule) -> bool:
    """Whether calibrate decides about attention: the recipe asks (a max_cost), some attention is
    quantized, and no earlier calibrate call decided already."""
    state = prepared.meta[STATE]
    spec = state.recipe.attention
    return (spec is not None and spec.max_cost is not None and not state.qat and "choice" not in state.attention
            and bool(attention_matmuls(prepared)))


def _calibrate_precision(prepared: fx.GraphModule, batches, progress: bool) -> fx.GraphModule:
    """Fill the amax histories of an fp8 module's delayed-scaling fake-quants (bf16/fp16: plain runs)."""
    state = prepared.meta[STATE]
    count = 0
    set_fp8_calibrating(prepared, True)
    try:
        with torch.no_grad():
            for i, batch in enumerate(tqdm(batches, desc="calibrating", unit="batch", disable=not progress)):
                args, kwargs = normalize_inputs(batch, what=f"calibration batch {i}")
                _check_batch(prepared, args, kwargs, i)
                prepared(*args, **kwargs)
                count += 1
    finally:
        set_fp8_calibrating(prepared, state.qat)
    if count == 0:
        raise CalibrationError("calibration got no batches; pass a non-empty iterable of representative inputs")
    state.calibration_batches += count
    state.stage = "calibrated"
    return prepared


def _check_batch(gm: fx.GraphModule, args: tuple, kwargs: dict, index: int) -> None:
    """Checks the batch against what was captured: the guards torch.export would have run, worded
    for the user (qcompile drops torch.export's own guard module because passes rewrite the graph).
    A dynamic dim takes any size in its captured range, but dims captured as one symbol (the batch
    of input_ids and of attention_mask) must agree within the batch."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        flat = flatten_for_graph(gm, args, kwargs)
    except InvalidInputsError as e:
        raise InvalidInputsError(f"calibration batch {index} does not match the model's arguments: {e}") from e
    symbols: dict[str, tuple[int, str, int]] = {}   # symbol -> (size, input, dim) where first seen
    for node, value in zip(placeholders, flat):
        expected = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        if value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise CalibrationError(f"calibration batch {index}, input {node.name!r} holds {bad} NaN/inf values; "
                                   "they would poison the observed ranges. Clean or drop that batch")
        if not isinstance(expected, torch.Tensor):
            continue
        problem = None
        if value.dtype != expected.dtype:
            problem = f"dtype {value.dtype}, captured with {expected.dtype}; cast it with .to({expected.dtype})"
        elif value.ndim != expected.ndim:
            problem = (f"rank {value.ndim} (shape {tuple(value.shape)}), captured with rank {expected.ndim}; "
                       f"give batches shaped like the example inputs {tuple(expected.shape)}")
        else:
            for d, (got, want) in enumerate(zip(value.shape, expected.shape)):
                problem = _check_dim(node.name, d, got, want, tuple(value.shape), _shape_text(expected.shape), symbols)
                if problem:
                    break
        if problem:
            raise InvalidInputsError(f"calibration batch {index}, input {node.name!r} has {problem}")


def _static_size(size) -> int | None:
    """The int a captured size stands for: an int, or a SymInt torch.export specialized (AUTO
    found the model fixing it); None for a size that stayed dynamic."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    return int(size) if is_concrete_int(size) else None


def _shape_text(shape) -> str:
    """A captured shape for messages: dynamic dims as 'any'."""
    dims = ["any" if _static_size(d) is None else str(_static_size(d)) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _check_dim(name: str, d: int, got: int, want, shape: tuple, captured: str, symbols: dict) -> str | None:
    """What is wrong with size `got` in dim `d` of input `name`, captured as `want` (an int or a SymInt)."""
    if _static_size(want) is not None:
        if got == _static_size(want):
            return None
        why = (" (the batch dim is dynamic by default; this model fixes it, or prepare got dynamic_shapes=None)"
               if d == 0 else "")
        return (f"size {got} in dim {d} (shape {shape}), captured as {captured}{why}; give batches of that size, "
                f"or pass dynamic_shapes= to prepare if this dimension really varies (batch, sequence)")
    key = str(want)
    first = symbols.setdefault(key, (got, name, d))
    if first[0] != got:
        return (f"size {got} in dim {d} (shape {shape}) where input {first[1]!r} has {first[0]} in dim {first[2]}; "
                f"the model was captured with these sizes equal ({key}): give inputs of one batch")
    return None


def convert(prepared: fx.GraphModule, *, dump_dir=None) -> fx.GraphModule:
    """The reference QDQ GraphModule: a new module; `prepared` is left as it was."""
    state = _state(prepared, "convert")
    if state.stage == "quantized":
        raise ConvertError("this module is already quantized; convert the module qc.prepare returned")
    if state.precision:
        return _convert_precision(prepared, dump_dir)
    if _is_fsdp(prepared):
        raise ConvertError("this QAT module is sharded by FSDP (fully_shard), whose modules cannot be copied: gather "
                           "its full state dict (torch.distributed.checkpoint.state_dict.get_model_state_dict(qat, "
                           "options=StateDictOptions(full_state_dict=True))) into a fresh qc.prepare_qat(model, ...) "
                           "with load_state_dict, and convert that")
    needs_data = bool(state.observers) or bool(state.kv_observers)
    if state.qat:
        unseen = [attr for attr in state.observers.values() if not prepared.get_submodule(attr).calibrated]
        if unseen:
            raise ConvertError(f"this QAT module never saw data ({len(unseen)} activation fake-quants have no "
                               "range, e.g. " + unseen[0] + "): train it, or run qc.calibrate(qat, batches), "
                               "before convert")
    elif needs_data and state.calibration_batches == 0:
        raise ConvertError("convert() needs calibration first: call qc.calibrate(prepared, batches) with "
                           "representative inputs (the recipe has static activation quantization)")
    # the weights that become codes are shared with the copy, not copied: ConvertToQDQ only reads them
    # and then drops them, so the copy never holds a second float model (a whole LLM's weights, or
    # a block's under quantize_sequential); QAT's finalize pass rewrites weights, so it copies them
    shared = [] if state.qat else weights_to_quantize(prepared)
    gm = copy.deepcopy(prepared, {id(t): t for t in shared})
    gm.meta[STATE] = new_state = copy.deepcopy(state)
    new_state.qparams = []
    gm.eval()
    passes = [FinalizeQAT(), ConvertToQDQ()] if state.qat else [ConvertToQDQ()]
    if state.cache is not None:
        passes.append(QuantizeKVCache())
    pm = PassManager(passes, dump_dir=dump_dir, stage="convert")
    pm(gm)
    _unshare(gm, shared)
    new_state.records.extend(pm.records)
    new_state.stage = "quantized"
    return gm


def _unshare(gm: nn.Module, shared: list[torch.Tensor]) -> None:
    """Copy any shared tensor the converted module still holds (a weight also read in float, e.g. an
    embedding tied to a quantized lm_head), so that the result shares nothing with `prepared`."""
    ids = {id(t) for t in shared}
    for mod in gm.modules():
        for table in (mod._parameters, mod._buffers):
            for key, t in table.items():
                if t is not None and id(t) in ids:
                    copied = t.detach().clone()
                    table[key] = nn.Parameter(copied, requires_grad=t.requires_grad) \
                        if isinstance(t, nn.Parameter) else copied


def _is_fsdp(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def _convert_precision(prepared: fx.GraphModule, dump_dir) -> fx.GraphModule:
    """bf16 / fp16: a copy (the casts are the result). fp8: a copy whose fake-quants become constant
    scales and float8 casts (freeze_fp8), which ONNX exports as Cast to FLOAT8E4M3FN."""
    state = prepared.meta[STATE]
    fp8 = state.recipe.fp8 is not None
    histories = [m for m in prepared.modules() if hasattr(m, "amax_history")]
    if fp8 and histories and not any(int(m.steps) > 0 for m in histories):
        raise ConvertError(f"the {state.recipe.name!r} module never saw data (its FP8 amax histories are empty): "
                           "run qc.calibrate(prepared, batches), or train it, before convert")
    if state.kv_observers and state.calibration_batches == 0:
        raise ConvertError("convert() needs calibration first: the static KV cache takes its scales from "
                           "qc.calibrate(prepared, batches)")
    gm = copy.deepcopy(prepared)
    gm.meta[STATE] = new_state = copy.deepcopy(state)
    new_state.qparams = []
    gm.eval()
    if fp8:
        new_state.records.extend(freeze_fp8(gm, dump_dir=dump_dir))
    if new_state.cache is not None:
        pm = PassManager([QuantizeKVCache()], dump_dir=dump_dir, stage="convert_kv_cache")
        pm(gm)
        new_state.records.extend(pm.records)
    new_state.stage = "quantized"
    return gm


LOWERING_BACKENDS = ("auto", "torch", "triton", "reference")


def lower(quantized: fx.GraphModule, backend: str = "auto") -> fx.GraphModule:
    """Replace QDQ patterns of the reference graph with fused kernels; a new module.

    "torch": PyTorch's CPU integer kernels (static INT8 linear / conv2d on oneDNN, per-token dynamic
    INT8 linears on torch._int_mm, weight-only INT8 / INT4 on the pack kernels); "triton": the Triton
    kernels (CUDA, or the interpreter); "auto": torch for a module prepared with target="torch-cpu",
    else triton when CUDA and triton are there, else torch.
    Whatever a backend does not lower stays in QDQ form and its lowering report says why.
    "reference" returns a copy of the QDQ graph unchanged."""
    state = _state(quantized, "lower")
    if state.stage != "quantized":
        raise ConvertError("lower takes the module qc.convert returned; call qc.convert(prepared) first")
    if state.precision:
        raise ConvertError(f"lower takes integer QDQ graphs; the {state.recipe.name!r} module already runs "
                           "as converted (or export it with qc.export_onnx)")
    if backend not in LOWERING_BACKENDS:
        raise RecipeError(f"unknown backend {backend!r}; known: {', '.join(LOWERING_BACKENDS)}")
    if backend == "reference":
        return copy.deepcopy(quantized)
    if backend == "auto" and state.target == "torch-cpu":
        backend = "torch"
    if backend == "auto":
        import importlib.util

        backend = "triton" if torch.cuda.is_available() and importlib.util.find_spec("triton") else "torch"
    if backend == "triton":
        try:
            from .backends.triton import lower as lower_triton
        except ImportError as e:
            raise QCompileError(f"the triton backend needs the 'triton' package ({e}); "
                                "pip install 'qcompile[gpu]', or use backend='torch'") from e
        return lower_triton(quantized)
    from .backends.torch_cpu import lower as lower_torch

    return lower_torch(quantized)


class CompiledModule(nn.Module):
    """What `qc.compile` returns: the lowered module (`.lowered`, for `lowering_report`) and its
    `torch.compile`d form, called without autograd (inductor freezes weights only in inference)."""

    def __init__(self, lowered: fx.GraphModule, dynamic: bool | None):
        super().__init__()
        self.lowered = lowered
        # inductor's freezing folds the weights, their prepacking (oneDNN) and the constant
        # subgraphs into the compiled code; as an option here it stays scoped to this module
        options = {"freezing": True}
        if any(n.target == getattr(torch.ops.qcompile, "int8_attention", None) or
               "int8_attention" in str(n.target) for n in lowered.graph.nodes):
            # inductor's on-disk graph caches key on the graph and its config, not on the lowering
            # registered for qcompile::int8_attention: a cache entry compiled by another qcompile version
            # was reused with the old kernel (outputs off by a whole range in the tests); compile afresh
            options["fx_graph_cache"] = False
        self.__dict__["compiled"] = torch.compile(lowered, dynamic=dynamic, options=options)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.compiled(*args, **kwargs)


def compile(model: fx.GraphModule, backend: str = "auto", *, dynamic: bool | None = None) -> CompiledModule:
    """One call from a calibrated module (or the one qc.convert returned) to the fast one:
    convert if needed, `qc.lower(backend)`, then `torch.compile` with inductor freezing.

    Compilation happens on the first call and again, once, for the first call at a new batch size
    (torch.compile then makes that dim dynamic; `dynamic=True` asks for that at once, False for a
    recompile per shape). Weights are frozen into the compiled code: later changes to the
    module's parameters are not seen. Outputs are computed without autograd."""
    state = _state(model, "compile")
    if state.stage != "quantized":
        model = convert(model)
    return CompiledModule(lower(model, backend), dynamic)
