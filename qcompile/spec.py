"""What to quantize and how: granularities, `QuantSpec` (one tensor), `Recipe` (a whole model).

These are plain frozen dataclasses with a JSON form, so a recipe can be read, saved, edited and
passed back to `prepare`. Graph code never builds specs ad hoc: it asks a recipe for them.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
from dataclasses import dataclass
from typing import Any, Union

from .errors import RecipeError

# dtype name -> (qmin, qmax). INT4 values are held one per int8 element in the reference graph;
# packing two per byte is a storage concern (numerics.pack_int4) of the backends and exporters.
INTEGER_RANGES: dict[str, tuple[int, int]] = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int4": (-8, 7),
    "uint4": (0, 15),
    # Low-bit weights for QAT studies; stored as int8 codes, exported as int8 initializers.
    "int3": (-4, 3),
    "int2": (-2, 1),
}
OBSERVERS = ("minmax", "moving_average", "percentile", "mse", "fixed")
# Weight-only codebook dtypes: a code indexes a fixed table of levels (qcompile.algorithms.nf4).
CODEBOOK_DTYPES: dict[str, tuple[int, int]] = {"nf4": (0, 15)}
# 8-bit float codes: x / s cast to the format, saturating at its largest finite value (fp8.py).
# Symmetric only (zero point 0); held as torch.float8_* tensors.
FLOAT8_RANGES: dict[str, tuple[int, int]] = {"fp8_e4m3": (-448, 448)}
_RANGES = {**INTEGER_RANGES, **CODEBOOK_DTYPES, **FLOAT8_RANGES}
# "nearest": round half to even of x / s (ONNX QuantizeLinear). "stochastic": floor(x / s + u), u ~ U[0, 1)
# seeded by `seed` (unbiased; weights only). "half_away" and "half_up": ggml's reference quantizers, which
# multiply by 1/s: roundf(x * (1/s)) for Q8_0, trunc(x * (1/s) + 0.5 - qmin) + qmin for Q4_0 / Q4_1
# (numerics.quantize_math has the exact float steps).
ROUNDINGS = ("nearest", "stochastic", "half_away", "half_up")
# "amax": s = max|x| / qmax. "signed_amax": s = m / qmin with m the (first) element of largest magnitude,
# which gets code qmin: the grid's longer side faces the largest weight (ggml Q4_0's d = m / -8); s < 0 when m > 0.
SCALE_RULES = ("amax", "signed_amax")
# "int": (q - z) * s with an integer z, the range widened to include 0. "float": q * s + m with m the range's
# minimum, an offset that need not be a multiple of s (ggml Q4_1).
ZERO_POINT_DOMAINS = ("int", "float")
SCALE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class PerTensor:
    def to_dict(self) -> dict:
        return {"kind": "per_tensor"}


@dataclass(frozen=True)
class PerChannel:
    axis: int = 0

    def to_dict(self) -> dict:
        return {"kind": "per_channel", "axis": self.axis}


@dataclass(frozen=True)
class PerGroup:
    """Groups of `size` consecutive elements along `axis` (the reduction dim K of a weight)."""

    size: int = 128
    axis: int = -1

    def __post_init__(self):
        if self.size <= 0:
            raise RecipeError(f"PerGroup size must be positive, got {self.size}")

    def to_dict(self) -> dict:
        return {"kind": "per_group", "size": self.size, "axis": self.axis}


@dataclass(frozen=True)
class PerToken:
    """One scale per row of the last dimension: dynamic activation quantization."""

    def to_dict(self) -> dict:
        return {"kind": "per_token"}


Granularity = Union[PerTensor, PerChannel, PerGroup, PerToken]


def granularity_from_dict(d: dict) -> Granularity:
    kind = d["kind"]
    if kind == "per_tensor":
        return PerTensor()
    if kind == "per_channel":
        return PerChannel(d.get("axis", 0))
    if kind == "per_group":
        return PerGroup(d.get("size", 128), d.get("axis", -1))
    if kind == "per_token":
        return PerToken()
    raise RecipeError(f"unknown granularity kind {kind!r}; use per_tensor, per_channel, per_group or per_token")


def scale_layout(spec: "QuantSpec", x=None) -> tuple[int, int]:
    """(axis, block_size) of a spec's scale, as the quantize/dequantize ops (and ONNX) take them.
    Per token needs the tensor `x` (or its meta value) for the block, its last dimension."""
    g = spec.granularity
    if isinstance(g, PerChannel):
        return g.axis, 0
    if isinstance(g, PerGroup):
        return g.axis, g.size
    if isinstance(g, PerToken):
        return -1, int(x.shape[-1]) if x is not None else 0
    return 0, 0


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized."""

    dtype: str = "int8"
    granularity: Granularity = PerTensor()
    symmetric: bool = True
    observer: str = "minmax"
    # percentile for the "percentile" observer; averaging constant for "moving_average".
    percentile: float = 99.99
    averaging_constant: float = 0.01
    dynamic: bool = False
    rounding: str = "nearest"
    seed: int = 0
    scale_rule: str = "amax"                 # symmetric specs, see SCALE_RULES
    zero_point_domain: str = "int"           # asymmetric specs, see ZERO_POINT_DOMAINS
    # The precision scales (and float zero points) are stored in: "float16" as GGUF stores them.
    scale_dtype: str = "float32"
    # With float16 scales: choose the codes against the stored (rounded) scale, so a file decodes to exactly
    # the reference weights with the lowest error ("fp16-first"); False chooses them against the float32
    # scale and rounds it afterwards, as ggml's and gguf-py's quantizers do (their codes, bit for bit).
    fp16_first: bool = True
    # observer "fixed": the range is known without data (a softmax output lies in [0, 1])
    fixed_range: tuple | None = None

    def __post_init__(self):
        if self.fixed_range is not None:
            object.__setattr__(self, "fixed_range", tuple(float(v) for v in self.fixed_range))
        if (self.observer == "fixed") != (self.fixed_range is not None):
            raise RecipeError("observer='fixed' goes with fixed_range=(lo, hi) and the other observers without it")
        if self.fixed_range is not None and not (len(self.fixed_range) == 2 and self.fixed_range[0] < self.fixed_range[1]):
            raise RecipeError(f"fixed_range must be (lo, hi) with lo < hi, got {self.fixed_range}")
        if self.dtype not in _RANGES:
            raise RecipeError(f"unsupported quantized dtype {self.dtype!r}; use one of {sorted(_RANGES)}")
        if self.dtype in FLOAT8_RANGES and (not self.symmetric or self.rounding != "nearest"):
            raise RecipeError(f"{self.dtype} codes are symmetric (zero point 0) with the format's own "
                              "round-to-nearest-even; use symmetric=True, rounding='nearest'")
        if self.dtype in CODEBOOK_DTYPES and (self.dynamic or not isinstance(self.granularity, PerGroup)):
            raise RecipeError(f"{self.dtype} is a weight format with per-block absmax: use it as a recipe's "
                              "weight spec with PerGroup(64) granularity (see the 'nf4' recipe)")
        if self.rounding not in ROUNDINGS:
            raise RecipeError(f"unknown rounding {self.rounding!r}; use one of {ROUNDINGS}")
        if self.observer not in OBSERVERS:
            raise RecipeError(f"unknown observer {self.observer!r}; use one of {OBSERVERS}")
        if not 50.0 < self.percentile <= 100.0:
            raise RecipeError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.dynamic and not isinstance(self.granularity, (PerToken, PerTensor, PerGroup)):
            raise RecipeError("dynamic quantization is per token, per tensor, or per group along the last dim")
        if self.dynamic and isinstance(self.granularity, PerGroup) and (self.granularity.axis != -1 or not self.symmetric):
            raise RecipeError("dynamic per-group quantization is symmetric, in blocks along the last dim "
                              "(PerGroup(size, axis=-1)), as llama.cpp quantizes activations")
        for name, value, allowed in (("scale_rule", self.scale_rule, SCALE_RULES),
                                     ("zero_point_domain", self.zero_point_domain, ZERO_POINT_DOMAINS),
                                     ("scale_dtype", self.scale_dtype, SCALE_DTYPES)):
            if value not in allowed:
                raise RecipeError(f"unknown {name} {value!r}; use one of {allowed}")
        if self.scale_rule != "amax" and not self.symmetric:
            raise RecipeError(f"scale_rule {self.scale_rule!r} is a symmetric rule; asymmetric specs choose "
                              "their range with zero_point_domain")
        if self.zero_point_domain != "int" and self.symmetric:
            raise RecipeError("zero_point_domain='float' is an asymmetric format (q * s + m); set symmetric=False")
        if self.dtype in CODEBOOK_DTYPES and (self.scale_rule != "amax" or self.zero_point_domain != "int"
                                              or self.scale_dtype != "float32"):
            raise RecipeError(f"{self.dtype} has its own absmax format; leave scale_rule, zero_point_domain and "
                              "scale_dtype at their defaults")
        if self.symmetric and self.dtype.startswith("u"):
            raise RecipeError(f"symmetric {self.dtype} wastes half the range; use int8/int4 or symmetric=False")

    @property
    def qmin(self) -> int:
        return _RANGES[self.dtype][0]

    @property
    def qmax(self) -> int:
        return _RANGES[self.dtype][1]

    @property
    def bits(self) -> int:
        if self.dtype in FLOAT8_RANGES:
            return 8
        return (self.qmax - self.qmin + 1).bit_length() - 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["granularity"] = self.granularity.to_dict()
        return d

    @staticmethod
    def from_dict(d: dict) -> "QuantSpec":
        d = dict(d)
        d["granularity"] = granularity_from_dict(d.get("granularity", {"kind": "per_tensor"}))
        return QuantSpec(**d)


