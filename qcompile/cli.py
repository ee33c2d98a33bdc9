"""The `qcompile` command: quantize a model from the shell, look inside a result, run a demo.

Bad input ends with exit status 2 and one line on stderr, `qcompile: error: <what and what to do>`;
tracebacks are for qcompile's own bugs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections import Counter
from pathlib import Path

EPILOG = """\
examples:
  qcompile demo --report demo.html
      train the small digits CNN (a few seconds), quantize it to INT8 and show what changed
  qcompile quantize mypkg.models:make_model --calib mypkg.data:calibration_batches \\
      --recipe w8a8 --onnx model.onnx --report report.html
      MODULE:FACTORY names a function returning an nn.Module, or (module, example_inputs);
      --calib MODULE:FUNCTION names a function returning an iterable of input batches
      (a tensor, a tuple of arguments, or a dict of keyword arguments per batch)
  qcompile quantize mypkg.models:make_model --calib mypkg.data:batches --auto-bits 5 \\
      --candidates w4a16,w8a16 --save-recipe auto.json
      choose a recipe per layer from measured sensitivity at 5 average weight bits
  qcompile gguf mypkg.models:load_llama model.gguf --tokenizer path/to/hf_folder \
      --recipe gguf-q4_0 --algorithm gptq --calib mypkg.data:token_batches
      quantize a transformers LLaMA into llama.cpp's Q4_0 with GPTQ's codes and write a GGUF file
      (--recipe f32 / f16 writes the float model; RTN recipes need no --calib)
  qcompile inspect model.onnx          quantized tensors, formats and op counts of an ONNX file
  qcompile inspect dumps/              the passes of a dump directory (prepare(..., dump_dir=...))
