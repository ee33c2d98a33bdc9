"""A zoo of architectures nobody here wrote (timm CNNs and ViTs, transformers tiny configs), with
random weights, and the stages every one of them must pass.

Each entry builds `(model, example, calibration batches, evaluation batches)` under a fixed seed:
small images (64 x 64, 32 x 32 where the model allows) and tiny transformer configs (2 layers,
hidden 64), so that the whole zoo runs in minutes on 2 cores. BatchNorm statistics are warmed on
random batches in train mode (cumulative averages), as a trained network's would be set, so that
activations are normalized and the random networks are not degenerate.

`run_model(entry, ...)` runs the stages (`w8a8` prepare -> calibrate -> convert, the reference
graph's cosine to FP32, `export_onnx` in onnxruntime, `qc.lower(backend="torch")`, `w8a8-dynamic`,
`w4a16`) and records for each either "ok" or the error. A QCompileError is an expected, explained
failure; any other exception is a defect of qcompile and is recorded as such (`raw=True`).

timm imports torchvision at import time (transforms, FrozenBatchNorm2d), and no torchvision build
fits this torch; the model code used here never calls it. `import_timm` installs a stand-in
`torchvision` module while timm imports, only when the real one is missing, whose names exist but
refuse to be used; it is removed again, so no other library sees a torchvision.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

# --------------------------------------------------------------------------------------------------
# timm without torchvision
# --------------------------------------------------------------------------------------------------


class _StandInMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stand_in(f"{cls.__name__}.{name}")


def _stand_in(name: str) -> type:
    def refuse(self, *args, **kwargs):
        raise ImportError(f"torchvision is not installed: {name} is a stand-in that only lets timm import")
    return _StandInMeta(name, (), {"__init__": refuse})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _stand_in(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def import_timm():
    """timm, importable where torchvision is not (see the module docstring); None without timm."""
    if importlib.util.find_spec("timm") is None:
        return None
    if "timm" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        import timm

        return timm
    # only while timm imports: left installed, it would make other libraries (transformers checks
    # find_spec("torchvision")) believe torchvision is there; timm keeps the names it bound
    finder = _TorchvisionStandIn()
    sys.meta_path.append(finder)
    try:
        import timm
    finally:
        sys.meta_path.remove(finder)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    return timm


# --------------------------------------------------------------------------------------------------
# the models
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZooEntry:
    name: str
    source: str                   # "timm" | "transformers"
    kind: str                     # "cnn" | "vit" | "text" | "audio"
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator, int], Any]   # (generator, batch) -> example inputs
    image: int = 64


def _warm_batch_norm(model: nn.Module, inputs, gen: torch.Generator, batches: int = 4, batch: int = 8) -> None:
    """Running statistics as the cumulative average of a few random batches (momentum=None)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            x = inputs(gen, batch)
            model(*x) if isinstance(x, tuple) else model(**x) if isinstance(x, dict) else model(x)
    model.eval()