@dataclass(frozen=True)
class SharedSpec:
    """Use the same qparams as another tensor: a node's output, or an input edge (producer, consumer)."""

    with_: Any  # torch.fx.Node | tuple[Node, Node]


@dataclass(frozen=True)
class AttentionSpec:
    """How the attention pattern Q x K^T -> scale / additive mask -> softmax -> P x V is quantized
    (passes/annotate_attention.py): its four matmul operands, each on the matmul's input edge.
    Per head is `PerChannel(1)` on the [batch, heads, seq, dim] operands.

    `max_cost`: None quantizes every attention the pattern matches. A number makes `calibrate`
    measure what quantizing attention costs on the calibration batches (the drop in mean cosine
    of the model's outputs to the float model, against the same graph with attention left float)
    and keep attention float when the cost exceeds it (qcompile/attention_choice.py); the decision
    and the measured cost are kept in the QState and printed by `qc.inspect`."""

    query: QuantSpec
    key: QuantSpec
    value: QuantSpec
    probs: QuantSpec
    max_cost: float | None = None

    def __post_init__(self):
        for name in ("query", "key", "value", "probs"):
            spec = getattr(self, name)
            if not isinstance(spec, QuantSpec) or spec.dynamic or spec.dtype not in ("int8", "uint8"):
                raise RecipeError(f"attention {name}: a static int8/uint8 QuantSpec, got {spec!r}")
            if not isinstance(spec.granularity, (PerTensor, PerChannel)):
                raise RecipeError(f"attention {name}: per tensor or per head (PerChannel(1)), got {spec.granularity}")
        if self.max_cost is not None and not self.max_cost >= 0:
            raise RecipeError(f"attention max_cost is a non-negative drop in mean cosine, got {self.max_cost}")

    def replace(self, **changes) -> "AttentionSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {**{k: getattr(self, k).to_dict() for k in ("query", "key", "value", "probs")}, "max_cost": self.max_cost}

    @staticmethod
    def from_dict(d: dict) -> "AttentionSpec":
        return AttentionSpec(**{k: QuantSpec.from_dict(d[k]) for k in ("query", "key", "value", "probs")},
                             max_cost=d.get("max_cost"))


