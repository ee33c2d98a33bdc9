"""Pass, PassResult and the PassManager that runs, verifies, times and dumps passes.

A pass mutates the GraphModule it is given and says honestly whether it changed anything. The
manager recompiles and verifies the graph after every pass, records a `PassRecord` per pass (time,
stats, node-count delta), and with a dump directory (argument or QCOMPILE_DUMP_DIR) writes the
graph after each pass as `NNN_<pass>.txt` plus `NNN_<pass>.diff` when the code changed.
A pass that raises is reported as a PassError naming it and the passes that ran before it.
"""
from __future__ import annotations

import difflib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from torch import fx

from ..errors import PassError, QCompileError


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    stats: dict = field(default_factory=dict)


class Pass:
    name: str = "pass"

    def call(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        result = self.call(gm)
        if result.graph_module is not gm:
            raise PassError(f"pass '{self.name}' is in-place but returned a different GraphModule")
        return result


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    stats: dict
    nodes_before: Counter
    nodes_after: Counter

    def changes(self) -> str:
        """Op-count delta, e.g. '+2 qcompile.quantize, -1 aten.batch_norm'."""
        keys = sorted(set(self.nodes_before) | set(self.nodes_after))
        parts = [f"{self.nodes_after[k] - self.nodes_before[k]:+d} {k}" for k in keys
                 if self.nodes_after[k] != self.nodes_before[k]]
        return ", ".join(parts) or "no op-count change"


def op_counts(gm: fx.GraphModule) -> Counter:
    counts = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_function":
            counts[_op_name(n.target)] += 1
        elif n.op == "call_module":
            counts[type(gm.get_submodule(n.target)).__name__] += 1
    return counts


def _op_name(target) -> str:
    name = getattr(target, "name", None)
    if callable(name):  # OpOverload: 'aten::linear' -> 'aten.linear'
        return name().replace("::", ".").split(".default")[0]
    return getattr(target, "__name__", str(target))


def verify_graph(gm: fx.GraphModule) -> None:
    """Structural checks that every stage must pass."""
    gm.graph.lint()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            owner, _, attr = n.target.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            if not hasattr(mod, attr):
                raise PassError(f"get_attr node {n.name} points at missing attribute {n.target}")
        if n.op == "call_module":
            gm.get_submodule(n.target)


class PassManager:
    def __init__(self, passes: list[Pass], dump_dir: str | os.PathLike | None = None, verify: bool = True,
                 stage: str = "passes"):
        self.passes = list(passes)
        dump_dir = dump_dir if dump_dir is not None else os.environ.get("QCOMPILE_DUMP_DIR")
        self.dump_dir = Path(dump_dir) / stage if dump_dir else None
        self.verify = verify
        self.records: list[PassRecord] = []

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        if self.dump_dir:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            self._dump(0, "input", gm, previous=None)
        for i, p in enumerate(self.passes, start=1):
            before_code, before_counts = gm.code, op_counts(gm)
            start = time.perf_counter()
            try:
                result = p(gm)
                gm.recompile()
                if self.verify:
                    verify_graph(gm)
            except PassError as e:
                ran = [r.name for r in self.records]
                raise PassError(f"pass '{p.name}' failed after the passes {ran}: {e}") from e
            except QCompileError:
                raise  # a user-facing error raised inside a pass already says what to do
            except Exception as e:
                ran = [r.name for r in self.records]
                raise PassError(
                    f"pass '{p.name}' failed after the passes {ran}: {type(e).__name__}: {e}. "
                    f"Rerun with dump_dir=... (or QCOMPILE_DUMP_DIR) to see the graph each pass produced."
                ) from e
            self.records.append(PassRecord(p.name, time.perf_counter() - start, result.modified,
                                           dict(result.stats), before_counts, op_counts(gm)))
            if self.dump_dir:
                self._dump(i, p.name, gm, previous=before_code)
        return gm

    def _dump(self, index: int, name: str, gm: fx.GraphModule, previous: str | None) -> None:
        stem = self.dump_dir / f"{index:03d}_{name}"
        stem.with_suffix(".txt").write_text(gm.code + "\n\n" + str(gm.graph))
        if previous is not None and previous != gm.code:
            diff = difflib.unified_diff(previous.splitlines(), gm.code.splitlines(),
                                        "before", f"after {name}", lineterm="")
            stem.with_suffix(".diff").write_text("\n".join(diff) + "\n")