"""


class UsageError(Exception):
    """Bad command-line input: reported as one line."""


def _load(spec: str, what: str):
    if ":" not in spec:
        raise UsageError(f"{what} must look like module.path:function, got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # let `qcompile quantize mymodels:build` find ./mymodels.py
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"cannot import {mod_name!r} for {what} ({e}); run from the folder that holds it "
                         "or install it") from None
    try:
        fn = getattr(module, attr)
    except AttributeError:
        raise UsageError(f"module {mod_name!r} has no {attr!r} (for {what})") from None
    if not callable(fn):
        raise UsageError(f"{spec} is not callable; {what} names a function")
    return fn


def _recipe(text: str):
    from .spec import Recipe, get_recipe

    if text.endswith(".json"):
        path = Path(text)
        if not path.is_file():
            raise UsageError(f"recipe file {text!r} does not exist")
        return Recipe.from_json(path.read_text())
    return get_recipe(text)


def cmd_quantize(args) -> int:
    import torch
    from torch import nn

    from . import api
    from .debug.compare import compare
    from .debug.report import report
    from .debug.sensitivity import auto_recipe, sensitivity

    made = _load(args.model, "the model factory")()
    model, example = (made if isinstance(made, tuple) and len(made) == 2 else (made, None))
    if not isinstance(model, nn.Module):
        raise UsageError(f"{args.model} returned {type(model).__name__}; it must return an nn.Module or "
                         "(module, example_inputs)")
    model.eval()
    if args.calib:
        batches = list(_load(args.calib, "--calib")())
        if not batches:
            raise UsageError(f"{args.calib} returned no batches")
    elif example is not None:
        batches = [example]
        print("qcompile: no --calib given: calibrating on the example inputs alone (give real data with --calib)")
    else:
        raise UsageError("give calibration data with --calib module:function, or make the factory return "
                         "(module, example_inputs)")
    example = batches[0] if example is None else example
    sens = None
    if args.auto_bits is not None:
        candidates = [None if c in ("float", "none") else c for c in args.candidates.split(",")]
        sens = sensitivity(model, batches, candidates, progress=True)
        recipe = auto_recipe(model, batches, budget_bits=args.auto_bits, candidates=candidates, report=sens)
        print(sens)
    else:
        recipe = _recipe(args.recipe)
    if args.save_recipe:
        Path(args.save_recipe).write_text(recipe.to_json())
        print(f"recipe written to {args.save_recipe}")
    prepared = api.prepare(model, example, recipe)
    if prepared.meta["qcompile"].observers or recipe.algorithms:
        api.calibrate(prepared, batches, progress=True)
    quantized = api.convert(prepared)
    from .debug.inspect import inspect

    print(inspect(quantized))
    cmp = None
    if args.report or args.compare:
        cmp = compare(prepared, quantized, batches[: args.compare_batches])
        print(cmp)
    if args.onnx:
        from .backends.onnx import export_onnx

        export_onnx(quantized, args.onnx, example)
        print(f"ONNX written to {args.onnx}")
    if args.report:
        report(quantized, compare=cmp, sensitivity=sens, title=f"qcompile: {args.model}").to_html(args.report)
        print(f"report written to {args.report}")
    return 0


def _tokenizer(spec: str):
    if os.path.isdir(spec):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(spec)
    return _load(spec, "--tokenizer")()


def cmd_gguf(args) -> int:
    import torch
    from torch import nn

    from . import api
    from .backends.gguf import export_gguf
    from .llm import is_causal_lm
    from .llm.logits import CausalLMLogits

    made = _load(args.model, "the model factory")()
    model = made[0] if isinstance(made, tuple) else made
    if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
        raise UsageError(f"{args.model} must return a transformers causal LM (an nn.Module with a .config)")
    model.eval()
    tokenizer = _tokenizer(args.tokenizer)
    if args.recipe in ("f32", "f16"):
        if args.algorithm or args.calib:
            raise UsageError(f"--recipe {args.recipe} writes the float model; --algorithm / --calib do not apply")
        path = export_gguf(model, args.out, tokenizer=tokenizer, float_type=args.recipe, pre=args.pre)
        print(f"GGUF ({args.recipe}) written to {path}")
        return 0
    batches = list(_load(args.calib, "--calib")()) if args.calib else []
    if args.algorithm and not batches:
        raise UsageError(f"--algorithm {','.join(args.algorithm)} needs calibration token batches: --calib MODULE:FUNCTION")
    example = batches[0] if batches else torch.zeros(1, 8, dtype=torch.long)
    # AWQ may only scale groups whose 1/s a norm or linear absorbs: a GGUF file has no place for a multiply
    algorithms = [{"name": "awq", "fold_only": True} if a == "awq" else a for a in args.algorithm or ()]
    # a transformers causal LM is captured as its KV-cache step graph (llm/capture.py); others through a logits wrapper
    captured = model if is_causal_lm(model) else CausalLMLogits(model)
    prepared = api.prepare(captured, (example,), _recipe(args.recipe), algorithms=algorithms or None)
    if batches:
        api.calibrate(prepared, batches, progress=True)
    path = export_gguf(api.convert(prepared), args.out, tokenizer=tokenizer, pre=args.pre)
    print(f"GGUF ({args.recipe}{' + ' + ','.join(args.algorithm) if args.algorithm else ''}) written to {path}")
    return 0


def inspect_onnx(path: Path) -> str:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    ops = Counter(n.op_type for n in g.node)
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    lines = [f"{path}: opset {opsets}, "
             f"{len(g.node)} nodes, {len(inits)} initializers",
             "ops: " + ", ".join(f"{k} x{v}" for k, v in ops.most_common())]
    rows, bits, total = [], 0, 0
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            t = inits[n.input[0]]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type) if t.data_type != onnx.TensorProto.INT4 else None
            name = onnx.TensorProto.DataType.Name(t.data_type)
            numel = 1
            for d in t.dims:
                numel *= d
            b = {"INT4": 4, "UINT4": 4}.get(name, dtype.itemsize * 8 if dtype is not None else 0)
            block = next((a.i for a in n.attribute if a.name == "block_size"), 0)
            scale = inits.get(n.input[1])
            scales = numpy_helper.to_array(scale).size if scale is not None else 0
            rows.append((t.name, name, "x".join(map(str, t.dims)), str(scales), str(block or "-")))
            if len(t.dims) >= 2:
                bits, total = bits + b * numel, total + numel
    lines.append(f"{len(rows)} quantized initializers" + (f", {bits / total:.3f} average bits over the "
                                                           f"{total} weight elements" if total else ""))
    if rows:
        head = ("initializer", "dtype", "shape", "scales", "block")
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def inspect_dump(path: Path) -> str:
    graphs = sorted(path.glob("*.txt"))
    if not graphs:
        raise UsageError(f"{path} holds no NNN_<pass>.txt graph dumps; make some with "
                         "qc.prepare(..., dump_dir=...) or QCOMPILE_DUMP_DIR")
    lines = [f"{path}: {len(graphs)} graph dumps"]
    for g in graphs:
        diff = g.with_suffix(".diff")
        changed = (sum(1 for ln in diff.read_text().splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---"))
                   if diff.exists() else 0)
        lines.append(f"  {g.name:<40} {len(g.read_text().splitlines()):>6} lines"
                     + (f", {changed} lines changed" if diff.exists() else ", no code change"))
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    path = Path(args.path)
    if path.is_dir():
        print(inspect_dump(path))
    elif path.is_file() and path.suffix == ".onnx":
        try:
            print(inspect_onnx(path))
        except Exception as e:  # a truncated or foreign file
            raise UsageError(f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e)[:120]})") from None
    elif path.exists():
        raise UsageError(f"{path} is neither an .onnx file nor a dump directory")
    else:
        raise UsageError(f"{path} does not exist")
    return 0


def cmd_demo(args) -> int:
    import torch

    from . import api
    from .debug.compare import compare
    from .debug.report import report
    from .testing.models import accuracy, train_digits_cnn

    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise UsageError("the demo needs scikit-learn for its data: pip install scikit-learn==1.9.1") from None
    torch.manual_seed(0)
    print("training the digits CNN in FP32 ...")
    model, (x_train, _, x_test, y_test) = train_digits_cnn(epochs=args.epochs)
    calib = [(x_train[i:i + 64],) for i in range(0, 512, 64)]
    prepared = api.prepare(model, calib[0], args.recipe)
    api.calibrate(prepared, calib, progress=True)
    quantized = api.convert(prepared)
    fp32, q = accuracy(model, x_test, y_test, 64), accuracy(quantized, x_test, y_test, 64)
    cmp = compare(prepared, quantized, calib[:2])
    print(cmp)
    print(f"digits CNN test accuracy: FP32 {fp32:.2f}%, {args.recipe} {q:.2f}%")
    if args.report:
        report(quantized, compare=cmp, title=f"qcompile demo: digits CNN, {args.recipe}").to_html(args.report)
        print(f"report written to {args.report}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcompile", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Quantize PyTorch models with qcompile (torch.export based), "
                                            "inspect the results, or run a small demo.", epilog=EPILOG)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    q = sub.add_parser("quantize", help="prepare, calibrate and convert a model; optionally write ONNX and a report",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    q.add_argument("model", metavar="MODULE:FACTORY", help="function returning an nn.Module or (module, example_inputs)")
    q.add_argument("--recipe", default="w8a8", help="a recipe name (w8a8, w8a8-dynamic, w8a16, w4a16, w4a8, ...) "
                   "or a recipe .json file (default: w8a8)")
    q.add_argument("--calib", metavar="MODULE:FUNCTION", help="function returning an iterable of calibration batches")
    q.add_argument("--onnx", metavar="OUT.onnx", help="write the quantized model as ONNX")
    q.add_argument("--report", metavar="OUT.html", help="write an HTML report (per-node error, pass log, graph)")
    q.add_argument("--compare", action="store_true", help="print the float-vs-quantized table per node")
    q.add_argument("--compare-batches", type=int, default=4, help="batches compare and the report run (default 4)")
    q.add_argument("--auto-bits", type=float, metavar="BITS",
                   help="choose a recipe per layer from sensitivity at this average weight bits (ignores --recipe)")
    q.add_argument("--candidates", default="w4a16,w8a16,float",
                   help="recipes --auto-bits chooses from, comma-separated; 'float' keeps a layer in float")
    q.add_argument("--save-recipe", metavar="OUT.json", help="write the recipe used (e.g. the automatic one)")
    q.set_defaults(run=cmd_quantize)
    g = sub.add_parser("gguf", help="write a transformers LLaMA as a GGUF file for llama.cpp (quantized or float)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    g.add_argument("model", metavar="MODULE:FACTORY", help="function returning a transformers causal LM")
    g.add_argument("out", metavar="OUT.gguf")
    g.add_argument("--tokenizer", required=True, metavar="FOLDER|MODULE:FUNCTION",
                   help="the model's tokenizer: a transformers folder, or a function returning the tokenizer")
    g.add_argument("--recipe", default="gguf-q4_0", help="gguf-q8_0, gguf-q4_0, gguf-q4_1 (and their -weight-only "
                   "forms), a recipe .json, or f32 / f16 for a float file (default: gguf-q4_0)")
    g.add_argument("--algorithm", action="append", choices=["gptq", "awq"],
                   help="PTQ algorithm choosing the codes (repeatable); awq runs with fold_only in GGUF files")
    g.add_argument("--calib", metavar="MODULE:FUNCTION", help="function returning calibration batches of token ids")
    g.add_argument("--pre", help="llama.cpp's pre-tokenizer name when it is not GPT-2's (e.g. smollm, llama-bpe)")
    g.set_defaults(run=cmd_gguf)
    i = sub.add_parser("inspect", help="show what an ONNX file or a pass-dump directory holds")
    i.add_argument("path", metavar="model.onnx|DUMP_DIR")
    i.set_defaults(run=cmd_inspect)
    d = sub.add_parser("demo", help="quantize a small CNN on real data (scikit-learn digits) and report")
    d.add_argument("--recipe", default="w8a8", help="recipe name (default: w8a8)")
    d.add_argument("--epochs", type=int, default=20, help="FP32 training epochs (default 20)")
    d.add_argument("--report", metavar="OUT.html", help="write the HTML report here")
    d.set_defaults(run=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .errors import QCompileError

    try:
        return args.run(args)
    except (UsageError, QCompileError) as e:
        print(f"qcompile: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
