"""Quantize a LLaMA checkpoint block by block (weights read from disk as each block needs them),
with the calibration data spread over torch.distributed ranks:

    torchrun --nproc-per-node 2 examples/sequential_torchrun.py [CHECKPOINT_FOLDER] [OUTPUT_FOLDER]

Without a checkpoint folder, rank 0 writes a tiny random LLaMA as safetensors first (a stand-in
for a downloaded model folder: config.json + *.safetensors). Each rank calibrates on its own
batches; the statistics of every block (here GPTQ Hessians) are reduced across ranks, so the result
is the one a single process would compute on all the batches. Rank 0 writes the output. Plain
`python examples/sequential_torchrun.py` runs the same thing in one process.
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist

import qcompile as qc


def main() -> None:
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")  # "nccl" on GPUs
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    work = tempfile.mkdtemp() if rank == 0 and len(sys.argv) < 3 else ""
    folder = sys.argv[1] if len(sys.argv) > 1 else os.path.join(work, "tiny-llama")
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(work, "tiny-llama-w4a16")
    if len(sys.argv) < 2 and rank == 0:
        from qcompile.testing.llm import tiny_llama

        tiny_llama(seed=0, layers=4, hidden_size=128, intermediate_size=256).save_pretrained(folder)
    if distributed:  # every rank reads rank 0's folders, once the checkpoint is written
        names = [folder, out]
        dist.broadcast_object_list(names, src=0)
        folder, out = names

    # this rank's shard of the calibration data: batch t of every rank together is global batch t
    gen = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randint(0, 256, (2, 32), generator=gen) for _ in range(4)]

    ckpt = qc.quantize_sequential(folder, batches, out, "w4a16", algorithms=["gptq"], progress=rank == 0)
    if rank == 0:
        print(f"{world} rank(s): {len(ckpt.stages)} stages quantized into {out}")
        with torch.no_grad():
            logits = ckpt.module()(input_ids=batches[0]).logits
        print(f"quantized model logits {tuple(logits.shape)}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
