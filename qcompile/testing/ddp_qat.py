"""Two-process QAT under DistributedDataParallel (gloo, CPU): every rank must convert to the same qparams.

    python -m qcompile.testing.ddp_qat OUT.pt

Each rank trains on its own data (rank 1's inputs are scaled by 3, so its local ranges differ from
rank 0's) and saves the qparams `convert` chose; tests compare the two ranks' files.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn


class ConvBnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _run(rank: int, world: int, port: int, out: str) -> None:
    import qcompile as qc

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial model on both ranks
    model = ConvBnNet()
    qat = qc.prepare_qat(model, (torch.randn(8, 1, 8, 8),), "w8a8")
    ddp = nn.parallel.DistributedDataParallel(qat)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(4):
        x = torch.randn(8, 1, 8, 8, generator=gen) * (1 + 2 * rank)
        y = torch.randint(0, 10, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    quantized = qc.convert(qat)
    rows = quantized.meta["qcompile"].qparams
    torch.save({"qparams": [(r["tensor"], r["scale"], r["zero_point"]) for r in rows],
                "local_last_batch_max": float(x.max())}, f"{out}.rank{rank}")
    dist.destroy_process_group()


def main(out: str, port: int = 29533) -> None:
    torch.multiprocessing.spawn(_run, args=(2, port, out), nprocs=2, join=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 29533)