# Op families a recipe may quantize (see passes/annotate.py for what each one covers). "embedding" (the
# table of an embedding lookup, weight spec only) is not in a recipe's default ops: only formats that
# store the table quantized, such as GGUF's token_embd, ask for it.
OP_FAMILIES = ("linear", "conv", "matmul", "add", "mul", "cat", "pool", "reshape", "embedding")
DEFAULT_OPS = tuple(o for o in OP_FAMILIES if o != "embedding")
# Activations a runtime may fuse into a GEMM/conv ahead of its output quantization (graph/nodes.py).
FUSABLE_ACTIVATIONS = ("relu", "relu6", "gelu", "silu")


@dataclass(frozen=True)
class Recipe:
    """A whole-model quantization recipe.

    `exclude` holds fnmatch patterns of module names (as in `model.named_modules()`) kept in float;
    `overrides` maps a pattern to the name of another recipe used for the matching modules.
    """

    name: str
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    ops: tuple[str, ...] = DEFAULT_OPS
    exclude: tuple[str, ...] = ()
    overrides: tuple[tuple[str, str], ...] = ()
    # Quantize the outputs of weighted ops (after a fused activation, see below): an integer graph
    # end to end, as CNN backends want. Off for transformers, where onnxruntime's fast path and
    # accuracy both want only the inputs of matmuls quantized. True: linear and conv; a tuple of
    # op families ("conv",): those only (the `ort-cpu` target's choice, see targets.py).
    quantize_outputs: Union[bool, tuple] = False
    # PTQ algorithm passes run at calibration, in order: ("smoothquant", (("alpha", 0.85),)), ...
    # Written by users as names or {"name": ..., **options}; see passes/algorithm.py.
    algorithms: tuple = ()
    # Quantized attention (Q, K, V and the softmax output), matched as one pattern; None: not as a
    # pattern (the "matmul" family then quantizes both inputs of every matmul with `activation`).
    attention: AttentionSpec | None = None
    # A decoder LLM's KV cache (passes/kv_cache.py): None keeps it in float; a QuantSpec from
    # KV_CACHE_SPECS (or its name) quantizes K and V on write and dequantizes them on read.
    kv_cache: QuantSpec | None = None
    version: int = 1
    # The activations an output quantization is placed after, because the runtime fuses them into
    # the GEMM/conv: "relu", "relu6" (hardtanh(0, 6)), "gelu", "silu". After any other activation
    # the quantization sits between the op and the activation.
    fused_activations: tuple = ("relu", "gelu", "silu")

    def __post_init__(self):
        unknown = [o for o in self.ops if o not in OP_FAMILIES]
        if unknown:
            raise RecipeError(f"unknown op families {unknown}; known: {OP_FAMILIES}")
        object.__setattr__(self, "ops", tuple(self.ops))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "overrides", tuple(tuple(o) for o in self.overrides))
        object.__setattr__(self, "algorithms", normalize_algorithms(self.algorithms))
        object.__setattr__(self, "kv_cache", get_kv_cache_spec(self.kv_cache))
        if not isinstance(self.quantize_outputs, bool):
            families = tuple(self.quantize_outputs)
            if any(f not in ("linear", "conv") for f in families):
                raise RecipeError(f"quantize_outputs takes True/False or weighted op families ('linear', 'conv'), "
                                  f"got {self.quantize_outputs!r}")
            object.__setattr__(self, "quantize_outputs", families)
        unknown = [a for a in self.fused_activations if a not in FUSABLE_ACTIVATIONS]
        if unknown:
            raise RecipeError(f"unknown fused activations {unknown}; known: {FUSABLE_ACTIVATIONS}")
        object.__setattr__(self, "fused_activations", tuple(self.fused_activations))
        if self.activation is not None and (self.activation.dtype in CODEBOOK_DTYPES or self.activation.rounding != "nearest"):
            raise RecipeError(f"recipe {self.name!r}: {self.activation.dtype} with {self.activation.rounding} rounding "
                              "is for weights only; give activations an integer dtype with rounding='nearest'")

    def quantizes_output_of(self, family: str) -> bool:
        """Whether the recipe quantizes the outputs of the weighted op family ("linear", "conv")."""
        q = self.quantize_outputs
        return q if isinstance(q, bool) else family in q

    @property
    def weight_only(self) -> bool:
        return self.activation is None

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def recipe_for(self, module_name: str) -> "Recipe | None":
        """The recipe that applies to a module: None if excluded, an override, or self."""
        if any(fnmatch.fnmatchcase(module_name, p) for p in self.exclude):
            return None
        for pattern, other in self.overrides:
            if fnmatch.fnmatchcase(module_name, pattern):
                return get_recipe(other)
        return self

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "weight": self.weight.to_dict() if self.weight else None,
            "activation": self.activation.to_dict() if self.activation else None,
            "ops": list(self.ops),
            "exclude": list(self.exclude),
            "overrides": [list(o) for o in self.overrides],
            "quantize_outputs": self.quantize_outputs if isinstance(self.quantize_outputs, bool)
            else list(self.quantize_outputs),
            "fused_activations": list(self.fused_activations),
            "algorithms": [{"name": name, **dict(opts)} for name, opts in self.algorithms],
            "attention": self.attention.to_dict() if self.attention else None,
            "kv_cache": self.kv_cache.to_dict() if self.kv_cache else None,
            "version": self.version,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @staticmethod
    def from_dict(d: dict) -> "Recipe":
        d = dict(d)
        for key in ("weight", "activation", "kv_cache"):
            if d.get(key) is not None:
                d[key] = QuantSpec.from_dict(d[key])
        if d.get("attention") is not None:
            d["attention"] = AttentionSpec.from_dict(d["attention"])
        return Recipe(**d)

    @staticmethod
    def from_json(text: str) -> "Recipe":
        return Recipe.from_dict(json.loads(text))


