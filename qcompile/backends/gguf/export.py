"""Write a model as a GGUF file that llama.cpp runs: `export_gguf`.

What is written, for the LLaMA architecture (llama.py):
- weights from the reference graph `qc.convert` made (of the causal LM itself: its KV-cache step
  graph, llm/capture.py; or of a wrapper module whose forward returns the logits): each quantized
  weight's integer codes and scales, read from its `dequantize` node (as `export_onnx` does), encoded
  as the ggml block type of its spec (blocks.py: Q8_0, Q4_0, Q4_1) with no re-quantization, so
  llama.cpp decodes exactly the reference graph's weights; weights left in float as F32 (exact) or
  F16 (`float_type`), 1-D tensors (norms, biases) as F32. A float model (an `nn.Module`) is written all float.
- weights are found by their transformers parameter name, whatever wrapper prefix the capture
  added; the embedding table is the one the graph's embedding op reads (a tied LM head shares it:
  then the file has no `output.weight`, and llama.cpp uses `token_embd` for both);
- Q and K rows permuted for llama.cpp's RoPE, the hyperparameters from the transformers config
  (`state.model_config`, which `qc.prepare` keeps), the tokenizer (tokenizer.py).

The file is written under a temporary name and renamed: a failure never leaves a partial file at `path`.
"""
from __future__ import annotations

import os
import pathlib
from collections import Counter
from dataclasses import dataclass
from itertools import chain

import gguf
import numpy as np
import torch
from torch import fx, nn

from ...errors import GGUFExportError
from ...graph import EMBEDDING, FROM_PASS, STATE, get_param, is_op
from ...spec import QuantSpec
from .blocks import encode, ggml_type
from .llama import NameMap, expected_tensors, llama_hparams, permute_rows, rope_permutation, write_hparams
from .tokenizer import add_tokenizer

qops = torch.ops.qcompile
T = gguf.GGMLQuantizationType
FLOAT_TYPES = {"f32": T.F32, "f16": T.F16}
FILE_TYPES = {T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16,
              T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
              T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1}


@dataclass(eq=False)
class QuantizedWeight:
    """A weight as the reference graph holds it: codes (one per int8/uint8), scale and zero point in the
    spec's layout, exactly what its dequantize node reads."""
    target: str
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: QuantSpec


def check_graph(gm: fx.GraphModule) -> None:
    """Refuse what a GGUF file cannot carry: llama.cpp runs its own fixed LLaMA graph, so ops a PTQ pass
    inserted (AWQ's or SmoothQuant's multiplies, the outlier split's float path) would be lost, and it
    quantizes activations itself (Q8_0 blocks of 32), so other activation quantization would differ."""
    for node in gm.graph.nodes:
        origin = node.meta.get(FROM_PASS)
        if node.op == "call_function" and origin not in (None, "convert_qdq"):
            hint = (" Prepare with algorithms=[{'name': 'awq', 'fold_only': True}]: AWQ then scales only the "
                    "groups whose producer (a norm, a linear) absorbs 1/s" if origin == "awq" else "")
            raise GGUFExportError(f"the graph holds {node.name} ({getattr(node.target, '__name__', node.target)}), "
                                  f"inserted by {origin}: llama.cpp's LLaMA graph has no place for it.{hint}")
        if node.target == qops.quantize.default and node.args[0].op != "get_attr":
            scale = node.args[1]
            chooser = scale.args[0] if scale.op == "call_function" and scale.args else None
            if not (isinstance(chooser, fx.Node) and chooser.target == qops.choose_qparams_per_block.default
                    and chooser.args[1] == 32 and node.args[5:7] == (-128, 127)):
                raise GGUFExportError(f"{node.name} quantizes an activation in a way llama.cpp does not (it "
                                      "quantizes matmul inputs itself, in int8 blocks of 32 per token): use a "
                                      "gguf-* recipe (or its -weight-only form)")


