"""Data-parallel PTQ calibration (torch.distributed, gloo): 2 ranks against one process.

The ranks run in child processes (qcompile.testing.dist_calibration), once for all configurations.
"""
import subprocess
import sys

import pytest
import torch

from qcompile import distributed
from qcompile.testing.dist_calibration import configurations


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "qparams"
    port = 29600 + (hash(str(out)) % 300)
    proc = subprocess.run([sys.executable, "-m", "qcompile.testing.dist_calibration", str(out), str(port)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(f"{out}.rank0"), torch.load(f"{out}.rank1")


def _differing(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not all(torch.equal(x, y) for x, y in zip(a[k], b[k]))]


@pytest.mark.parametrize("config", list(configurations()))
def test_two_ranks_choose_the_qparams_and_codes_of_one_process_on_the_global_batches(results, config):
    rank0, rank1 = results
    single = rank0["single"][config]
    # every activation qparam, weight scale / zero point and weight code, bit for bit
    assert _differing(rank0["distributed"][config], single) == []
    assert _differing(rank1["distributed"][config], single) == []
    # and the test can tell: rank 0's shard alone gives other qparams (rank 1's data is 3x larger)
    assert _differing(rank0["rank0_alone"][config], single) != []
    n_activations = sum(len(v) == 2 for v in single.values())
    assert n_activations >= (0 if config in ("awq", "gptq", "gptq float_targets") else 3)


def test_sample_rows_without_a_process_group_is_torch_randperm():
    x = torch.randn(50, 4)
    a = distributed.sample_rows(x, 7, torch.Generator().manual_seed(3))
    b = x[torch.randperm(50, generator=torch.Generator().manual_seed(3))[:7]]
    assert torch.equal(a, b)


def test_distributed_helpers_are_the_identity_in_one_process():
    t = torch.tensor([1.0, -2.0])
    assert distributed.reduce_sum(t) is t and distributed.reduce_max(t) is t and distributed.reduce_min(t) is t
    assert distributed.reduce_count(5) == 5 and distributed.world_size() == 1 and distributed.rank() == 0
    distributed.check_same_count(3)  # nothing to compare against


def test_uneven_shards_raise_a_calibration_error_on_every_rank(results):
    # instead of rank 0 waiting forever in the reduction of a batch rank 1 alone has
    for r in results:
        assert r["uneven_error"] is not None and "between 2 and 3" in r["uneven_error"], r["uneven_error"]


def test_two_ranks_quantize_sequentially_to_the_codes_of_one_process(results):
    rank0, rank1 = results
    single = rank0["sequential_single"]
    assert len(single) == 2 * 7 + 1
    assert _differing(rank0["sequential"], single) == [] and _differing(rank1["sequential"], single) == []
    # the shards differ (rank 1's tokens are all < 64), so a rank alone could not match it by chance


def test_two_ranks_mirroring_the_whole_model_give_the_codes_and_logits_of_one_process(results):
    """w8a8 + SmoothQuant with propagate_error=False: SmoothQuant's statistics of the float model's
    activations and the observers of each rank's calibrated outputs are reduced across ranks."""
    rank0, rank1 = results
    single = rank0["mirrored_single"]
    assert len(single) == 2 * 7 + 1 + 1   # 15 weights and the logits
    assert _differing(rank0["mirrored"], single) == [] and _differing(rank1["mirrored"], single) == []


def test_fsdp2_qat_converts_to_identical_qparams_on_every_rank(results):
    """torch's CPU build runs fully_shard with gloo: observers sync their ranges as under DDP."""
    f0, f1 = results[0]["fsdp"], results[1]["fsdp"]
    assert f0["sharded"] == "DTensor"
    assert f0["qparams"].keys() == f1["qparams"].keys() and len(f0["qparams"]) == 4
    for name in f0["qparams"]:
        assert all(torch.equal(a, b) for a, b in zip(f0["qparams"][name], f1["qparams"][name])), name
    # a direct convert says how to gather the shards instead of failing inside deepcopy
    assert "get_model_state_dict" in f0["direct_convert_error"]
