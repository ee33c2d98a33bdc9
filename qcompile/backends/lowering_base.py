"""The lowering framework the backends share: a rule is one QDQ pattern -> one kernel.

A `LoweringRule` has a `match(node) -> dict` (the structural pattern around one anchor node, or a
dict with only 'why' naming the first mismatch), a `check(gm, match) -> str | None` (None when the
rule applies, else the reason it does not) and a `rewrite(gm, match) -> Node`. `LoweringPass` applies
the rules node by node and fills a `LoweringReport` (what was lowered to which kernel, and why the
rest was not); the report is stored in `GraphModule.meta[REPORT]`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from ..passes.base import Pass, PassResult

REPORT = "qcompile_lowering_report"   # GraphModule.meta key of the LoweringReport


@dataclass
class LoweringReport:
    lowered: list[tuple[str, str]] = field(default_factory=list)       # (node name, kernel)
    not_lowered: list[tuple[str, str]] = field(default_factory=list)   # (node name, reason)

    def __str__(self) -> str:
        rows = [f"lowered     {n:<40} -> {k}" for n, k in self.lowered]
        rows += [f"not lowered {n:<40} : {r}" for n, r in self.not_lowered]
        return "\n".join(rows) or "no candidate nodes"


class LoweringRule:
    """One QDQ pattern -> one kernel. Subclasses set `anchors` (op targets) and `kernel`; rules of a
    later `phase` see the graph after every earlier phase has rewritten it (and dead code is gone),
    so a rule that consumes a quantize/dequantize pattern runs before one that rewrites its parts."""
    anchors: set = set()
    kernel: str = ""
    phase: int = 0

    def match(self, node: fx.Node) -> dict | None:
        """The pattern's parts, {"why": reason} when it is this rule's pattern but cannot be
        lowered (reported), or None when the node is not this rule's concern (not reported)."""
        raise NotImplementedError

    def check(self, gm: fx.GraphModule, m: dict) -> str | None:
        return None

    def rewrite(self, gm: fx.GraphModule, m: dict) -> fx.Node:
        raise NotImplementedError


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _free_name(gm: fx.GraphModule, name: str) -> str:
    cand, i = name, 0
    while hasattr(gm, cand):
        i += 1
        cand = f"{name}_{i}"
    return cand


class LoweringPass(Pass):
    """Applies lowering rules node by node: the first rule whose match and check pass rewrites the
    node; otherwise the report records every rule's reason. Shared by the torch and triton backends."""

    name = "lower"

    def __init__(self, rules: list[LoweringRule]):
        self.rules = list(rules)
        self.report = LoweringReport()

    def call(self, gm: fx.GraphModule) -> PassResult:
        stats: dict = {}
        for phase in sorted({r.phase for r in self.rules}):
            self._sweep(gm, [r for r in self.rules if r.phase == phase], stats)
            gm.graph.eliminate_dead_code()
        # a node an early phase refused and a later one lowered is lowered
        done = {name for name, _ in self.report.lowered}
        self.report.not_lowered = [(n, why) for n, why in self.report.not_lowered if n not in done]
        _drop_unused_buffers(gm)
        gm.recompile()
        return PassResult(gm, modified=bool(self.report.lowered), stats=stats)

    def _sweep(self, gm: fx.GraphModule, phase_rules: list[LoweringRule], stats: dict) -> None:
        for node in list(gm.graph.nodes):
            if getattr(node, "_erased", False):   # absorbed into an earlier rewrite (an epilogue)
                continue
            rules = [r for r in phase_rules if node.op == "call_function" and node.target in r.anchors]
            if not rules:
                continue
            reasons = []
            name = node.name
            for rule in rules:
                m = rule.match(node)
                if m is None:            # not this rule's pattern at all: nothing to report
                    continue
                why = m["why"] if "why" in m else rule.check(gm, m)
                if why is None:
                    rule.rewrite(gm, m)
                    kernel = m.get("kernel", rule.kernel)
                    self.report.lowered.append((name, kernel))
                    stats[kernel] = stats.get(kernel, 0) + 1
                    break
                reasons.append(f"{type(rule).__name__}: {why}")
            else:
                if reasons:
                    self.report.not_lowered.append((name, "; ".join(reasons)))
                    stats["not lowered"] = stats.get("not lowered", 0) + 1


def _drop_unused_buffers(gm: fx.GraphModule) -> None:
    """Free the [N, K] integer weights (and qparams) that only the lowered patterns read."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()):
        if name.startswith("qc_") and name not in used and "." not in name:
            del gm._buffers[name]
