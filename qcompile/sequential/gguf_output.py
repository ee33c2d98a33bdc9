"""A GGUF file for llama.cpp from a sequential run's output folder, one stage in memory at a time.

`QuantizedCheckpoint.export_gguf` writes what `qc.export_gguf` writes for the whole converted model
(backends/gguf/export.py: the same names, RoPE permutation, block encodings, hyperparameters and
tokenizer), but never holds more than one stage: every tensor's GGUF type and size are known from
the manifest and the model's shapes before any data is read, so the header and tensor table are
written first, then each tensor's data in file order, its stage loaded when first needed and
dropped when the next stage is.

The prologue of a sequential run (the token embedding) ran in float and is stored in float; where
the recipe quantizes embeddings (gguf-* recipes: Q8_0), the table is quantized here exactly as
`qc.convert` quantizes it (round to nearest with the recipe's spec; no algorithm touches an
embedding table), so a run mirrored on the whole model's calibration (`propagate_error=False`)
gives the whole model's file byte for byte (tested).
"""
from __future__ import annotations

import math
import os
import pathlib

import torch

from ..errors import GGUFExportError
from ..spec import QuantSpec, Recipe, get_recipe


def _check_recipe(recipe: Recipe) -> None:
    """What export.check_graph refuses in a converted graph, refused from the run's recipe (a saved
    stage no longer says which pass inserted a node)."""
    for name, opts in recipe.algorithms:
        opts = dict(opts)
        if name in ("smoothquant", "outlier_split") or (name == "awq" and not opts.get("fold_only")):
            hint = (" Run with algorithms=[{'name': 'awq', 'fold_only': True}]: AWQ then scales only the groups "
                    "whose producer absorbs 1/s" if name == "awq" else "")
            raise GGUFExportError(f"this run used {name}, which inserts ops llama.cpp's LLaMA graph has no place "
                                  f"for.{hint}")
    for r in [recipe] + [get_recipe(o) for _, o in recipe.overrides]:
        act = r.activation
        if act is not None and not (act.dynamic and act.dtype == "int8" and getattr(act.granularity, "size", None) == 32):
            raise GGUFExportError(f"recipe {r.name!r} quantizes activations in a way llama.cpp does not (it "
                                  "quantizes matmul inputs itself, in int8 blocks of 32 per token): use a gguf-* "
                                  "recipe (or its -weight-only form)")


class _Stages:
    """Quantized weights by tensor name, loading one stage at a time."""

    def __init__(self, ckpt):
        self.ckpt, self.name, self.state = ckpt, None, None

    def _load(self, stage: str) -> dict:
        if stage != self.name:
            self.name = self.state = None   # the previous stage goes before the next one is read
            ep = self.ckpt.exported(stage)
            self.name, self.state = stage, {**ep.state_dict, **ep.constants}
        return self.state

    def weight(self, stage: str, info: dict, spec: QuantSpec):
        from ..backends.gguf.export import QuantizedWeight

        s = self._load(stage)
        return QuantizedWeight(info["tensor"], s[info["codes"]], s[info["scale"]], s[info["zero_point"]], spec)

    def float_tensor(self, stage: str, tensor: str) -> torch.Tensor:
        s = self._load(stage)
        if tensor not in s:
            raise GGUFExportError(f"the stage {stage} of {self.ckpt.path} holds no tensor {tensor!r}")
        return s[tensor]


def _quantize_embedding(table: torch.Tensor, spec: QuantSpec, tensor: str):
    """The table as `qc.convert` quantizes a weight no algorithm fixed."""
    from ..backends.gguf.export import QuantizedWeight
    from ..passes.convert_qdq import encode_weight

    codes, scale, zp, _, _ = encode_weight(table, spec, tensor)
    return QuantizedWeight(tensor, codes, scale, zp, spec)