class LastHidden(nn.Module):
    """A transformers model as a tensor function: its last hidden state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None):
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        if getattr(getattr(self.model, "config", None), "use_cache", None) is not None:
            kwargs["use_cache"] = False   # decoders would return a KV cache object
        return self.model(input_ids=input_ids, **kwargs).last_hidden_state


class Features(nn.Module):
    """A transformers vision/audio model as a tensor function of its pixel/feature input."""

    def __init__(self, model: nn.Module, key: str, out: str = "last_hidden_state"):
        super().__init__()
        self.model, self.key, self.out = model, key, out

    def forward(self, x):
        return getattr(self.model(**{self.key: x}), self.out)


VOCAB, SEQ = 128, 16


def _text(gen, batch):
    ids = torch.randint(3, VOCAB, (batch, SEQ), generator=gen)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[batch // 2:, SEQ - 4:] = 0   # some padding, so the mask path is real
    return {"input_ids": ids, "attention_mask": mask}


def _ids_only(gen, batch):
    return {"input_ids": torch.randint(3, VOCAB, (batch, SEQ), generator=gen)}


def _image(size: int, channels: int = 3):
    return lambda gen, batch: torch.randn(batch, channels, size, size, generator=gen)


def _timm(name: str, **kwargs):
    def build():
        timm = import_timm()
        return timm.create_model(name, pretrained=False, num_classes=32, **kwargs)
    return build


def _hf(config_cls: str, model_cls: str, wrap=LastHidden, **config):
    def build():
        import transformers

        cfg = getattr(transformers, config_cls)(**config)
        model = getattr(transformers, model_cls)(cfg)
        return wrap(model)
    return build


_TEXT = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64)
_DECODER = dict(_TEXT, num_key_value_heads=2)


def _whisper():
    import transformers

    cfg = transformers.WhisperConfig(vocab_size=VOCAB, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                     decoder_ffn_dim=128, max_source_positions=32, max_target_positions=16,
                                     pad_token_id=1, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return Features(transformers.WhisperModel(cfg).get_encoder(), "input_features")


def _wav2vec2():
    import transformers

    cfg = transformers.Wav2Vec2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                                      do_stable_layer_norm=False, feat_extract_norm="group")
    return Features(transformers.Wav2Vec2Model(cfg), "input_values")


def _t5_encoder():
    import transformers

    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                feed_forward_proj="gated-gelu")
    return LastHidden(transformers.T5EncoderModel(cfg))


def _mobilebert():
    import transformers

    cfg = transformers.MobileBertConfig(vocab_size=VOCAB, hidden_size=64, embedding_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64, intra_bottleneck_size=32,
                                        true_hidden_size=32, num_feedforward_networks=2, max_position_embeddings=64)
    return LastHidden(transformers.MobileBertModel(cfg, add_pooling_layer=False))


ZOO: tuple[ZooEntry, ...] = (
    # timm CNNs (BatchNorm warmed on random batches)
    ZooEntry("resnet18", "timm", "cnn", _timm("resnet18"), _image(64)),
    ZooEntry("resnet50", "timm", "cnn", _timm("resnet50"), _image(64)),
    ZooEntry("mobilenetv2_100", "timm", "cnn", _timm("mobilenetv2_100"), _image(64)),
    ZooEntry("mobilenetv3_small_100", "timm", "cnn", _timm("mobilenetv3_small_100"), _image(64)),
    ZooEntry("efficientnet_b0", "timm", "cnn", _timm("efficientnet_b0"), _image(64)),
    ZooEntry("convnext_atto", "timm", "cnn", _timm("convnext_atto"), _image(64)),
    ZooEntry("regnetx_002", "timm", "cnn", _timm("regnetx_002"), _image(64)),
    ZooEntry("densenet121", "timm", "cnn", _timm("densenet121"), _image(64)),
    ZooEntry("repvgg_a0", "timm", "cnn", _timm("repvgg_a0"), _image(64)),
    ZooEntry("ghostnet_100", "timm", "cnn", _timm("ghostnet_100"), _image(64)),
    ZooEntry("mobilevit_xxs", "timm", "cnn", _timm("mobilevit_xxs"), _image(64)),
    ZooEntry("vit_tiny_patch16", "timm", "vit", _timm("vit_tiny_patch16_224", img_size=64, depth=2), _image(64)),
    ZooEntry("deit_tiny_patch16", "timm", "vit", _timm("deit_tiny_patch16_224", img_size=64, depth=2), _image(64)),
    # transformers, tiny random configs
    ZooEntry("bert", "transformers", "text", _hf("BertConfig", "BertModel", **_TEXT), _text),
    ZooEntry("distilbert", "transformers", "text",
             _hf("DistilBertConfig", "DistilBertModel", vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4,
                 hidden_dim=128, max_position_embeddings=64), _text),
    ZooEntry("roberta", "transformers", "text", _hf("RobertaConfig", "RobertaModel", **_TEXT), _text),
    ZooEntry("albert", "transformers", "text",
             _hf("AlbertConfig", "AlbertModel", embedding_size=32, **_TEXT), _text),
    ZooEntry("electra", "transformers", "text", _hf("ElectraConfig", "ElectraModel", embedding_size=32, **_TEXT), _text),
    ZooEntry("deberta-v2", "transformers", "text", _hf("DebertaV2Config", "DebertaV2Model", **_TEXT), _text),
    ZooEntry("gpt2", "transformers", "text",
             _hf("GPT2Config", "GPT2Model", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64), _text),
    ZooEntry("llama", "transformers", "text", _hf("LlamaConfig", "LlamaModel", **_DECODER), _text),
    ZooEntry("mistral", "transformers", "text", _hf("MistralConfig", "MistralModel", **_DECODER), _text),
    ZooEntry("qwen2", "transformers", "text", _hf("Qwen2Config", "Qwen2Model", **_DECODER), _text),
    ZooEntry("phi", "transformers", "text", _hf("PhiConfig", "PhiModel", **_DECODER), _text),
    ZooEntry("t5-encoder", "transformers", "text", _t5_encoder, _text),
    ZooEntry("vit", "transformers", "vit",
             _hf("ViTConfig", "ViTModel", wrap=lambda m: Features(m, "pixel_values"), image_size=32, patch_size=8,
                 hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128), _image(32)),
    ZooEntry("whisper-encoder", "transformers", "audio", _whisper, lambda gen, b: torch.randn(b, 16, 64, generator=gen)),
    ZooEntry("mobilebert", "transformers", "text", _mobilebert, _text),
    ZooEntry("convnext", "transformers", "cnn",
             _hf("ConvNextConfig", "ConvNextModel", wrap=lambda m: Features(m, "pixel_values", "pooler_output"),
                 hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1]), _image(64)),
    ZooEntry("wav2vec2", "transformers", "audio", _wav2vec2, lambda gen, b: torch.randn(b, 800, generator=gen)),
)


def zoo_entry(name: str) -> ZooEntry:
    for e in ZOO:
        if e.name == name:
            return e
    raise KeyError(f"no zoo model {name!r}; known: {', '.join(e.name for e in ZOO)}")


def build(entry: ZooEntry, seed: int = 0, calib: int = 4, evaluate: int = 2, batch: int = 4):
    """(model in eval mode, example inputs, calibration batches, evaluation batches), all seeded."""
    torch.manual_seed(seed)
    model = entry.build()
    gen = torch.Generator().manual_seed(seed + 1)
    _warm_batch_norm(model, entry.inputs, gen)
    model.eval()
    gen = torch.Generator().manual_seed(seed + 2)
    calibration = [entry.inputs(gen, batch) for _ in range(calib)]
    evaluation = [entry.inputs(gen, batch) for _ in range(evaluate)]
    return model, calibration[0], calibration, evaluation


# --------------------------------------------------------------------------------------------------
# the stages
# --------------------------------------------------------------------------------------------------

STAGES = ("w8a8", "cosine", "onnx", "lower", "w8a8-dynamic", "w4a16")
MIN_COSINE = 0.99


@dataclass
class StageResult:
    ok: bool
    error: str = ""
    raw: bool = False     # the failure was not a QCompileError: a defect
    seconds: float = 0.0


@dataclass
class ZooRow:
    name: str
    stages: dict = field(default_factory=dict)          # stage -> StageResult
    cosine: float = float("nan")                        # w8a8 reference graph vs FP32
    onnx_cosine: float = float("nan")                   # onnxruntime vs the reference graph
    lower_cosine: float = float("nan")                  # qc.lower(backend="torch") vs the reference graph
    weights: tuple = (0, 0)                             # (quantized, all GEMM/conv weights)
    float_weights: list = field(default_factory=list)   # (tensor, op, reason) kept in float
    ort_ops: dict = field(default_factory=dict)         # integer / float op counts of the optimized model

    def passed(self, stage: str) -> bool:
        r = self.stages.get(stage)
        return r is not None and r.ok


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


def _flat(out) -> torch.Tensor:
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return torch.cat([t.reshape(t.shape[0], -1) for t in leaves], dim=1)


def cosine(a, b) -> float:
    """Mean over samples of the cosine between flattened outputs."""
    a, b = _flat(a).double(), _flat(b).double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


def mean_cosine(f, g, batches) -> float:
    with torch.no_grad():
        return sum(cosine(_call(f, x), _call(g, x)) for x in batches) / len(batches)


class CheckFailed(Exception):
    """A stage ran but missed its bar (cosine, weights left float): a measured result, not a crash."""


def _stage(row: ZooRow, name: str, fn):
    from ..errors import QCompileError

    start = time.perf_counter()
    try:
        value = fn()
        row.stages[name] = StageResult(True, seconds=time.perf_counter() - start)
        return value
    except (QCompileError, CheckFailed) as e:
        row.stages[name] = StageResult(False, f"{type(e).__name__}: {e}", seconds=time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - recorded as a defect, never hidden
        row.stages[name] = StageResult(False, f"{type(e).__name__}: {e}", raw=True,
                                       seconds=time.perf_counter() - start)
    return None


def ort_inputs(session, batch) -> dict:
    names = [i.name for i in session.get_inputs()]
    if isinstance(batch, dict):
        return {k: v.numpy() for k, v in batch.items() if k in names}
    batch = batch if isinstance(batch, tuple) else (batch,)
    return {n: t.numpy() for n, t in zip(names, batch)}


def run_model(entry: ZooEntry, workdir, stages=STAGES, *, seed: int = 0, target: str | None = "ort-cpu",
              calib: int = 4, evaluate: int = 2, batch: int = 4) -> ZooRow:
    """Every stage on one zoo model; see the module docstring. `target`: the w8a8 prepare target."""
    import os

    import qcompile as qc
    from ..graph.weights import weight_coverage

    row = ZooRow(entry.name)
    model, example, calibration, evaluation = build(entry, seed, calib=calib, evaluate=evaluate, batch=batch)
    quantized = None
    if "w8a8" in stages:
        def w8a8():
            prepared = qc.prepare(model, example, "w8a8", target=target)
            qc.calibrate(prepared, calibration, progress=False)
            return qc.convert(prepared)
        quantized = _stage(row, "w8a8", w8a8)
    if quantized is not None:
        coverage = weight_coverage(quantized)
        row.weights = (coverage.quantized, coverage.total)
        row.float_weights = coverage.float_rows
        row.cosine = mean_cosine(model, quantized, evaluation)

        def check_cosine():
            if coverage.quantized < coverage.total:
                raise CheckFailed(f"{coverage.total - coverage.quantized} GEMM/conv weights stay float")
            if not row.cosine >= MIN_COSINE:
                raise CheckFailed(f"cosine {row.cosine:.4f} < {MIN_COSINE}")
        if "cosine" in stages:
            _stage(row, "cosine", check_cosine)
        if "onnx" in stages:
            path = os.path.join(workdir, f"{entry.name}.onnx")

            def onnx_stage():
                qc.export_onnx(quantized, path)
                session = ort_session(path)
                row.onnx_cosine = sum(cosine(quantized_out(quantized, x),
                                             [torch.from_numpy(o) for o in session.run(None, ort_inputs(session, x))])
                                      for x in evaluation) / len(evaluation)
                row.ort_ops = ort_integer_counts(path, workdir)
            _stage(row, "onnx", onnx_stage)
        if "lower" in stages:
            def lower_stage():
                # recorded, not a pass bar: integer kernels round ties differently and random deep
                # CNNs amplify single-code flips (onnxruntime drifts as much), see the README
                low = qc.lower(quantized, backend="torch")
                row.lower_cosine = mean_cosine(quantized, low, evaluation)
                if not row.lower_cosine == row.lower_cosine:
                    raise CheckFailed("the lowered module returns NaN")
            _stage(row, "lower", lower_stage)
    for recipe in ("w8a8-dynamic", "w4a16"):
        if recipe not in stages:
            continue

        def other(recipe=recipe):
            prepared = qc.prepare(model, example, recipe)
            if recipe == "w8a8-dynamic" or prepared.meta["qcompile"].observers:
                qc.calibrate(prepared, calibration[:1], progress=False)
            q = qc.convert(prepared)
            qc.lower(q, backend="torch")(**example) if isinstance(example, dict) else qc.lower(q, backend="torch")(example)
            return mean_cosine(model, q, evaluation)
        value = _stage(row, recipe, other)
        if value is not None:
            row.stages[recipe].error = f"cosine {value:.4f}"
    return row


def quantized_out(quantized, batch):
    with torch.no_grad():
        return _call(quantized, batch)


def ort_session(path, *, optimized_path=None, level=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if level is not None:
        so.graph_optimization_level = level
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


INTEGER_CONV_OPS = ("QLinearConv",)
FLOAT_CONV_OPS = ("Conv", "FusedConv", "NhwcFusedConv")


def ort_integer_counts(path, workdir) -> dict:
    """Op counts of onnxruntime's optimized model (ORT_ENABLE_EXTENDED: the QDQ fusions, no
    CPU-specific layouts), for convs and adds: integer and float."""
    import os
    from collections import Counter

    import onnx
    import onnxruntime as ort

    out = os.path.join(workdir, os.path.basename(str(path)) + ".ort.onnx")
    ort_session(path, optimized_path=out, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    counts = Counter(n.op_type for n in onnx.load(out).graph.node)
    return dict(counts)