def _graph_weights(gm: fx.GraphModule) -> tuple[dict, object]:
    """(parameter name -> float tensor or QuantizedWeight, what the embedding op reads) of a converted graph."""
    state = gm.meta[STATE]
    if state.precision:
        raise GGUFExportError("export_gguf writes integer-quantized graphs and float models; a precision recipe's "
                              "graph (bf16 / fp16 / fp8) is neither: export the float model with float_type='f16'")
    if state.stage != "quantized":
        raise GGUFExportError(f"this module is {state.stage}, not quantized: pass what qc.convert returns (or the float "
                              "model itself for an F32 / F16 file)")
    cache = getattr(state, "cache", None)
    if cache is not None and cache.spec is not None:
        raise GGUFExportError("this graph quantizes its KV cache (kv_cache=...), which a GGUF file does not hold: "
                              "llama.cpp chooses its cache type when it runs the file (type_k / type_v in "
                              "llama-cpp-python, -ctk / -ctv q8_0 in llama-cli). Prepare without kv_cache")
    check_graph(gm)
    rows = {"qc_w_" + r["tensor"].replace(".", "_"): r for r in state.qparams if r["kind"] == "weight"}
    out = {name: t.detach() for name, t in chain(gm.named_parameters(), gm.named_buffers()) if not name.startswith("qc_")}
    by_node: dict[fx.Node, object] = {}
    for node in gm.graph.nodes:
        if node.target == qops.dequantize.default and node.args[0].op == "get_attr" and node.args[0].target in rows:
            row = rows[node.args[0].target]
            codes, scale, zp = (getattr(gm, a.target).detach() for a in node.args[:3])
            by_node[node] = out[row["tensor"]] = QuantizedWeight(row["tensor"], codes, scale, zp, row["spec"])
        elif node.op == "call_function" and "nf4" in str(node.target):
            raise GGUFExportError("NF4 weights have no GGUF block type; quantize with a gguf-* recipe")
    embedding = None
    for node in gm.graph.nodes:
        if is_op(node, EMBEDDING):
            table = node.args[0]
            # a float table may be a second attribute of the LM head's Parameter (UntieWeights), which
            # named_parameters() lists once: read the attribute itself
            embedding = by_node.get(table) if table.op != "get_attr" else get_param(gm, table).detach()
            break
    return out, embedding


def _module_weights(model: nn.Module) -> tuple[dict, object]:
    out = {name: t.detach() for name, t in model.state_dict(keep_vars=True).items()}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return out, (emb.weight.detach() if emb is not None else None)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.data_ptr() == b.data_ptr() and a.shape == b.shape
    return a is b


def _find_config(model):
    if isinstance(model, fx.GraphModule) and STATE in model.meta:
        return model.meta[STATE].model_config
    return getattr(model, "config", None)


