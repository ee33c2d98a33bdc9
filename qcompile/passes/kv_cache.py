"""Quantize a decoder LLM's KV cache: K and V quantized on write, dequantized on read.

In a captured step graph (llm/capture.py) each cache entry is a graph input `past` read by one
`cat([past, written], dim=2)` (the attention's keys or values), and `written` - the new tokens'
keys (after RoPE) or values - is also a graph output, the part of the cache this step adds.

    prepare  (ObserveKVCache):  written -> observer -> cat, output        (static specs only)
    convert  (QuantizeKVCache): written -> quantize -> codes -> output
                                           codes -> dequantize -+
                                past (codes) -> dequantize -----+-> cat

so the attention reads exactly what a later step reads back from the cache, including the tokens
of the step that wrote them. Static specs take one scale per KV head (or per tensor) from the
calibration text; a dynamic spec computes one scale per token and head as the token is written
and the scales become cache entries of their own (`past_key_3_scale`, [batch, kv_heads, tokens, 1]).
The layout in `state.cache` is updated to the new entry dtypes, which is what drivers allocate.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..errors import ConvertError, PassError
from ..graph import FROM_PASS, STATE
from ..llm.cache import CacheEntry
from ..numerics import storage_dtype
from ..observers import make_observer
from ..spec import QuantSpec, scale_layout
from .base import Pass, PassResult

qops = torch.ops.qcompile
aten = torch.ops.aten
KV_OBSERVER_PREFIX = "qc_kv_observer_"


def cache_writes(gm: fx.GraphModule) -> list[tuple[CacheEntry, fx.Node, fx.Node, fx.Node]]:
    """(entry, past placeholder, its cat, the written tensor) for every key/value entry of the layout;
    a PassError when the graph does not read its cache the way the capture produces it."""
    layout = gm.meta[STATE].cache
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    outputs = list(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    found = []
    for index, entry in enumerate(layout.entries):
        if entry.role not in ("key", "value"):
            continue
        past = placeholders.get(entry.name)
        readers = [u for u in past.users if u.target != aten.sym_size.int] if past is not None else []
        if past is None or len(readers) != 1 or readers[0].target != aten.cat.default or len(readers[0].args[0]) != 2:
            raise PassError(f"cache entry {entry.name!r} is not read by one cat(past, new): this graph's KV cache "
                            "was not captured by qcompile.llm (or a pass rewrote it)")
        cat = readers[0]
        written = cat.args[0][1]
        if outputs[1 + index] is not written:
            raise PassError(f"cache entry {entry.name!r}: the tensor the graph returns is not the one it appends")
        found.append((entry, past, cat, written))
    return found


class ObserveKVCache(Pass):
    """One observer per static quantized cache entry (per layer, keys and values apart)."""

    name = "observe_kv_cache"

    def call(self, gm: fx.GraphModule) -> PassResult:
        state = gm.meta[STATE]
        spec = state.cache.spec if state.cache is not None else None
        if spec is None or spec.dynamic:
            return PassResult(gm, modified=False)
        for entry, _, _, written in cache_writes(gm):
            attr = KV_OBSERVER_PREFIX + entry.name
            gm.add_submodule(attr, make_observer(spec))
            with gm.graph.inserting_after(written):
                obs = gm.graph.call_module(attr, (written,))
            obs.meta.update({FROM_PASS: self.name, "val": written.meta.get("val")})
            written.replace_all_uses_with(obs, delete_user_cb=lambda user: user is not obs)
            state.kv_observers[entry.name] = attr
        return PassResult(gm, modified=True, stats={"observers": len(state.kv_observers)})


class QuantizeKVCache(Pass):
    """Cache entries become codes (and, for a dynamic spec, per-token scales)."""

    name = "quantize_kv_cache"

    def call(self, gm: fx.GraphModule) -> PassResult:
        state = gm.meta[STATE]
        layout = state.cache
        if layout is None or layout.spec is None:
            return PassResult(gm, modified=False)
        spec = layout.spec
        self._gm = gm
        entries, outputs = [], {}
        writes = {entry.name: (past, cat, written) for entry, past, cat, written in cache_writes(gm)}
        for entry in layout.entries:
            past, cat, written = writes[entry.name]
            if spec.dynamic:
                new_entries = self._dynamic(entry, past, cat, written, spec)
            else:
                new_entries = self._static(entry, past, cat, written, spec, state)
            for new_entry, value in new_entries:
                entries.append(new_entry)
                outputs[new_entry.name] = value
        output = next(n for n in gm.graph.nodes if n.op == "output")
        logits = output.args[0][0]
        output.args = ((logits, *(outputs[e.name] for e in entries)),)
        for attr in state.kv_observers.values():
            delattr(gm, attr)
        state.kv_observers = {}
        state.cache = layout.replace(entries=entries)
        gm.graph.eliminate_dead_code()
        return PassResult(gm, modified=True, stats={"entries": len(entries), "dtype": spec.dtype,
                                                    "dynamic": spec.dynamic})

    def _constant(self, name: str, value: torch.Tensor) -> fx.Node:
        self._gm.register_buffer(name, value.detach().clone())
        with self._gm.graph.inserting_before(next(n for n in self._gm.graph.nodes if n.op != "placeholder")):
            node = self._gm.graph.get_attr(name)
        node.meta[FROM_PASS] = self.name
        return node

    def _call(self, op, args, val=None) -> fx.Node:
        node = self._gm.graph.call_function(op, args)
        node.meta[FROM_PASS] = self.name
        if val is not None:
            node.meta["val"] = val
        return node

    def _static(self, entry, past, cat, written, spec: QuantSpec, state):
        attr = state.kv_observers.get(entry.name)
        if attr is None:
            raise ConvertError(f"the KV cache entry {entry.name!r} has no observer; prepare the model with this "
                               "kv_cache spec")
        observer = self._gm.get_submodule(attr)
        if not observer.calibrated:
            raise ConvertError("the static KV cache needs calibration: call qc.calibrate(prepared, batches) with "
                               f"representative text first (observer {attr} saw no data)")
        x = written.args[0]  # the observer call's input
        scale, zero_point = observer.calculate_qparams()
        base = f"qc_kv_{entry.name}"
        s, z = self._constant(base + "_scale", scale), self._constant(base + "_zero_point", zero_point)
        axis, block = scale_layout(spec)
        dtype = storage_dtype(spec.dtype)
        val = x.meta.get("val")
        with self._gm.graph.inserting_before(cat):
            codes = self._call(qops.quantize.default, (x, s, z, axis, block, spec.qmin, spec.qmax, dtype),
                               val.to(dtype) if val is not None else None)
            new = self._call(qops.dequantize.default, (codes, s, z, axis, block, torch.float32), val)
            old = self._call(qops.dequantize.default, (past, s, z, axis, block, torch.float32), past.meta.get("val"))
        cat.args = ([old, new], *cat.args[1:])
        written.replace_all_uses_with(new)
        self._gm.graph.erase_node(written)
        past.meta["val"] = past.meta["val"].to(dtype)
        state.qparams.append(dict(tensor=entry.name, kind="kv cache", spec=spec, scale=scale, zero_point=zero_point,
                                  observed=(float(observer.seen_min), float(observer.seen_max)),
                                  chosen=tuple(float(t) for t in (observer.range()[0].min(), observer.range()[1].max())),
                                  members=[("out", x.name)]))
        return [(CacheEntry(entry.name, entry.layer, entry.role, dtype, entry.last_dim), codes)]

    def _dynamic(self, entry, past, cat, written, spec: QuantSpec):
        """Per token and head: scale = amax over head_dim / qmax, computed as the token is written."""
        dtype = storage_dtype(spec.dtype)
        head_dim = entry.last_dim
        val = written.meta.get("val")
        zero = self._constant(f"qc_kv_{entry.name}_zero_point", torch.zeros((), dtype=torch.int32))
        with self._gm.graph.inserting_after(next(n for n in self._gm.graph.nodes if n.name == entry.name)):
            past_scale = self._gm.graph.placeholder(entry.name + "_scale")
        past_val = past.meta.get("val")
        if past_val is not None:
            past_scale.meta["val"] = past_val.new_empty((*past_val.shape[:-1], 1), dtype=torch.float32)
        with self._gm.graph.inserting_before(cat):
            qp = self._call(qops.choose_qparams_per_token.default, (written, spec.qmin, spec.qmax))
            s = self._call(operator.getitem, (qp, 0))
            z = self._call(operator.getitem, (qp, 1))
            if val is not None:
                s.meta["val"] = val.new_empty((*val.shape[:-1], 1), dtype=torch.float32)
            codes = self._call(qops.quantize.default, (written, s, z, -1, head_dim, spec.qmin, spec.qmax, dtype),
                               val.to(dtype) if val is not None else None)
            new = self._call(qops.dequantize.default, (codes, s, z, -1, head_dim, torch.float32), val)
            old = self._call(qops.dequantize.default, (past, past_scale, zero, -1, head_dim, torch.float32), past_val)
        cat.args = ([old, new], *cat.args[1:])
        if past_val is not None:
            past.meta["val"] = past_val.to(dtype)
        scale_entry = CacheEntry(entry.name + "_scale", entry.layer, entry.role + "_scale", torch.float32, 1)
        return [(CacheEntry(entry.name, entry.layer, entry.role, dtype, head_dim), codes), (scale_entry, s)]