def normalize_algorithms(algorithms) -> tuple:
    """Names, (name, options) pairs or {"name": ..., **options} dicts -> ((name, ((key, value), ...)), ...)."""
    if isinstance(algorithms, (str, dict)):
        algorithms = [algorithms]
    out = []
    for a in algorithms:
        if isinstance(a, str):
            name, opts = a, {}
        elif isinstance(a, dict):
            if "name" not in a:
                raise RecipeError(f"an algorithm given as a dict needs a 'name' key, got {a}")
            opts = dict(a)
            name = opts.pop("name")
        elif isinstance(a, (tuple, list)) and len(a) == 2 and isinstance(a[0], str):
            name, opts = a[0], dict(a[1])
        else:
            raise RecipeError(f"an algorithm is a name, (name, options) or {{'name': ..., **options}}; got {a!r}")
        out.append((name, tuple(sorted(opts.items()))))
    return tuple(out)


_W8_PER_CHANNEL = QuantSpec("int8", PerChannel(0), symmetric=True, observer="minmax")
# Activations: asymmetric uint8 so one-sided tensors (after ReLU/GELU) use the whole range, and a
# histogram MSE search for the range so rare outliers do not stretch the step. Measured on
# all-MiniLM-L6-v2: symmetric min-max 0.982 cosine, asymmetric + MSE >= 0.99.
_A8_STATIC = QuantSpec("uint8", PerTensor(), symmetric=False, observer="mse")
_A8_PER_TOKEN = QuantSpec("int8", PerToken(), symmetric=True, dynamic=True)


