"""Weights that stay on disk: read one tensor at a time from safetensors or GGUF files.

A `Checkpoint` answers which tensors it holds, their shapes, and loads one as a new CPU tensor.
Files are opened for each read and closed after it, so the memory-mapped pages of a multi-GB file
do not pile up in the process (they would count in its resident memory).

- safetensors: one file, or a folder with `model.safetensors`, a sharded
  `model.safetensors.index.json` (its `weight_map` names the shard of every tensor), or any
  `*.safetensors` files; checked and listed through `safetensors.safe_open`, each tensor read
  with plain file reads into memory of its own: a mapped file's pages count in the process's
  resident memory as they are touched, in units of the page cache's (large) folios (185-353 MB
  file-backed while a 22-layer GPTQ run was sampled, against 185 MB of libraries with plain reads).
- GGUF (llama.cpp): read through the `gguf` package's `GGUFReader`; llama.cpp's tensor names are
  mapped to the model's and its block formats (Q4_1, Q8_0, ...) dequantized to float32 as
  transformers' own GGUF loader does (including its reverse permutation of LLaMA's q/k rows).
- the model itself, when its weights are already in memory (not on the `meta` device).

Everything that can go wrong with the files raises `CheckpointError` naming the file or tensor.
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Iterable

import torch
from torch import nn

from ..errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
# safetensors' dtype names (its format's header), those read with plain file reads
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
READ_CHUNK = 1 << 30   # bytes per read() call (Linux returns at most ~2 GB from one)


class Checkpoint:
    """Base interface: `names`, `shape(name)`, `load(names)`, `identity()` (for resume checks)."""

    path: str

    def names(self) -> set[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def identity(self) -> dict:
        """What identifies these weights for a resumed run (files and sizes)."""
        raise NotImplementedError


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError as e:
        raise CheckpointError(f"cannot read the checkpoint file {path}: {e.strerror or e}") from e


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, path: "str | os.PathLike"):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.path = str(path)
        p = pathlib.Path(path)
        if p.is_dir():
            index = p / INDEX_NAME
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (ValueError, KeyError, OSError) as e:
                    raise CheckpointError(f"the shard index {index} is not a safetensors index "
                                          f"(a JSON object with a 'weight_map'): {e}") from e
                files = sorted(set(weight_map.values()))
                missing = [f for f in files if not (p / f).is_file()]
                if missing:
                    raise CheckpointError(f"the checkpoint {p} is missing shard file(s) {', '.join(missing)} that "
                                          f"{INDEX_NAME} lists (e.g. for tensor "
                                          f"{next(k for k, v in weight_map.items() if v == missing[0])!r}); "
                                          "copy the complete checkpoint")
                self.files = [str(p / f) for f in files]
            elif (p / "model.safetensors").is_file():
                self.files = [str(p / "model.safetensors")]
            else:
                self.files = sorted(str(f) for f in p.glob("*.safetensors"))
                if not self.files:
                    raise CheckpointError(f"{p} holds no .safetensors file (nor {INDEX_NAME})")
        elif p.is_file():
            self.files = [str(p)]
        else:
            raise CheckpointError(f"the checkpoint {p} does not exist")
        self._where: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._layout: dict[str, tuple[torch.dtype | None, int, int]] = {}   # name -> (dtype, start, end) in the file
        for f in self.files:
            try:
                with safe_open(f, framework="pt") as h:
                    for name in h.keys():
                        self._where[name] = f
                        self._shapes[name] = tuple(h.get_slice(name).get_shape())
                self._layout.update(_data_layout(f))
            except Exception as e:
                raise CheckpointError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e}); "
                                      "it may be truncated or corrupt: copy it again") from e

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self._where:
                raise CheckpointError(f"the checkpoint {self.path} holds no tensor {name!r}")
            by_file.setdefault(self._where[name], []).append(name)
        out = {}
        for f, group in by_file.items():
            try:
                for name in group:
                    dtype, start, end = self._layout[name]
                    if dtype is None:   # a dtype without a plain read here: safetensors' copy of it
                        with self._safe_open(f, framework="pt") as h:
                            out[name] = h.get_tensor(name).clone()
                    else:
                        out[name] = _read_tensor(f, name, self._shapes[name], dtype, start, end)
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"reading tensor {group[0]!r} from {f} failed ({type(e).__name__}: {e}); "
                                      "the file may be truncated or corrupt") from e
        return out

    def identity(self) -> dict:
        return {"format": "safetensors", "files": {os.path.basename(f): _size(f) for f in self.files}}


def _data_layout(path: str) -> dict[str, tuple[torch.dtype | None, int, int]]:
    """{name: (dtype or None, first byte, end byte)} of each tensor's data in a safetensors file
    (its format: an 8-byte little-endian header length, the JSON header, then the data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {name: (SAFETENSORS_DTYPES.get(info["dtype"]), 8 + n + info["data_offsets"][0], 8 + n + info["data_offsets"][1])
            for name, info in header.items() if name != "__metadata__"}


def _read_tensor(path: str, name: str, shape, dtype: torch.dtype, start: int, end: int) -> torch.Tensor:
    """The tensor's bytes read into a new tensor (nothing of the file stays mapped)."""
    out = torch.empty(shape, dtype=dtype)
    buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    if len(buffer) != end - start:
        raise CheckpointError(f"tensor {name!r} in {path}: its header gives {end - start} bytes for shape "
                              f"{tuple(shape)} of {dtype}; the file is corrupt")
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        done = 0
        while done < len(buffer):
            got = f.readinto(buffer[done:done + READ_CHUNK])
            if not got:
                raise CheckpointError(f"tensor {name!r} in {path} ends after {done} of {len(buffer)} bytes: "
                                      "the file is truncated; copy it again")
            done += got
    return out


class GGUFCheckpoint(Checkpoint):
    """A llama.cpp GGUF file, mapped onto the tensor names of `model` (a transformers model).

    The file is parsed once (GGUFReader: names, types, offsets) and then closed; each load reads
    the bytes of the asked tensors with plain file reads."""

    def __init__(self, path: "str | os.PathLike", model: nn.Module):
        try:
            from gguf import GGUFReader
            from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor
        except ImportError as e:
            raise CheckpointError(f"reading GGUF needs the gguf and transformers packages ({e})") from e
        self.path = str(path)
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "to_dict"):
            raise CheckpointError("a GGUF checkpoint is mapped onto a transformers model (one with a .config); "
                                  f"got {type(model).__name__}")
        try:
            reader = GGUFReader(self.path, "r")
        except Exception as e:
            raise CheckpointError(f"{self.path} is not a readable GGUF file ({type(e).__name__}: {e})") from e
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
        # transformers' per-architecture fix-ups (LLaMA: undo llama.cpp's q/k row permutation)
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
        gguf_to_model = _gguf_names(model, arch)
        self._entries: dict[str, tuple] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for t in reader.tensors:
            if t.name in gguf_to_model:
                name = gguf_to_model[t.name]
                self._entries[name] = (t.name, t.tensor_type, t.data_offset, t.data.dtype, t.data.shape)
                # GGUF lists dimensions fastest first; arrays (and the model) slowest first
                self._shapes[name] = tuple(int(d) for d in reversed(t.shape.tolist()))
        del reader

    def names(self) -> set[str]:
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        import numpy as np
        from gguf import dequantize

        out = {}
        for name in names:
            if name not in self._entries:
                raise CheckpointError(f"the GGUF file {self.path} holds no tensor for {name!r}")
            gguf_name, qtype, offset, dtype, shape = self._entries[name]
            count = int(np.prod(shape))
            try:
                raw = np.fromfile(self.path, dtype=dtype, count=count, offset=offset)
                if raw.size != count:
                    raise CheckpointError(f"{self.path} ends inside tensor {gguf_name} ({name!r}): the file is truncated")
                w = dequantize(raw.reshape(shape), qtype)
                w = self._processor.process(weights=w, name=gguf_name).weights
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"reading {gguf_name} ({qtype.name}) of {self.path} for {name!r} failed: "
                                      f"{type(e).__name__}: {e}") from e
            out[name] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        return out

    def identity(self) -> dict:
        return {"format": "gguf", "files": {os.path.basename(self.path): _size(self.path)}}