def write_gguf_sequential(ckpt, path: "str | os.PathLike", *, tokenizer, config=None, float_type: str = "f32",
                          pre: str | None = None, name: str | None = None) -> pathlib.Path:
    """`QuantizedCheckpoint.export_gguf` (see the module docstring)."""
    import gguf
    from safetensors import safe_open

    from ..backends.gguf.blocks import ggml_type
    from ..backends.gguf.export import FLOAT_TYPES, _tensor_data, write_atomically, write_metadata
    from ..backends.gguf.llama import NameMap, expected_tensors, llama_hparams
    from .store import FLOAT_FILE

    if float_type not in FLOAT_TYPES:
        raise GGUFExportError(f"float_type is 'f32' or 'f16', got {float_type!r}")
    model = ckpt.model
    config = config if config is not None else getattr(model, "config", None)
    if config is None or model is None:
        raise GGUFExportError("export_gguf of a sequential run needs the model's structure and config: open the "
                              "folder with QuantizedCheckpoint(path, model) (what quantize_sequential returns has it)")
    recipe = Recipe.from_dict(ckpt.manifest["fingerprint"]["recipe"])
    _check_recipe(recipe)
    hp = llama_hparams(config)
    names = NameMap(hp.n_layers)
    shapes = {n: tuple(t.shape) for n, t in list(model.named_parameters(remove_duplicate=False)) +
              list(model.named_buffers(remove_duplicate=False))}

    # gguf name -> how to get its value: ("stage", stage, weight info, spec), ("stage float", stage,
    # tensor name), ("float", tensor name) or ("embedding", tensor name, spec): the float table, quantized
    sources: dict[str, tuple] = {}
    for stage in ckpt.stages:
        for w in ckpt.stage_info(stage)["weights"]:
            g = names(w["tensor"])
            if g is None:
                raise GGUFExportError(f"the quantized weight {w['tensor']} has no llama.cpp tensor name for the "
                                      "LLaMA architecture; exclude its module from the recipe")
            sources[g] = ("stage", stage, w, QuantSpec.from_dict(w["spec"]))
    # a stage's tensors left float (norms, biases) are in its graph under their own names
    for tensor in shapes:
        stage = next((st for st in ckpt.stages if tensor.startswith(st + ".")), None)
        g = names(tensor)
        if stage is not None and g is not None and g not in sources:
            sources[g] = ("stage float", stage, tensor)
    aliases = ckpt.manifest["float"]["aliases"]   # tensor name -> the key it is stored under
    for tensor in aliases:
        g = names(tensor)
        if g is not None and g not in sources:
            sources[g] = ("float", tensor)
    embedding = _embedding_name(model)
    table_recipe = recipe.recipe_for(embedding) if embedding else None
    quantize_table = (table_recipe is not None and "embedding" in table_recipe.ops and table_recipe.weight is not None
                      and sources.get("token_embd.weight", ("",))[0] == "float")
    if quantize_table:
        sources["token_embd.weight"] = ("embedding", sources["token_embd.weight"][1], table_recipe.weight)

    floats = safe_open(str(ckpt.path / FLOAT_FILE), framework="pt")
    stages = _Stages(ckpt)

    def value(g: str):
        src = sources[g]
        if src[0] == "stage":
            return stages.weight(src[1], src[2], src[3])
        if src[0] == "stage float":
            return stages.float_tensor(src[1], src[2])
        table = floats.get_tensor(aliases[src[1]]).float()
        return _quantize_embedding(table, src[2], src[1]) if src[0] == "embedding" else table

    if hp.tied and "output.weight" in sources:
        # one table for both where the head's codes are the table's, as qc.export_gguf writes a tied model
        if _same_source(sources, aliases, value):
            del sources["output.weight"]
    needed = expected_tensors(hp)
    missing = [n for n in needed if n not in sources]
    if missing:
        raise GGUFExportError(f"{len(missing)} tensors llama.cpp's LLaMA loader needs are not in the run's output: "
                              f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    order = needed + (["output.weight"] if "output.weight" in sources and "output.weight" not in needed else [])
    extra = [g for g, s in sources.items() if g not in order and s[0] != "float"]
    if extra:
        raise GGUFExportError(f"quantized tensors {extra[:4]} have no place in a LLaMA GGUF file")

    def info(g: str) -> tuple[tuple, object, int, object]:
        """(shape as written, numpy dtype, bytes, GGUF type) without reading the tensor."""
        src = sources[g]
        tensor = {"stage": lambda: src[2]["tensor"], "stage float": lambda: src[2]}.get(src[0], lambda: src[1])()
        shape = shapes[tensor]
        if src[0] in ("stage", "embedding"):
            qtype = ggml_type(src[-1], f"{g} ({tensor})")
            byte_shape = tuple(gguf.quant_shape_to_byte_shape(shape, qtype))
            return byte_shape, "uint8", math.prod(byte_shape), qtype
        qtype = FLOAT_TYPES["f32" if len(shape) == 1 else float_type]
        return shape, "float32" if qtype == FLOAT_TYPES["f32"] else "float16", math.prod(shape) * (
            4 if qtype == FLOAT_TYPES["f32"] else 2), qtype

    infos = {g: info(g) for g in order}
    def write(writer) -> None:
        import numpy as np

        write_metadata(writer, hp, [(g, len(shape), q) for g, (shape, _, _, q) in infos.items()], tokenizer, pre, name)
        for g, (shape, dtype, nbytes, qtype) in infos.items():
            writer.add_tensor_info(g, shape, np.dtype(dtype), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for g in order:
            arr, qtype = _tensor_data(g, value(g), hp, float_type)
            if arr.nbytes != infos[g][2] or qtype != infos[g][3]:
                raise GGUFExportError(f"{g}: {arr.nbytes} bytes of {qtype.name}, the header says {infos[g][2]} of "
                                      f"{infos[g][3].name} (the folder's manifest does not match its stages)")
            writer.write_tensor_data(arr)

    return write_atomically(path, write)


def _embedding_name(model) -> str | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        return None
    return next((n for n, m in model.named_modules() if m is emb), None)


def _same_source(sources: dict, aliases: dict, value) -> bool:
    """Whether the tied head (output.weight) holds what token_embd holds."""
    head, table = sources["output.weight"], sources["token_embd.weight"]
    if head[0] == "float" and table[0] == "float":
        return aliases[head[1]] == aliases[table[1]]
    if head[0] == "float" or table[0] == "float":
        return False
    a, b = value("output.weight"), value("token_embd.weight")
    return a.spec == b.spec and all(torch.equal(x, y) for x, y in
                                    ((a.codes, b.codes), (a.scale, b.scale), (a.zero_point, b.zero_point)))