# GGUF (llama.cpp) block formats: blocks of 32 along K, float16 scales rounded before the codes are
# chosen (fp16-first: the file decodes to exactly the reference weights), ggml's roundings. The specs
# with fp16_first=False give ggml's own codes (gguf.quants.quantize), bit for bit.
GGUF_Q8_0 = QuantSpec("int8", PerGroup(32), symmetric=True, rounding="half_away", scale_dtype="float16")
GGUF_Q4_0 = QuantSpec("int4", PerGroup(32), symmetric=True, scale_rule="signed_amax", rounding="half_up",
                      scale_dtype="float16")
GGUF_Q4_1 = QuantSpec("uint4", PerGroup(32), symmetric=False, zero_point_domain="float", rounding="half_up",
                      scale_dtype="float16")
# What llama.cpp does to the input of every matmul with a quantized weight: Q8_0 blocks of 32 along K per
# token, d = amax / 127 in float32, codes from it, d stored in float16 (Q4_1 weights pair with Q8_1, the
# same codes and d plus a float16 block sum).
GGUF_ACTIVATION = QuantSpec("int8", PerGroup(32), symmetric=True, dynamic=True, scale_dtype="float16",
                            fp16_first=False)
GGUF_OPS = ("linear", "embedding")


def _gguf_recipes() -> dict[str, Recipe]:
    """gguf-<type> simulates llama.cpp's activation quantization too (the golden model of what it
    computes); gguf-<type>-weight-only keeps activations float. In 4-bit recipes the token embedding
    and the output projection are Q8_0, as llama.cpp's own mixes keep them high."""
    out = {}
    for suffix, act in (("", GGUF_ACTIVATION), ("-weight-only", None)):
        high = f"gguf-q8_0{suffix}"
        keep_high = (("*embed_tokens", high), ("*lm_head", high))
        out[high] = Recipe(high, weight=GGUF_Q8_0, activation=act, ops=GGUF_OPS)
        for name, spec in (("q4_0", GGUF_Q4_0), ("q4_1", GGUF_Q4_1)):
            out[f"gguf-{name}{suffix}"] = Recipe(f"gguf-{name}{suffix}", weight=spec, activation=act, ops=GGUF_OPS,
                                                 overrides=keep_high)
    return out


