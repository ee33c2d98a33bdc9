"""Run a graph's calibration batches in stages, each resuming where the last one stopped.

A sequential algorithm (GPTQ) changes one group of layers, then needs the next group's inputs as
the changed graph computes them. Running every batch from the model's input for each group costs
layers x groups node runs: SmolLM2-135M's 121 groups made GPTQ 4x slower in memory than block by
block. `GraphCursor` runs each batch up to a node, keeps the values that later nodes read (the
batch's live set: the residual stream and what an open block still needs), and the next stage
starts from there, so each node runs once per batch. The nodes before a stop must not change
after it: every stage's changes lie at or after its stop, as GPTQ's do.

Live sets hold every batch's activations at once. Above `keep_bytes` the cursor stops keeping
them and each stage runs from the input again (the old cost, one batch's memory): `resumed` and
`reason` say which it did.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import fx

from ..capture import flatten_for_graph, normalize_inputs
from .annotation import get_arg
from .nodes import _resolve
from .recorder import observers_disabled


def _bytes(values) -> int:
    """Bytes of the distinct storages the values hold (views share their base's)."""
    storages = {}
    for leaf in torch.utils._pytree.tree_leaves(list(values)):
        if isinstance(leaf, torch.Tensor):
            storage = leaf.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class GraphCursor:
    """Each batch's position in `gm` and the live values there, for stages that stop at `stops`
    (nodes in graph order, given up front). `inputs_to(node)` runs every batch from its position
    to the next stop `node` and yields, batch by batch, the value of `node`'s argument `arg`. Only
    the nodes the stops' inputs depend on run, and a value stays only until the last of them reads
    it: what the graph alone returns (a causal-LM step's new KV cache, 12 MB per 256-token chunk in
    SmolLM2; its logits) is never computed. Observers pass values through (as in `record_inputs`);
    parameters are read when a node runs, so a stage sees the weights the previous stage wrote (or
    swapped in)."""

    def __init__(self, gm: fx.GraphModule, batches: Sequence, stops: Sequence[fx.Node], *, keep_bytes: int,
                 what: str = "calibration batch"):
        self.gm, self.batches, self.what, self.keep_bytes = gm, list(batches), what, keep_bytes
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.stop_nodes = list(stops)
        if [self.order[n] for n in self.stop_nodes] != sorted(self.order[n] for n in self.stop_nodes):
            raise ValueError("GraphCursor stops must be given in graph order")
        needed, frontier = set(), [a for n in self.stop_nodes for a in n.all_input_nodes]
        while frontier:
            node = frontier.pop()
            if node not in needed:
                needed.add(node)
                frontier.extend(node.all_input_nodes)
        self.needed = needed
        self.last_use: dict[fx.Node, int] = {}
        for i, node in enumerate(self.nodes):
            if node in needed or node in self.stop_nodes:
                for arg in node.all_input_nodes:
                    self.last_use[arg] = i
        self.next_stop = 0
        self.states: list[tuple[int, dict] | None] = [None] * len(self.batches)   # None: at the input
        self.resumed, self.reason, self.peak_bytes = True, "", 0
        self.node_runs = 0   # call nodes run, over all batches and stages

    def inputs_to(self, node: fx.Node, arg: int = 0) -> Iterator[torch.Tensor]:
        if self.next_stop >= len(self.stop_nodes) or self.stop_nodes[self.next_stop] is not node:
            expected = (self.stop_nodes[self.next_stop].name if self.next_stop < len(self.stop_nodes)
                        else "none: every stop was reached")
            raise ValueError(f"GraphCursor runs forward through its stops in order: got {node.name}, the next "
                             f"stop is {expected}")
        self.next_stop += 1
        stop = self.order[node]
        live = 0
        for i, batch in enumerate(self.batches):
            position, env = self.states[i] or (0, self._placeholders(batch))
            self._run(env, position, stop)
            yield self._load(env, get_arg(node, arg))
            if self.resumed:
                self.states[i] = (stop, env)
                live += _bytes(env.values())
                self.peak_bytes = max(self.peak_bytes, live)
                if live > self.keep_bytes:
                    self.resumed = False
                    self.reason = (f"the live values of {i + 1} of {len(self.batches)} batches at "
                                   f"{node.name} took {live / 2**20:.0f} MB, over {self.keep_bytes / 2**20:.0f} MB")
                    self.states = [None] * len(self.batches)
            env = None

    def _placeholders(self, batch) -> dict:
        flat = flatten_for_graph(self.gm, *normalize_inputs(batch, what=self.what))
        env = {}
        for node, value in zip((n for n in self.nodes if n.op == "placeholder"), flat):
            if node in self.last_use:
                env[node] = value
        return env

    def _load(self, env: dict, node):
        if isinstance(node, fx.Node) and node.op == "get_attr":
            return _resolve(self.gm, node.target)
        return env[node]

    def _run(self, env: dict, start: int, stop: int) -> None:
        """Run nodes [start, stop) into env, dropping each value after its last reader."""
        load = lambda n: self._load(env, n)   # noqa: E731
        with torch.no_grad(), observers_disabled(self.gm):
            for i in range(start, stop):
                node = self.nodes[i]
                if node.op in ("placeholder", "get_attr", "output") or node not in self.needed:
                    continue
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), load)
                if node.op == "call_function":
                    value = node.target(*args, **kwargs)
                elif node.op == "call_module":
                    value = self.gm.get_submodule(node.target)(*args, **kwargs)
                else:   # call_method
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
                self.node_runs += 1
                if node in self.last_use:
                    env[node] = value
                for used in node.all_input_nodes:
                    if self.last_use[used] == i:
                        env.pop(used, None)
