"""Calibration statistics reduced across torch.distributed ranks.

Data-parallel calibration: every rank runs its own shard of the calibration batches, in lockstep
(step t of every rank together is the global batch t). Observers and algorithm passes keep their
statistics as before and declare how they combine (sum, min, max, a sample of rows); the helpers
here do that across ranks, so every rank ends with the statistics one process would have
computed on the global batches, and chooses the same qparams and codes. Without an initialized
process group (or with one rank) every helper is the identity: passes need not know about ranks.

Collectives must be issued in the same order on every rank: the passes call them in graph order,
the observers once per call, so the ranks must run the same graph on the same number of batches
(`check_same_count` says so, instead of a hang).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .errors import CalibrationError


def active() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def _reduce(t: Tensor, op) -> Tensor:
    if not active():
        return t
    out = t.detach().clone().contiguous()
    torch.distributed.all_reduce(out, op=op)
    return out


def reduce_sum(t: Tensor) -> Tensor:
    """The sum over ranks (a new tensor; `t` itself is left as it was)."""
    return _reduce(t, torch.distributed.ReduceOp.SUM) if active() else t


def reduce_min(t: Tensor) -> Tensor:
    return _reduce(t, torch.distributed.ReduceOp.MIN) if active() else t


def reduce_max(t: Tensor) -> Tensor:
    return _reduce(t, torch.distributed.ReduceOp.MAX) if active() else t


def reduce_count(n: int) -> int:
    return int(reduce_sum(torch.tensor(n, dtype=torch.int64)))


def sample_rows(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """`k` rows of the global batch (the ranks' `x` stacked in rank order), chosen by
    `torch.randperm(total rows, generator=generator)`: one process gives `x[randperm(len(x))[:k]]`,
    N ranks give every rank the same rows one process would have drawn from their concatenation.
    `generator` must be in the same state on every rank."""
    if not active():
        return x[torch.randperm(x.shape[0], generator=generator)[:k]]
    counts = torch.zeros(world_size(), dtype=torch.int64)
    counts[rank()] = x.shape[0]
    counts = reduce_sum(counts)
    start = int(counts[: rank()].sum())
    idx = torch.randperm(int(counts.sum()), generator=generator)[:k]
    mine = (idx >= start) & (idx < start + x.shape[0])
    # each row is owned by one rank; the others contribute zeros, so the sum is the row itself
    out = torch.zeros((idx.numel(),) + tuple(x.shape[1:]), dtype=x.dtype)
    out[mine] = x[idx[mine] - start]
    return reduce_sum(out)


def check_same_count(n: int, what: str = "calibration batches") -> None:
    """Raise (on every rank) when the ranks hold different numbers of batches: the per-batch
    reductions of the observers would otherwise wait forever for the rank that ran out."""
    if not active():
        return
    lo = int(reduce_min(torch.tensor(n, dtype=torch.int64)))
    hi = int(reduce_max(torch.tensor(n, dtype=torch.int64)))
    if lo != hi:
        raise CalibrationError(f"under torch.distributed every rank must run the same number of {what} "
                               f"(they calibrate in lockstep: step t of all ranks is one global batch); "
                               f"the ranks hold between {lo} and {hi} (this rank: {n}). Shard the data evenly, "
                               "e.g. batches[rank::world_size] with a multiple of world_size batches")


def barrier() -> None:
    if active():
        torch.distributed.barrier()