# Quantized attention (AttentionSpec): Q, K and V as the w8a8 activations (uint8 per tensor, MSE
# range), the softmax output as uint8 on the fixed [0, 1] range (step 1/255). Measured on
# all-MiniLM-L6-v2 (linears quantized with the q/k/v outlier split and SmoothQuant through attention,
# 200 / 400 sentences, mean / min cosine to FP32): attention float 0.99807 / 0.99570, this spec
# 0.99758 / 0.99500, per head (PerChannel(1)) uint8 min-max 0.99785 / 0.99544; a calibrated (MSE)
# range for P instead of [0, 1] did not help. Per tensor is what the fused kernels take (torchao's
# INT8 SDPA template, onnxruntime's MatMulIntegerToFloat / QLinearMatMul), so it is the default.
_P_FIXED = QuantSpec("uint8", PerTensor(), symmetric=False, observer="fixed", fixed_range=(0.0, 1.0))
ATTENTION_INT8 = AttentionSpec(query=_A8_STATIC, key=_A8_STATIC, value=_A8_STATIC, probs=_P_FIXED)
# KV caches of decoder LLMs. Keys are [batch, kv_heads, tokens, head_dim]: static scales per KV head
# (axis 1) calibrated on the calibration text, as TensorRT-LLM and vLLM calibrate theirs; or one
# scale per token and head computed as each token is written (llama.cpp's q8_0 cache is per token
# and head in blocks of 32), stored beside the codes.
KV_CACHE_SPECS: dict[str, QuantSpec] = {
    "int8": QuantSpec("int8", PerChannel(1), symmetric=True, observer="minmax"),
    "int8-dynamic": QuantSpec("int8", PerToken(), symmetric=True, dynamic=True),
    "fp8": QuantSpec("fp8_e4m3", PerChannel(1), symmetric=True, observer="minmax"),
}
_FLOAT_KV = ("fp32", "float", "none")


