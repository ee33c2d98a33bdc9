"""Data-parallel PTQ calibration on 2 gloo processes against one process that saw all the data.

    python -m qcompile.testing.dist_calibration OUT.pt [PORT]

Each rank calibrates the same small model on its own shard (rank 1's inputs are 3x larger, with
an outlier channel of its own, so no rank's local statistics equal the global ones), once per
configuration: every activation observer (minmax, moving_average, percentile, mse), SmoothQuant
(alpha searched on sampled rows), AWQ and GPTQ. Then rank 0, with the process group destroyed,
calibrates the same configurations alone on the global batches (step t: rank 0's batch t and rank
1's batch t concatenated, in rank order). Everything `convert` chose (activation qparams, weight
codes, scales and zero points) is saved for both ranks and the single process; tests compare.
Then the ranks call calibrate with 2 and 3 batches and keep the error it raises, and quantize a
tiny LLaMA with qc.quantize_sequential (GPTQ), rank 0 writing the output, against one process on
the global batches, and run QAT under FSDP2 (fully_shard) and convert it on each rank.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

STEPS, WORLD = 3, 2


class Net(nn.Module):
    """LayerNorm feeding two linears (one SmoothQuant / AWQ / GPTQ group), GELU, an output linear."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.up, self.gate = nn.Linear(32, 64), nn.Linear(32, 64)
        self.down = nn.Linear(64, 16)

    def forward(self, x):
        h = self.norm(x)
        return self.down(nn.functional.gelu(self.up(h)) * self.gate(h))


def configurations() -> dict:
    import qcompile as qc
    from qcompile.spec import QuantSpec, PerTensor

    w8a8, w4a16 = qc.recipes["w8a8"], qc.recipes["w4a16"]
    small_groups = QuantSpec("int4", qc.PerGroup(16), symmetric=True, observer="minmax")
    configs = {
        f"observer {kind}": w8a8.replace(activation=QuantSpec("uint8", PerTensor(), symmetric=False, observer=kind))
        for kind in ("minmax", "moving_average", "percentile", "mse")
    }
    configs["smoothquant"] = w8a8.replace(algorithms=[{"name": "smoothquant", "alpha": "auto", "n_samples": 40}])
    configs["awq"] = w4a16.replace(weight=small_groups, algorithms=[{"name": "awq", "n_samples": 40}])
    configs["gptq"] = w4a16.replace(weight=small_groups, algorithms=[{"name": "gptq", "float_targets": False}])
    # the default: the output linear fits the float model's output, its cross term reduced over the ranks too
    configs["gptq float_targets"] = w4a16.replace(weight=small_groups, algorithms=["gptq"])
    return configs


def shard(rank: int) -> list[torch.Tensor]:
    """Rank `rank`'s calibration batches ([4, 8, 32] each): different scales and outliers per rank."""
    gen = torch.Generator().manual_seed(1000 + rank)
    batches = []
    for _ in range(STEPS):
        x = torch.randn(4, 8, 32, generator=gen) * (1 + 2 * rank)
        x[..., 3 + 5 * rank] *= 8  # an outlier channel of this rank's own
        batches.append(x)
    return batches


def quantize_all(batches: list) -> dict:
    """{configuration: {tensor: (scale, zero point[, codes])}} from prepare -> calibrate -> convert."""
    import qcompile as qc

    torch.manual_seed(0)
    model = Net().eval()
    out = {}
    for name, recipe in configurations().items():
        prepared = qc.prepare(model, batches[0], recipe)
        qc.calibrate(prepared, batches, progress=False)
        quantized = qc.convert(prepared)
        rows = {}
        for row in quantized.meta["qcompile"].qparams:
            entry = [row["scale"].clone(), row["zero_point"].clone()]
            if row["kind"] == "weight":
                entry.append(getattr(quantized, "qc_w_" + row["tensor"].replace(".", "_")).clone())
            rows[row["tensor"]] = entry
        out[name] = rows
    return out


