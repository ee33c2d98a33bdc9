"""Materialize the reference QDQ graph.

- every observer call becomes `dequantize(quantize(x, s, z), s, z)` with the group's constant
  qparams (buffers on the GraphModule);
- every annotated weight is stored as an integer tensor plus scales and feeds its op through one
  `dequantize`; the float weight is dropped when nothing else uses it;
- every dynamic input edge becomes `choose_qparams_per_token -> quantize -> dequantize`, or, per block
  along the last dim, `choose_qparams_per_block -> quantize (code scale) -> dequantize (stored scale)`.

A weight read by several annotated ops (an embedding table tied to the LM head) is quantized once,
with one spec, and every reader gets the same dequantize.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..errors import ConvertError
from .remove_redundant_casts import is_float_cast
from ..graph import ANNOTATION, FROM_PASS, GROUP, STATE, get_param
from ..graph.annotation import get_arg, set_arg
from ..numerics import quantize_stochastic_math, quantize_weight, stochastic_generator, storage_dtype, stored_qparams
from ..observers import weight_qparams, weight_range
from ..spec import PerGroup, QuantSpec, scale_layout
from .base import Pass, PassResult
from .insert_observers import OBSERVER_PREFIX

qops = torch.ops.qcompile



def encode_weight(w: torch.Tensor, spec: QuantSpec, name: str, fixed=None):
    """(codes, stored scale, stored zero point, axis, block size) of weight `name`: its spec's own
    ranges, or the qparams an algorithm `fixed` (whose codes it owns: rounded to nearest then);
    stochastic rounding seeded per weight name."""
    scale, zp = (t.detach().clone() for t in fixed) if fixed is not None else weight_qparams(w, spec)
    axis, block = scale_layout(spec, w)
    if spec.rounding == "stochastic" and fixed is None:
        q = quantize_stochastic_math(w, scale, zp, axis, block, spec.qmin, spec.qmax, storage_dtype(spec.dtype),
                                     stochastic_generator(spec.seed, name))
    else:
        q = quantize_weight(w, scale, zp, axis, block, spec.qmin, spec.qmax, storage_dtype(spec.dtype), spec.rounding)
    scale, zp = stored_qparams(scale, zp, spec)
    return q, scale, zp, axis, block


def _weight_read(node: fx.Node, pos) -> tuple[fx.Node | None, fx.Node]:
    """(the float cast between them or None, the weight's node) for the weight `node` reads at `pos`."""
    w_node = get_arg(node, pos)
    if w_node.op == "call_function" and is_float_cast(w_node):
        # QAT with precision="bf16"/"fp16": the FP32 weight is cast for the op; dequantize feeds the cast
        return w_node, w_node.args[0]
    return None, w_node


def weights_to_quantize(gm: fx.GraphModule) -> list[torch.Tensor]:
    """The float tensors ConvertToQDQ will read and replace by codes (only read, never written)."""
    found = {}
    for node in gm.graph.nodes:
        ann = node.meta.get(ANNOTATION)
        if ann is None or ann.weight is None:
            continue
        _, w_node = _weight_read(node, ann.weight[0])
        if w_node.op == "get_attr":
            t = get_param(gm, w_node)
            found[id(t)] = t
    return list(found.values())


class ConvertToQDQ(Pass):
    name = "convert_qdq"

    def call(self, gm: fx.GraphModule) -> PassResult:
        state = gm.meta[STATE]
        self._graph = gm.graph
        stats = {"activation qdq": 0, "weights": 0, "dynamic qdq": 0}
        self._weights_done: dict[str, tuple[fx.Node, QuantSpec]] = {}  # tied weights: target -> (dequantize, spec)
        specs = {g.id: g for g in state.groups}
        group_qparams = {}
        for gid, attr in state.observers.items():
            obs = gm.get_submodule(attr)
            if not obs.calibrated:
                raise ConvertError("convert() needs calibration first: call qc.calibrate(prepared, batches) "
                                   f"with representative inputs (observer {attr} saw no data)")
            scale, zp = obs.calculate_qparams()
            s_node, z_node = self._constant(gm, f"qc_act{gid}_scale", scale), self._constant(gm, f"qc_act{gid}_zero_point", zp)
            group_qparams[gid] = (s_node, z_node)
            lo, hi = obs.range()
            state.qparams.append(dict(tensor=f"group {gid}", kind="activation", spec=specs[gid].spec, scale=scale,
                                      zero_point=zp, observed=(float(obs.seen_min), float(obs.seen_max)),
                                      chosen=(float(lo.min()), float(hi.max())), members=specs[gid].members))
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and node.target.startswith(OBSERVER_PREFIX):
                spec = specs[node.meta[GROUP]].spec
                s_node, z_node = group_qparams[node.meta[GROUP]]
                with gm.graph.inserting_before(node):
                    dq = self._qdq(node.args[0], s_node, z_node, spec, node)
                node.replace_all_uses_with(dq)
                gm.graph.erase_node(node)
                stats["activation qdq"] += 1
        for attr in state.observers.values():
            delattr(gm, attr)
        for node in list(gm.graph.nodes):
            ann = node.meta.get(ANNOTATION)
            if ann is None:
                continue
            if ann.weight is not None:
                self._quantize_weight(gm, node, *ann.weight, state)
                stats["weights"] += 1
            for pos, spec in ann.inputs.items():
                if getattr(spec, "dynamic", False):
                    self._dynamic_qdq(gm, node, pos, spec)
                    stats["dynamic qdq"] += 1
        gm.graph.eliminate_dead_code()
        self._drop_unused_attributes(gm)
        return PassResult(gm, modified=True, stats=stats)

    def _constant(self, gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
        gm.register_buffer(name, value.detach().clone())
        with gm.graph.inserting_before(next(n for n in gm.graph.nodes if n.op != "get_attr")):
            node = gm.graph.get_attr(name)
        node.meta[FROM_PASS] = self.name
        return node

    def _qdq(self, x: fx.Node, s_node, z_node, spec: QuantSpec, origin: fx.Node, stored_s_node=None) -> fx.Node:
        """quantize(x, s) -> dequantize(q, s'), with s' = s unless a separate stored scale is given."""
        axis, block = scale_layout(spec, x.meta.get("val"))
        dtype = storage_dtype(spec.dtype)
        g = self._graph
        q = g.call_function(qops.quantize.default, (x, s_node, z_node, axis, block, spec.qmin, spec.qmax, dtype))
        dq = g.call_function(qops.dequantize.default, (q, stored_s_node if stored_s_node is not None else s_node,
                                                       z_node, axis, block, torch.float32))
        for n in (q, dq):
            n.meta.update({FROM_PASS: self.name, GROUP: origin.meta.get(GROUP)})
            if "nn_module_stack" in origin.meta:
                n.meta["nn_module_stack"] = origin.meta["nn_module_stack"]
        val = x.meta.get("val")
        if isinstance(val, torch.Tensor):
            q.meta["val"], dq.meta["val"] = val.to(dtype), val
        return dq

    def _quantize_weight(self, gm: fx.GraphModule, node: fx.Node, pos, spec: QuantSpec, state) -> None:
        cast, w_node = _weight_read(node, pos)
        if w_node.target in self._weights_done:  # tied: quantized for an earlier reader already
            dq, first_spec = self._weights_done[w_node.target]
            if first_spec != spec:
                raise ConvertError(f"the weight {w_node.target} is read by {node.name} and an earlier op with two "
                                   f"different specs ({first_spec.dtype} and {spec.dtype}, ...); a tied weight has one "
                                   "quantized form: give both modules the same recipe (Recipe.overrides)")
            if cast is not None:
                cast.replace_input_with(w_node, dq)
            else:
                set_arg(node, pos, dq)
            for row in state.qparams:
                if row["tensor"] == w_node.target and row["kind"] == "weight":
                    row["members"].append(("in", node.name, pos))
            return
        w = get_param(gm, w_node).detach()
        if spec.dtype == "nf4":
            return self._quantize_weight_nf4(gm, node, pos, w_node, w, spec, state)
        fixed = state.weight_qparams.get(w_node.target)
        q, scale, zp, axis, block = encode_weight(w, spec, w_node.target, fixed)
        base = "qc_w_" + w_node.target.replace(".", "_")
        q_node = self._constant(gm, base, q)
        s_node, z_node = self._constant(gm, base + "_scale", scale), self._constant(gm, base + "_zero_point", zp)
        with gm.graph.inserting_before(cast or node):
            dq = gm.graph.call_function(qops.dequantize.default, (q_node, s_node, z_node, axis, block, w.dtype))
        dq.meta.update({FROM_PASS: self.name, "val": w_node.meta.get("val")})
        if cast is not None:
            cast.replace_input_with(w_node, dq)
        else:
            set_arg(node, pos, dq)
        self._weights_done[w_node.target] = (dq, spec)
        lo, hi = weight_range(w, spec)
        state.qparams.append(dict(tensor=w_node.target, kind="weight", spec=spec, scale=scale, zero_point=zp,
                                  observed=(float(w.min()), float(w.max())), chosen=(float(lo.min()), float(hi.max())),
                                  members=[("in", node.name, pos)]))

    def _quantize_weight_nf4(self, gm, node, pos, w_node, w, spec: QuantSpec, state) -> None:
        """NF4 storage (packed codes, int8 absmax codes, their scales and mean) -> dequantize_nf4 -> op."""
        from ..algorithms.nf4 import quantize_nf4

        t = quantize_nf4(w, block_size=spec.granularity.size)
        base = "qc_w_" + w_node.target.replace(".", "_")
        args = [self._constant(gm, base + suffix, value) for suffix, value in (
            ("_nf4", t.packed), ("_absmax_codes", t.absmax_codes), ("_absmax_scale", t.absmax_scale),
            ("_absmax_mean", t.absmax_mean))]
        with gm.graph.inserting_before(node):
            dq = gm.graph.call_function(qops.dequantize_nf4.default,
                                        (*args, list(w.shape), t.block_size, t.absmax_block, w.dtype))
        dq.meta.update({FROM_PASS: self.name, "val": w_node.meta.get("val")})
        set_arg(node, pos, dq)
        absmax = t.dequantize_absmax()
        state.qparams.append(dict(tensor=w_node.target, kind="weight", spec=spec, scale=absmax,
                                  zero_point=torch.zeros(1, dtype=torch.int32),
                                  observed=(float(w.min()), float(w.max())),
                                  chosen=(-float(absmax.max()), float(absmax.max())), members=[("in", node.name, pos)]))

    def _dynamic_qdq(self, gm: fx.GraphModule, node: fx.Node, pos, spec: QuantSpec) -> None:
        x = get_arg(node, pos)
        with gm.graph.inserting_before(node):
            if isinstance(spec.granularity, PerGroup):
                qp = gm.graph.call_function(qops.choose_qparams_per_block.default, (
                    x, spec.granularity.size, spec.qmin, spec.qmax, spec.scale_dtype == "float16", spec.fp16_first))
                s, stored, z = (gm.graph.call_function(operator.getitem, (qp, i)) for i in range(3))
                dq = self._qdq(x, s, z, spec, node, stored_s_node=stored)
                made = (qp, s, stored, z)
            else:
                qp = gm.graph.call_function(qops.choose_qparams_per_token.default, (x, spec.qmin, spec.qmax))
                s = gm.graph.call_function(operator.getitem, (qp, 0))
                z = gm.graph.call_function(operator.getitem, (qp, 1))
                dq = self._qdq(x, s, z, spec, node)
                made = (qp, s, z)
        for n in made:
            n.meta[FROM_PASS] = self.name
        set_arg(node, pos, dq)

    @staticmethod
    def _drop_unused_attributes(gm: fx.GraphModule) -> None:
        """Free float weights that every user now reads in integer form."""
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
            if name not in used and not name.startswith("qc_"):
                owner, _, attr = name.rpartition(".")
                mod = gm.get_submodule(owner) if owner else gm
                if attr in mod._parameters:
                    del mod._parameters[attr]
                elif attr in mod._buffers:
                    del mod._buffers[attr]

