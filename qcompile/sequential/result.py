"""A quantized checkpoint written by quantize_sequential: its stages, weights and the whole model."""
from __future__ import annotations

import inspect
import json
import pathlib

import torch
from torch import fx, nn

from ..errors import CheckpointError, InvalidInputsError
from ..graph import STATE
from .store import FLOAT_FILE, MANIFEST


def stage_info(quantized: fx.GraphModule, tensor_names, constants, arity: int) -> dict:
    """What the manifest records of a converted stage: its inputs, and where each quantized
    weight's codes, scale and zero point are (buffer names in the stage's graph) with its spec."""
    weights = []
    for row in quantized.meta[STATE].qparams:
        if row["kind"] != "weight":
            continue
        base = "qc_w_" + row["tensor"].replace(".", "_")
        weights.append({"tensor": row["tensor"], "spec": row["spec"].to_dict(), "codes": base,
                        "scale": base + "_scale", "zero_point": base + "_zero_point"})
    activations = sum(row["kind"] == "activation" for row in quantized.meta[STATE].qparams)
    return {"tensors": list(tensor_names), "constants": dict(constants), "arity": arity,
            "weights": weights, "activation_qparams": activations}


class StageRunner(nn.Module):
    """Stands in the model for a quantized stage: takes the arguments the original module took
    (bound to its signature), passes the hidden states and the captured tensor arguments to the
    stage's graph, and returns what the original returned (a tensor, or a tuple)."""

    def __init__(self, name: str, graph: nn.Module, signature: inspect.Signature, info: dict):
        super().__init__()
        self.stage_name, self.graph, self.signature = name, graph, signature
        self.tensor_names, self.constants, self.arity = info["tensors"], info["constants"], info["arity"]

    def train(self, mode: bool = True) -> "StageRunner":
        self.training = mode  # the exported graph has no modes (torch.export refuses train())
        return self

    def forward(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        flat = {}
        for k, v in bound.arguments.items():
            kind = self.signature.parameters[k].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                flat.update(v)
            elif kind is not inspect.Parameter.VAR_POSITIONAL:
                flat[k] = v
        hidden = flat.pop(next(iter(self.signature.parameters)))
        for k, v in flat.items():
            if k in self.constants and not (v is None and self.constants[k] is None) and v != self.constants[k]:
                raise InvalidInputsError(f"the quantized stage {self.stage_name} was captured with {k}="
                                         f"{self.constants[k]!r} (the plain forward, no cache), called with "
                                         f"{k}={type(v).__name__ if not isinstance(v, (bool, int, str)) else v!r}")
        tensors = [tuple(flat[n]) if isinstance(flat[n], list) else flat[n] for n in self.tensor_names]
        out = self.graph(hidden, *tensors)
        return (out,) + (None,) * (self.arity - 1) if self.arity else out


class QuantizedCheckpoint:
    """The output folder of `qc.quantize_sequential`.

    `stage(name)` loads one quantized stage (a GraphModule of the reference QDQ graph),
    `quantized_weights()` yields every quantized weight's codes, scale, zero point and spec
    (one stage in memory at a time), `export_gguf(path, tokenizer=...)` writes a llama.cpp file the
    same way (gguf-* recipes), `module()` assembles the whole quantized model (it then
    holds every stage in memory: for models that fit)."""

    def __init__(self, path, model: nn.Module | None = None):
        self.path = pathlib.Path(path)
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path} holds no readable {MANIFEST} ({e})") from e
        if not self.manifest.get("complete"):
            raise CheckpointError(f"the run in {self.path} did not finish; run quantize_sequential again with the "
                                  "same arguments to resume it")
        self.model = model

    @property
    def stages(self) -> list[str]:
        return list(self.manifest["blocks"]) + list(self.manifest["head"])

    def stage_info(self, name: str) -> dict:
        return self.manifest["stages"][name]

    def exported(self, name: str):
        import qcompile  # noqa: F401  (registers the qcompile:: ops)

        return torch.export.load(str(self.path / "stages" / f"{name}.pt2"))

    def stage(self, name: str) -> fx.GraphModule:
        return self.exported(name).module()

    def quantized_weights(self):
        """(tensor name, codes, scale, zero point, spec dict) of every quantized weight, stage by stage."""
        for name in self.stages:
            ep = self.exported(name)
            state = {**ep.state_dict, **ep.constants}
            for w in self.stage_info(name)["weights"]:
                yield w["tensor"], state[w["codes"]], state[w["scale"]], state[w["zero_point"]], w["spec"]
            del ep, state

    def export_gguf(self, path, *, tokenizer, config=None, float_type: str = "f32", pre: str | None = None,
                    name: str | None = None) -> pathlib.Path:
        """The quantized model as a GGUF file for llama.cpp (what `qc.export_gguf` writes for the whole
        converted model), written tensor by tensor with one stage in memory (gguf_output.py)."""
        try:
            import gguf  # noqa: F401
        except ImportError:
            from ..errors import GGUFExportError

            raise GGUFExportError("GGUF export needs the gguf package: pip install gguf==0.19.0") from None
        from .gguf_output import write_gguf_sequential

        return write_gguf_sequential(self, path, tokenizer=tokenizer, config=config, float_type=float_type, pre=pre,
                                     name=name)

    def float_tensors(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        stored = load_file(str(self.path / FLOAT_FILE))
        return {name: stored[key] for name, key in self.manifest["float"]["aliases"].items()}

    def module(self, model: nn.Module | None = None) -> nn.Module:
        """The quantized model: `model`'s structure (the one given to quantize_sequential by
        default) with every stage replaced by its quantized graph and the float tensors loaded."""
        from .stages import meta_copy, set_submodule

        model = model if model is not None else self.model
        if model is None:
            raise CheckpointError("module() needs the model's structure: pass the (meta-device) model")
        work = meta_copy(model)
        for name in self.stages:
            original = work.get_submodule(name)
            runner = StageRunner(name, self.stage(name), inspect.signature(original.forward), self.stage_info(name))
            set_submodule(work, name, runner)
        floats = self.float_tensors()
        for name, t in list(work.named_parameters(remove_duplicate=False)) + \
                list(work.named_buffers(remove_duplicate=False)):
            if name.split(".graph.")[0] in self.stages or not t.is_meta:
                continue
            if name not in floats:
                raise CheckpointError(f"{self.path / FLOAT_FILE} holds no tensor {name!r}")
            owner_name, _, attr = name.rpartition(".")
            owner = work.get_submodule(owner_name) if owner_name else work
            value = floats[name].to(t.dtype)
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                owner._buffers[attr] = value
        config = getattr(work, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = False  # the stages were captured on the plain forward, without a KV cache
        return work.eval()