def sequential_llama(batches: list, out: str, mirrored: bool = False) -> dict:
    """qc.quantize_sequential of a tiny random LLaMA (weights in memory), GPTQ, or with `mirrored`
    w8a8 + SmoothQuant with propagate_error=False (each rank keeps its own calibrated outputs):
    {weight: (codes, scale)}, and {"logits": ...} of the result on fixed tokens."""
    import qcompile as qc
    from qcompile.testing.llm import tiny_llama

    model = tiny_llama(seed=5, layers=2)
    if mirrored:
        ckpt = qc.quantize_sequential(model, batches, out, "w8a8", algorithms=["smoothquant"], propagate_error=False,
                                      progress=False)
    else:
        recipe = qc.recipes["w4a16"].replace(weight=qc.QuantSpec("int4", qc.PerGroup(32), symmetric=True))
        ckpt = qc.quantize_sequential(model, batches, out, recipe, algorithms=["gptq"], progress=False)
    result = {name: (codes, scale) for name, codes, scale, *_ in ckpt.quantized_weights()}
    if mirrored:   # the activation qparams show in the logits
        with torch.no_grad():
            result["logits"] = (ckpt.module()(input_ids=torch.arange(24)[None] * 7 % 256).logits,)
    return result


def llama_shard(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2000 + rank)
    return [torch.randint(0, 256 if rank == 0 else 64, (2, 16), generator=gen) for _ in range(2)]


def fsdp_qat(rank: int) -> dict:
    """QAT of a small MLP sharded with FSDP2 (fully_shard), 3 steps on this rank's data, then converted
    through the full state dict: {tensor: (scale, zero point)}, and what a direct convert raises."""
    import qcompile as qc
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    example = torch.randn(8, 16)
    qat = qc.prepare_qat(model, (example,), "w8a8")
    fully_shard(qat)
    opt = torch.optim.SGD(qat.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(300 + rank)
    for _ in range(3):
        qat(torch.randn(8, 16, generator=gen) * (1 + 2 * rank)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    try:
        qc.convert(qat)
        direct = None
    except qc.ConvertError as e:
        direct = str(e)
    full = get_model_state_dict(qat, options=StateDictOptions(full_state_dict=True))
    fresh = qc.prepare_qat(model, (example,), "w8a8")
    fresh.load_state_dict(full)
    rows = qc.convert(fresh.eval()).meta["qcompile"].qparams
    return {"qparams": {r["tensor"]: (r["scale"], r["zero_point"]) for r in rows}, "direct_convert_error": direct,
            "sharded": type(next(qat.parameters())).__name__}


def uneven_shards_error(rank: int) -> str | None:
    """The error calibrate raises when the ranks hold 2 and 3 batches (instead of a hang)."""
    import qcompile as qc
    from qcompile.errors import CalibrationError

    prepared = qc.prepare(nn.Linear(4, 4), torch.randn(2, 4), "w8a8")
    try:
        qc.calibrate(prepared, [torch.randn(2, 4)] * (2 + rank), progress=False)
    except CalibrationError as e:
        return str(e)
    return None


def _run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    result = {"distributed": quantize_all(shard(rank)), "uneven_error": uneven_shards_error(rank),
              "sequential": sequential_llama(llama_shard(rank), f"{out}.seq"),
              "mirrored": sequential_llama(llama_shard(rank), f"{out}.mirrored", mirrored=True), "fsdp": fsdp_qat(rank)}
    dist.destroy_process_group()
    if rank == 0:  # the reference: one process, the global batches
        shards = [shard(r) for r in range(world)]
        result["single"] = quantize_all([torch.cat([s[t] for s in shards]) for t in range(STEPS)])
        result["rank0_alone"] = quantize_all(shards[0])
        llama = [llama_shard(r) for r in range(world)]
        result["sequential_single"] = sequential_llama([torch.cat([s[t] for s in llama]) for t in range(2)],
                                                       f"{out}.seq-single")
        result["mirrored_single"] = sequential_llama([torch.cat([s[t] for s in llama]) for t in range(2)],
                                                     f"{out}.mirrored-single", mirrored=True)
    torch.save(result, f"{out}.rank{rank}")


def main(out: str, port: int = 29541) -> None:
    torch.multiprocessing.spawn(_run, args=(WORLD, port, out), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 29541)
