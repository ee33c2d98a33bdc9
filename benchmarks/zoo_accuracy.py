"""Why a zoo model misses the w8a8 cosine bar: the quantizer, or the random network it is given?

    python benchmarks/zoo_accuracy.py [--models mobilenetv2_100,efficientnet_b0] [--ablate]

Per model (qcompile.testing.zoo: random weights, BatchNorm warmed on random batches; the same
calibration and evaluation batches as the zoo table), mean cosine to FP32 of:
- `w8a8` with target="ort-cpu" (the zoo table's figure) and without a target (no QuantizeLinear
  after the convs that onnxruntime needs to run them in integer), with the activation quantizer
  count of each;
- `w8a8` with the activation range from min-max or the 99.99th percentile instead of MSE;
- `w8a16` (per-channel INT8 weights, float activations);
- two noise floors of the FP32 network itself, no quantizer involved: its weights rounded to
  BF16, and its input given uniform noise of one uint8 step of the input's range. A network that
  loses the bar on the input's own 8-bit rounding cannot keep it through 8-bit activations;
- `--ablate`: each activation quantizer of the ort-cpu graph left out in turn (the graph reads the
  float value there): the largest single gain. Small gains everywhere mean the error is the sum of
  many quantizers' noise, not one bad range.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import qcompile as qc  # noqa: E402
from qcompile.spec import get_recipe  # noqa: E402
from qcompile.testing import zoo  # noqa: E402

qops = torch.ops.qcompile
CNNS = ("mobilenetv2_100", "mobilenetv3_small_100", "efficientnet_b0", "densenet121", "repvgg_a0", "ghostnet_100",
        "mobilevit_xxs", "resnet18")


def activation_quantizers(quantized) -> list:
    return [n for n in quantized.graph.nodes if n.target == qops.quantize.default and n.args[0].op != "get_attr"]


def quantized(model, example, calibration, recipe, target):
    prepared = qc.prepare(model, example, recipe, target=target)
    qc.calibrate(prepared, calibration, progress=False)
    return qc.convert(prepared)


def without(quantized_gm, name: str):
    """The graph with the activation quantizer `name` bypassed: its dequantizes read the float input."""
    gm = copy.deepcopy(quantized_gm)
    node = next(n for n in gm.graph.nodes if n.name == name)
    for user in list(node.users):
        if user.target == qops.dequantize.default:
            user.replace_all_uses_with(node.args[0])
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def floors(model, evaluation) -> dict:
    bf16 = copy.deepcopy(model)
    with torch.no_grad():
        for m in bf16.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.copy_(m.weight.bfloat16().float())
    gen = torch.Generator().manual_seed(11)
    noisy = []
    with torch.no_grad():
        for x in evaluation:
            step = (x.max() - x.min()) / 255
            x_noisy = x + (torch.rand(x.shape, generator=gen) - 0.5) * step
            noisy.append(zoo.cosine(zoo._flat(zoo._call(model, x)), zoo._flat(zoo._call(model, x_noisy))))
    return {"bf16_weights": zoo.mean_cosine(model, bf16, evaluation), "uint8_input_noise": sum(noisy) / len(noisy)}


def one(name: str, ablate: bool) -> dict:
    entry = zoo.zoo_entry(name)
    model, example, calibration, evaluation = zoo.build(entry)
    row = {"name": name}
    base = get_recipe("w8a8")
    for label, recipe, target in (("w8a8 ort-cpu", base, "ort-cpu"), ("w8a8 no target", base, None),
                                  ("minmax", dataclasses.replace(base, name="w8a8-minmax", activation=dataclasses.replace(
                                      base.activation, observer="minmax")), "ort-cpu"),
                                  ("percentile", dataclasses.replace(base, name="w8a8-pct", activation=dataclasses.replace(
                                      base.activation, observer="percentile")), "ort-cpu"),
                                  ("w8a16", "w8a16", None)):
        q = quantized(model, example, calibration, recipe, target)
        row[label] = zoo.mean_cosine(model, q, evaluation)
        row[f"{label} quantizers"] = len(activation_quantizers(q))
        if label == "w8a8 ort-cpu" and ablate:
            gains = {n.name: zoo.mean_cosine(model, without(q, n.name), evaluation) - row[label]
                     for n in activation_quantizers(q)}
            best = max(gains, key=gains.get)
            row["best single gain"] = gains[best]
            row["gains > 0.005"] = sum(g > 0.005 for g in gains.values())
    row.update(floors(model, evaluation))
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(CNNS))
    ap.add_argument("--ablate", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}")
    rows = []
    for name in args.models.split(","):
        rows.append(one(name, args.ablate))
        print(json.dumps(rows[-1]), flush=True)
    cols = ["w8a8 ort-cpu", "w8a8 no target", "minmax", "percentile", "w8a16", "bf16_weights", "uint8_input_noise"]
    cols += ["best single gain"] if args.ablate else []
    print("\n| model | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
    for r in rows:
        cells = [f"{r[c]:.4f}" + (f" ({r[c + ' quantizers']})" if c + " quantizers" in r and c.startswith("w8a8") else "")
                 for c in cols]
        print(f"| {r['name']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