def _gguf_names(model: nn.Module, arch: str) -> dict[str, str]:
    """llama.cpp tensor name -> the model's name, from gguf's own name table (what transformers'
    get_gguf_hf_weights_map computes, in one pass over the names)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch_id = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_id is None:
        raise CheckpointError(f"the gguf package does not know the architecture {arch!r}")
    n_layers = getattr(model.config, "num_hidden_layers", 0)
    table = get_tensor_name_map(arch_id, n_layers)
    out = {}
    for name in model.state_dict():
        base, dot, suffix = name.rpartition(".")
        parts = base.split(".")
        for i in range(len(parts)):  # also under a prefix (e.g. "model."), as transformers tries
            gguf = table.get_name(".".join(parts[i:]))
            if gguf is not None:
                out.setdefault(gguf + dot + suffix, name)
                break
    return out


class ModuleCheckpoint(Checkpoint):
    """The weights of a model that is already in memory (copied on load: the model stays untouched)."""

    def __init__(self, model: nn.Module):
        self.path = f"<the {type(model).__name__}'s own weights>"
        self._tensors = {}
        for name, t in list(model.named_parameters(remove_duplicate=False)) + \
                list(model.named_buffers(remove_duplicate=False)):
            if not t.is_meta:
                self._tensors[name] = t

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {n: self._tensors[n].detach().clone() for n in names}

    def identity(self) -> dict:
        return {"format": "module", "tensors": len(self._tensors)}


def open_checkpoint(checkpoint, model: nn.Module) -> Checkpoint:
    """A Checkpoint for a path (safetensors file or folder, GGUF file) or None (the model's own weights)."""
    if checkpoint is None:
        return ModuleCheckpoint(model)
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise CheckpointError(f"checkpoint is a path (a .safetensors file, a folder of them, a .gguf file) or None; "
                              f"got {type(checkpoint).__name__}")
    if str(checkpoint).endswith(".gguf"):
        if not os.path.isfile(checkpoint):
            raise CheckpointError(f"the checkpoint {checkpoint} does not exist")
        return GGUFCheckpoint(checkpoint, model)
    return SafetensorsCheckpoint(checkpoint)
