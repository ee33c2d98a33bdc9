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


def _ancestors(node) -> set:
    seen, frontier = set(), list(node.all_input_nodes)
    while frontier:
        n = frontier.pop()
        if n not in seen:
            seen.add(n)
            frontier.extend(n.all_input_nodes)
    return seen


def _calls(nodes) -> int:
    return sum(n.op in ("call_function", "call_module", "call_method") for n in nodes)


@pytest.mark.parametrize("keep_bytes", [1 << 40, 0])
def test_each_stage_yields_what_a_run_from_the_input_gives(llama_graph, keep_bytes):
    gm, linears, batches = llama_graph
    stops = linears[::3] + [linears[-1]]   # q_proj, v_proj's neighbours, ... lm_head: inside and between blocks
    assert len(stops) >= 6 and len(set(stops)) == len(stops)
    cursor = GraphCursor(gm, batches, stops, keep_bytes=keep_bytes)
    for node in stops:
        got = list(cursor.inputs_to(node))
        want = _from_input(gm, node, batches)
        assert len(got) == len(want) == 3
        for g, w in zip(got, want):
            assert torch.equal(g, w), node.name
    if keep_bytes:   # each node the last stop's input needs ran once per batch, and nothing else did
        assert cursor.resumed and cursor.peak_bytes > 0
        assert cursor.node_runs == len(batches) * _calls(_ancestors(linears[-1]))
    else:   # over the budget at the first stop: every later stage runs from the input (what any stop needs)
        assert not cursor.resumed and "over 0 MB" in cursor.reason
        needed, order = set().union(*map(_ancestors, stops)), {n: i for i, n in enumerate(gm.graph.nodes)}
        assert cursor.node_runs == len(batches) * sum(_calls(n for n in needed if order[n] < order[s]) for s in stops)
        assert cursor.node_runs > 2 * len(batches) * _calls(_ancestors(linears[-1]))


def test_the_next_stage_reads_weights_changed_after_the_stop(llama_graph):
    """GPTQ writes a group's weights after the cursor stops at its input: the next stage's values
    are those of the changed graph, and the values before the stop are not recomputed."""
    gm, linears, batches = llama_graph
    first, second = linears[0], linears[3]   # q_proj of block 0; o_proj (after q/k/v and attention)
    weight = first.args[1]
    original = get_param(gm, weight).detach().clone()
    cursor = GraphCursor(gm, batches, [first, second], keep_bytes=1 << 40)
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


def test_stops_are_reached_in_the_order_given(llama_graph):
    gm, linears, batches = llama_graph
    with pytest.raises(ValueError, match="graph order"):
        GraphCursor(gm, batches, [linears[4], linears[1]], keep_bytes=1 << 40)
    cursor = GraphCursor(gm, batches, [linears[1], linears[4]], keep_bytes=1 << 40)
    with pytest.raises(ValueError, match="the next stop is"):
        list(cursor.inputs_to(linears[4]))


def test_what_only_the_graph_returns_is_neither_computed_nor_kept():
    """A causal-LM step graph returns its logits and every layer's new keys and values: at lm_head's
    input a batch keeps the final norm's output alone, [batch, seq, hidden] float32 (the keys and
    values went with the attention that read them), and lm_head itself never runs."""
    from qcompile.testing.llm import tiny_llama

    gen = seeded("cursor-step")
    batches = [torch.randint(0, 256, (2, 24), generator=gen) for _ in range(3)]
    gm = qc.prepare(tiny_llama(seed=6, layers=2, hidden_size=64), batches[0], "w8a16")
    linears = [n for n in gm.graph.nodes if is_op(n, LINEAR)]
    assert linears[-1].target is not None and len(linears) == 2 * 7 + 1
    layout = gm.meta["qcompile"].cache
    cursor = GraphCursor(gm, [layout.prefill_inputs(b) for b in batches], linears, keep_bytes=1 << 40)
    for node in linears:
        for _ in cursor.inputs_to(node):
            pass
    live = [sum(v.numel() * v.element_size() for v in env.values()) for _, env in cursor.states]
    assert live == [2 * 24 * 64 * 4] * 3
    outputs = list(gm.graph.nodes)[-1].all_input_nodes   # logits and 2 x 2 cache entries
    assert len(outputs) == 5 and outputs[0] is linears[-1] and linears[-1] not in cursor.needed