def collect_tensors(model, hp) -> dict[str, object]:
    """GGUF tensor name -> float tensor or QuantizedWeight, checked against what llama.cpp needs."""
    if isinstance(model, fx.GraphModule) and STATE in model.meta:
        weights, embedding = _graph_weights(model)
    elif isinstance(model, fx.GraphModule):
        raise GGUFExportError("this GraphModule does not come from qc.prepare / qc.convert; pass the converted "
                              "module or the float nn.Module")
    elif isinstance(model, nn.Module):
        weights, embedding = _module_weights(model)
    else:
        raise GGUFExportError(f"export_gguf takes a converted module or an nn.Module, got {type(model).__name__}")
    names = NameMap(hp.n_layers)
    entries: dict[str, object] = {}
    for key, value in weights.items():
        name = names(key)
        if name is None:
            if isinstance(value, QuantizedWeight):
                raise GGUFExportError(f"the quantized weight {key} has no llama.cpp tensor name for the LLaMA "
                                      "architecture; exclude its module from the recipe or drop it from the model")
            continue
        if name in entries and not _same(entries[name], value):
            raise GGUFExportError(f"two tensors map to {name}: {key} and another; is a wrapper holding two models?")
        entries[name] = value
    if embedding is not None:
        entries["token_embd.weight"] = embedding
    if hp.tied and "output.weight" in entries and _same(entries["output.weight"], entries.get("token_embd.weight")):
        del entries["output.weight"]  # one table for both, as llama.cpp reads a tied model
    needed = expected_tensors(hp)
    missing = [n for n in needed if n not in entries]
    if missing:
        raise GGUFExportError(f"{len(missing)} tensors llama.cpp's LLaMA loader needs are not in the model: "
                              f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    keep = set(needed) | ({"output.weight"} & set(entries))
    dropped = [n for n, v in entries.items() if n not in keep and isinstance(v, QuantizedWeight)]
    if dropped:
        raise GGUFExportError(f"quantized tensors {dropped[:4]} have no place in a LLaMA GGUF file")
    return {n: entries[n] for n in needed + (["output.weight"] if "output.weight" in keep and "output.weight" not in needed else [])}


def _tensor_data(name: str, value, hp, float_type: str) -> tuple[np.ndarray, T]:
    heads = rope_permutation(name, hp)
    if isinstance(value, QuantizedWeight):
        qtype = ggml_type(value.spec, f"{name} ({value.target})")
        codes, scale, zp = value.codes, value.scale, value.zero_point
        if heads is not None:
            codes = permute_rows(codes, heads)
            scale = permute_rows(scale, heads) if scale.ndim else scale
            zp = permute_rows(zp, heads) if zp.ndim else zp
        return encode(codes, scale, zp, qtype, f"{name} ({value.target})"), qtype
    t = value.detach().float()
    if heads is not None:
        t = permute_rows(t, heads)
    if t.ndim == 1 or float_type == "f32":
        return t.numpy().astype(np.float32), T.F32
    return t.numpy().astype(np.float16), T.F16


def write_metadata(writer: gguf.GGUFWriter, hp, tensor_types, tokenizer, pre: str | None, name: str | None) -> None:
    """Name, hyperparameters, file type and tokenizer; `tensor_types`: (GGUF name, ndim, type) of every tensor."""
    writer.add_name(name or hp.name)
    write_hparams(writer, hp)
    # general.file_type: the type most layer matrices have (llama.cpp prints it; nothing reads it back)
    matrices = Counter(qtype for n, ndim, qtype in tensor_types if n.startswith("blk.") and ndim == 2)
    writer.add_file_type(int(FILE_TYPES[matrices.most_common(1)[0][0]]))
    if any(qtype not in FLOAT_TYPES.values() for _, _, qtype in tensor_types):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, hp.vocab, pre)


def write_gguf(model, path: "str | os.PathLike", *, tokenizer, config=None, float_type: str = "f32",
               pre: str | None = None, name: str | None = None) -> pathlib.Path:
    """`qcompile.export_gguf` (backends/gguf/__init__.py has its documentation)."""
    if float_type not in FLOAT_TYPES:
        raise GGUFExportError(f"float_type is 'f32' or 'f16', got {float_type!r}")
    hp = llama_hparams(config if config is not None else _find_config(model))
    tensors = collect_tensors(model, hp)
    data = {n: _tensor_data(n, v, hp, float_type) for n, v in tensors.items()}

    def write(writer: gguf.GGUFWriter) -> None:
        write_metadata(writer, hp, [(n, arr.ndim, qtype) for n, (arr, qtype) in data.items()], tokenizer, pre, name)
        for n, (arr, qtype) in data.items():
            writer.add_tensor(n, arr, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()

    return write_atomically(path, write)


def write_atomically(path: "str | os.PathLike", write) -> pathlib.Path:
    """`write(writer)` into a LLaMA GGUFWriter on a temporary name, renamed to `path` once closed: a
    failure never leaves a partial file at `path`."""
    path = pathlib.Path(path)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        write(writer)
        writer.close()
        partial.replace(path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return path
