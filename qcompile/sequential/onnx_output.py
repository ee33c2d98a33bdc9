"""ONNX output of a sequential run, written part by part, never the whole model in memory.

    output_dir/onnx/
      model.layers.0.onnx  model.layers.0.onnx.data     a quantized stage: qc.export_onnx's QDQ graph,
      ...                                               written when the stage is finished
      prologue.onnx        prologue.onnx.data           input_ids -> block 0's inputs (embeddings,
                                                        positions, rotary tables), float
      model.norm.onnx      model.norm.onnx.data         a head module no recipe op touches, float
      model.onnx                                        input_ids -> logits: the parts chained

`model.onnx` holds only the graph: its initializers are external data that point into the parts'
`.data` files (same folder), so assembling it reads no weight, and onnxruntime loads the model as
if it were one file. Every part is exported at one opset (a graph has one version per domain).
A part is written into a temporary folder and renamed into place, data file first: no `.onnx`
exists under its final name without its complete data.
"""
from __future__ import annotations

import inspect
import pathlib

import torch
from torch import nn

from ..errors import ExportError
from .stages import dynamic_shapes_for, flat_arguments, lazy_weights, meta_copy, model_call, set_submodule
from .store import atomic_write_files

FOLDER = "onnx"
MODEL = "model.onnx"
PROLOGUE = "prologue"
OPSET = 21  # holds INT4 weights and blocked scales (QuantizeLinear/DequantizeLinear block_size)


