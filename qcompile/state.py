"""QState: what qcompile keeps on a prepared or quantized GraphModule (`gm.meta["qcompile"]`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .spec import Recipe


@dataclass
class QState:
    recipe: Recipe                                    # a PrecisionRecipe when `precision` is set
    qat: bool = False
    precision: bool = False                           # bf16 / fp16 / fp8: casts and FP8 fake-quant, no QDQ
    stage: str = "captured"                           # captured -> prepared -> calibrated -> quantized
    groups: list = field(default_factory=list)        # share_qparams.Group
    observers: dict = field(default_factory=dict)     # group id -> observer attribute name
    records: list = field(default_factory=list)       # PassRecord of every pass run so far
    calibration_batches: int = 0
    algorithms_done: bool = False
    # Weight qparams fixed by an algorithm (GPTQ, AWQ clipping, QAT's learned scales): the
    # weight's get_attr target -> (scale, zero_point); convert uses them instead of the observer.
    weight_qparams: dict = field(default_factory=dict)
    # What each algorithm pass found, for reports: name -> {layer: details}.
    algorithm_reports: dict = field(default_factory=dict)
    # Filled by convert, read by inspect: one row per quantized tensor.
    qparams: list = field(default_factory=list)
    # The deployment target prepare(target=...) adapted the recipe for; export_onnx's default.
    target: str | None = None
    # The source model's configuration (a transformers PretrainedConfig, copied at prepare), for
    # exporters and drivers that need hyperparameters the graph does not spell out (heads, RoPE base).
    model_config: object = None
    # Quantized attention (passes/annotate_attention.py, attention_choice.py): "patterns", one row per
    # attention found (quantized or why not), and "choice", what calibrate decided and the measured cost.
    attention: dict = field(default_factory=dict)
    # A decoder LLM captured as a step graph (llm/capture.py): its KV-cache layout (llm.cache.KVCacheLayout),
    # and the observers of a static quantized cache (entry name -> attribute).
    cache: object = None
    kv_observers: dict = field(default_factory=dict)
    # The float model's inputs to this graph, one per calibration batch, where the graph is one stage of
    # a model whose earlier stages ran quantized (quantize_sequential): GPTQ's float_targets fits them.
    float_inputs: list | None = None