def get_kv_cache_spec(kv_cache) -> QuantSpec | None:
    """A KV-cache spec from a name of KV_CACHE_SPECS, a QuantSpec, or None / "fp32" (float cache)."""
    if kv_cache is None or isinstance(kv_cache, str) and kv_cache in _FLOAT_KV:
        return None
    if isinstance(kv_cache, QuantSpec):
        spec = kv_cache
    elif isinstance(kv_cache, dict):
        spec = QuantSpec.from_dict(kv_cache)
    elif isinstance(kv_cache, str) and kv_cache in KV_CACHE_SPECS:
        return KV_CACHE_SPECS[kv_cache]
    else:
        raise RecipeError(f"unknown KV cache {kv_cache!r}; use one of {', '.join(KV_CACHE_SPECS)}, "
                          "None / 'fp32' for a float cache, or a QuantSpec")
    ok = spec.dynamic and isinstance(spec.granularity, PerToken) or (
        not spec.dynamic and (isinstance(spec.granularity, PerTensor) or spec.granularity == PerChannel(1)))
    if not ok or spec.dtype in CODEBOOK_DTYPES:
        raise RecipeError("a KV-cache spec is static per tensor or per KV head (PerChannel(1)), or dynamic "
                          f"PerToken, with an integer or fp8 dtype; got {spec}")
    return spec


def _builtin_recipes() -> dict[str, Recipe]:
    weighted = ("linear", "conv")
    return {
        "w8a8": Recipe("w8a8", weight=_W8_PER_CHANNEL, activation=_A8_STATIC),
        "w8a8-dynamic": Recipe("w8a8-dynamic", weight=_W8_PER_CHANNEL, activation=_A8_PER_TOKEN, ops=weighted),
        "w8a16": Recipe("w8a16", weight=_W8_PER_CHANNEL, ops=weighted),
        # TensorRT's explicit quantization: symmetric int8 activations (zero point 0) everywhere.
        "w8a8-tensorrt": Recipe("w8a8-tensorrt", weight=_W8_PER_CHANNEL,
                                activation=QuantSpec("int8", PerTensor(), symmetric=True, observer="mse")),
        # INT4 per-channel weights with the static uint8 activations of w8a8 (a QAT target).
        "w4a8": Recipe("w4a8", weight=QuantSpec("int4", PerChannel(0), symmetric=True), activation=_A8_STATIC),
        # QLoRA's NF4 with double-quantized absmax (blocks of 64 weights, 256 absmaxes); linears only.
        "nf4": Recipe("nf4", weight=QuantSpec("nf4", PerGroup(64), symmetric=True), ops=("linear",)),
        # Asymmetric groups: a group's range need not straddle zero evenly, and the zero point buys
        # back most of a bit there (GPTQ at 256 sentences: MiniLM cosine 0.98871 -> 0.99020,
        # SmolLM2 perplexity 19.19 -> 18.57; README "Weight-only INT4").
        # A language model's output projection (`*lm_head`) keeps 8-bit per-channel weights, as the
        # LLM toolkits keep it high (GPTQModel, AutoAWQ and llm-compressor leave it out, ModelOpt's
        # INT4 configs disable it, llama.cpp's Q4 mixes give it 6 bits): SmolLM2-135M with GPTQ at 160
        # calibration chunks, perplexity +3.90% with it against +5.21% with a 4-bit head (RTN at 16
        # chunks +31.2% against +50.3%), for 12 MB more. A module pattern that matches nothing is fine.
        "w4a16": Recipe(
            "w4a16", weight=QuantSpec("int4", PerGroup(128), symmetric=False, observer="minmax"), ops=weighted,
            overrides=(("*lm_head", "w8a16"),),
        ),
        **_gguf_recipes(),
    }


recipes: dict[str, Recipe] = _builtin_recipes()


def get_recipe(recipe: "str | Recipe") -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if not isinstance(recipe, str):
        raise RecipeError(f"recipe must be a name from qcompile.recipes or a qcompile.Recipe, got {type(recipe).__name__}")
    if recipe not in recipes:
        from .passes.precision import PRECISION_RECIPES  # the precision passes import this module

        close = difflib.get_close_matches(recipe, list(recipes) + list(PRECISION_RECIPES), n=2)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise RecipeError(f"unknown recipe {recipe!r}; known recipes: {', '.join(sorted(recipes))} "
                          f"(precision recipes: {', '.join(PRECISION_RECIPES)}).{hint}")
    return recipes[recipe]