def _save_proto(proto, folder: pathlib.Path, name: str) -> None:
    import onnx

    # small constants (reduction axes, shapes) stay inline: onnxruntime's shape inference reads them
    onnx.save_model(proto, str(folder / f"{name}.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{name}.onnx.data", size_threshold=1024)


def write_stage(root: pathlib.Path, name: str, quantized, example: tuple, exported) -> str:
    """The converted stage as QDQ ONNX (`qc.export_onnx`), dynamic in the dims that stayed symbolic
    in the stage's own re-export `exported` (batch and sequence; the weights fix the others)."""
    from ..backends.onnx import export_onnx

    proto = export_onnx(quantized, None, example, opset=OPSET, dynamic_shapes=symbolic_dims(exported, example))
    atomic_write_files(root / FOLDER, [f"{name}.onnx.data", f"{name}.onnx"], lambda tmp: _save_proto(proto, tmp, name))
    return f"{name}.onnx"


def symbolic_dims(exported, example):
    """`example`'s structure with {dim: Dim.DYNAMIC} for each dim but the last that is symbolic in
    `exported`: batch and sequence. The last dim of a stage input is a feature size (hidden, head
    dim), fixed by the weights; torch.export leaves some of them symbolic, which the ONNX exporter's
    second trace then refuses as a conflict."""
    user = exported.graph_signature.user_inputs
    vals = [n.meta["val"] for n in exported.graph.nodes if n.op == "placeholder" and n.name in user]
    leaves, spec = torch.utils._pytree.tree_flatten(example)
    if len(vals) != len(leaves):
        raise ExportError(f"the stage program takes {len(vals)} tensors, its example holds {len(leaves)}")
    dims = [{i: torch.export.Dim.DYNAMIC for i, d in enumerate(v.shape[:-1]) if not isinstance(d, int)} or None
            for v in vals]
    return torch.utils._pytree.tree_unflatten(dims, spec)


def write_float(root: pathlib.Path, name: str, module: nn.Module, example: tuple, varargs: bool = False) -> str:
    """A float module (the prologue, a head module left float) through torch.onnx's exporter, every
    dim dynamic but those its code fixes. `varargs`: forward(*args) (one argument holding them all)."""
    shapes = dynamic_shapes_for(example)
    try:
        program = torch.onnx.export(module, example, dynamo=True, opset_version=OPSET,
                                    dynamic_shapes=(shapes,) if varargs else shapes, optimize=True, verbose=False)
    except Exception as e:
        raise ExportError(f"torch.onnx.export of the float part {name!r} failed: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e

    def save(tmp: pathlib.Path) -> None:
        program.save(str(tmp / f"{name}.onnx"), external_data=True)  # writes <name>.onnx.data beside it

    atomic_write_files(root / FOLDER, [f"{name}.onnx.data", f"{name}.onnx"], save)
    return f"{name}.onnx"


class _Record(nn.Module):
    """Stands for a block: block 0 records its arguments; every block passes the hidden states on."""

    def __init__(self, signature: inspect.Signature, store: list | None):
        super().__init__()
        self.signature, self.store = signature, store

    def forward(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs).arguments
        if self.store is not None:
            self.store.append(flat_arguments(self.signature, bound))
        return args[0] if args else bound[next(iter(self.signature.parameters))]


class _PassThrough(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x


class Prologue(nn.Module):
    """input_ids -> (hidden states, *block 0's other tensor arguments, flattened), in the order a
    block stage takes them: the model run with its blocks and head passed through."""

    def __init__(self, model: nn.Module, blocks: list[str], head: list[str], hidden_name: str,
                 tensor_names: list[str], constants: dict):
        super().__init__()
        self.model, self.hidden_name, self.tensor_names, self.constants = model, hidden_name, tensor_names, constants
        self.store: list = []
        sig = inspect.signature(model.get_submodule(blocks[0]).forward)
        for i, b in enumerate(blocks):
            set_submodule(model, b, _Record(sig, self.store if i == 0 else None))
        for h in head:
            set_submodule(model, h, _PassThrough())

    def forward(self, *args):
        self.store.clear()
        self.model(*args, **self.constants)
        got = self.store.pop()  # the module keeps no tensor of the trace (torch.export warns about such)
        out = [got[self.hidden_name]]
        for name in self.tensor_names:
            v = got[name]
            out.extend(v if isinstance(v, (tuple, list)) else [v])
        return tuple(out)


def write_prologue(root: pathlib.Path, model: nn.Module, blocks: list[str], head: list[str], weights,
                   inputs, batch) -> str:
    """Export the float prologue; its outputs on `batch` must be the block inputs the run used."""
    work = meta_copy(model)
    args, kwargs = model_call(work, batch, 0)
    if not all(isinstance(a, torch.Tensor) for a in args) or \
            any(isinstance(v, (torch.Tensor, tuple, list, dict)) for v in kwargs.values()):
        raise ExportError("quantize_sequential's ONNX output takes models called with positional tensors "
                          "(token ids); pass onnx=False, or calibration batches of token-id tensors")
    prologue = Prologue(work, blocks, head, inputs.hidden_name, inputs.tensor_names, kwargs)
    handles = lazy_weights(work, blocks + head, weights)
    example = tuple(args)
    try:
        with torch.no_grad():
            got = prologue(*example)  # loads the weights it reads (the embedding), once
    finally:
        for h in handles:
            h.remove()
    expected = [inputs.hidden[0]] + [t for v in inputs.tensors[0] for t in (v if isinstance(v, tuple) else (v,))]
    if len(got) != len(expected) or not all(torch.equal(a, b) for a, b in zip(got, expected)):
        raise ExportError("the prologue exported for ONNX does not reproduce block 0's inputs; "
                          "quantize_sequential's ONNX output supports models whose blocks take the same "
                          "arguments as when the model runs whole")
    return write_float(root, PROLOGUE, prologue.eval(), example, varargs=True)


def assemble(root: pathlib.Path, parts: list[tuple[str, str]], n_shared: int) -> str:
    """Chain the parts into `model.onnx` (graph only, its tensors stay in the parts' data files).

    parts: (file, role) in order: ("prologue.onnx", "prologue"), then ("<stage>.onnx", "block")
    for each block (inputs: hidden states + the `n_shared` prologue outputs after it), then
    ("<module>.onnx", "head") (input: hidden states). Each part's names get the part's prefix;
    its inputs are wired with Identity nodes to the values that feed them."""
    import onnx
    from onnx import compose, helper

    folder = root / FOLDER
    graph = helper.make_graph([], "qcompile_sequential", [], [])
    opsets: dict[str, int] = {}
    ir_version = 0
    hidden = shared = None
    for i, (file, role) in enumerate(parts):
        m = onnx.load(str(folder / file), load_external_data=False)
        if m.functions:
            raise ExportError(f"{file} holds ONNX local functions; assembling them is not supported")
        prefix = f"p{i}_{file[:-len('.onnx')].replace('.', '_')}/"
        compose.add_prefix(m, prefix, inplace=True)
        for op in m.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
        ir_version = max(ir_version, m.ir_version)
        g = m.graph
        if role == PROLOGUE:
            if len(g.input) != 1:
                raise ExportError(f"the prologue takes {len(g.input)} inputs; model.onnx supports token ids only")
            graph.input.append(helper.make_value_info("input_ids", g.input[0].type))
            sources = ["input_ids"]
        elif role == "block":
            sources = [hidden] + shared
        else:
            sources = [hidden]
        if len(sources) != len(g.input):
            raise ExportError(f"{file} takes {len(g.input)} inputs, the chain gives it {len(sources)}")
        for src, inp in zip(sources, g.input):
            graph.node.append(helper.make_node("Identity", [src], [inp.name], name=f"{inp.name}_wire"))
        graph.node.extend(g.node)
        graph.initializer.extend(g.initializer)
        graph.value_info.extend(g.value_info)
        outputs = [o.name for o in g.output]
        if role == PROLOGUE:
            if len(outputs) != 1 + n_shared:
                raise ExportError(f"the prologue gives {len(outputs)} outputs, the blocks take {1 + n_shared}")
            hidden, shared = outputs[0], outputs[1:]
        else:
            hidden = outputs[0]
        last_type = g.output[0].type
    graph.node.append(helper.make_node("Identity", [hidden], ["logits"], name="logits_out"))
    graph.output.append(helper.make_value_info("logits", last_type))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="qcompile")
    model.ir_version = ir_version
    atomic_write_files(folder, [MODEL], lambda tmp: onnx.save_model(model, str(tmp / MODEL)))
    onnx.checker.check_model(str(folder / MODEL))  # by path: external data is checked where it lies
    return MODEL
