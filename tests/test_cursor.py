"""graph.cursor.GraphCursor: staged runs of a captured graph that resume where the last stage
stopped. Asserted: the values each stage yields equal a run from the input, bit for bit, on a
tiny LLaMA (rotary embeddings, causal mask, GQA); each node runs once per batch; parameters
changed after a stop are read by the next stage; and above its memory budget the cursor runs
from the input again with the same values."""
from __future__ import annotations

import pytest
import torch

import qcompile as qc
from qcompile.graph import LINEAR, get_param, is_op
from qcompile.graph.cursor import GraphCursor
from qcompile.graph.recorder import record_inputs
from qcompile.testing.tolerances import seeded

pytestmark = pytest.mark.usefixtures("one_thread")


class LM(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids, mask):
        return self.m(input_ids=ids, attention_mask=mask, use_cache=False).logits


@pytest.fixture(scope="module")
def llama_graph():
    from qcompile.testing.llm import tiny_llama

    gen = seeded("cursor")
    batches = []
    for length in (24, 24, 17):   # a short last batch: the dynamic shapes stay per batch
        mask = torch.ones(2, length, dtype=torch.long)
        mask[1, : length // 3] = 0   # left padding: the mask reaches the attention scores
        batches.append((torch.randint(0, 256, (2, length), generator=gen), mask))
    prepared = qc.prepare(LM(tiny_llama(seed=5, layers=2)), batches[0], "w8a16",
                          dynamic_shapes=({1: torch.export.Dim("seq", min=2, max=64)},
                                          {1: torch.export.Dim("seq", min=2, max=64)}))
    linears = [n for n in prepared.graph.nodes if is_op(n, LINEAR)]
    return prepared, linears, batches


def _from_input(gm, node, batches):
    seen = []
    record_inputs(gm, [node], batches, lambda key, x: seen.append(x.clone()))
    return seen


def _call_nodes_before(gm, node):
    nodes = list(gm.graph.nodes)
    return sum(n.op in ("call_function", "call_module", "call_method") for n in nodes[:nodes.index(node)])


@pytest.mark.parametrize("keep_bytes", [1 << 40, 0])
def test_each_stage_yields_what_a_run_from_the_input_gives(llama_graph, keep_bytes):
    gm, linears, batches = llama_graph
    cursor = GraphCursor(gm, batches, keep_bytes=keep_bytes)
    stops = linears[::3]   # q_proj, v_proj's neighbours, ... lm_head's group: stops inside and between blocks
    assert len(stops) >= 5 and linears[-1] not in stops
    stops.append(linears[-1])
    for node in stops:
        got = list(cursor.inputs_to(node))
        want = _from_input(gm, node, batches)
        assert len(got) == len(want) == 3
        for g, w in zip(got, want):
            assert torch.equal(g, w), node.name
    runs_once = len(batches) * _call_nodes_before(gm, linears[-1])
    if keep_bytes:
        assert cursor.resumed and cursor.node_runs == runs_once
        assert cursor.peak_bytes > 0
    else:   # over the budget at the first stop: every later stage runs from the input
        assert not cursor.resumed and "over 0 MB" in cursor.reason
        assert cursor.node_runs == len(batches) * sum(_call_nodes_before(gm, n) for n in stops)
        assert cursor.node_runs > 2 * runs_once


def test_the_next_stage_reads_weights_changed_after_the_stop(llama_graph):
    """GPTQ writes a group's weights after the cursor stops at its input: the next stage's values
    are those of the changed graph, and the values before the stop are not recomputed."""
    gm, linears, batches = llama_graph
    first, second = linears[0], linears[3]   # q_proj of block 0; o_proj (after q/k/v and attention)
    weight = first.args[1]
    original = get_param(gm, weight).detach().clone()
    cursor = GraphCursor(gm, batches, keep_bytes=1 << 40)
    list(cursor.inputs_to(first))
    try:
        get_param(gm, weight).data.mul_(0.5)
        got = list(cursor.inputs_to(second))
        want = _from_input(gm, second, batches)
    finally:
        get_param(gm, weight).data.copy_(original)
    unchanged = _from_input(gm, second, batches)
    for g, w, u in zip(got, want, unchanged):
        assert torch.equal(g, w)
        assert not torch.equal(g, u)


def test_a_stop_before_the_last_one_is_refused(llama_graph):
    gm, linears, batches = llama_graph
    cursor = GraphCursor(gm, batches, keep_bytes=1 << 40)
    list(cursor.inputs_to(linears[4]))
    with pytest.raises(ValueError, match="forward only"):
        list(cursor.inputs_to(linears[1]))
