"""The annotation a node carries between `annotate` and `insert_observers`.

Tensors are named by `TensorRef`s rather than fx.Node objects so annotations survive copies:
`("out", node_name)` is a node's output, `("in", consumer_name, pos)` is the edge into argument
`pos` of a consumer (`pos` is an int, or `(i, j)` for element j of a list argument like cat's).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from ..spec import QuantSpec, SharedSpec

ArgPos = Union[int, tuple]
TensorRef = tuple
Spec = Union[QuantSpec, SharedSpec]


@dataclass
class QAnnotation:
    inputs: dict = field(default_factory=dict)         # ArgPos -> Spec, activations only
    weight: tuple | None = None                         # (ArgPos, QuantSpec) of a get_attr weight
    output: Spec | None = None
    output_node: str | None = None                      # set when a fused activation's output is observed
    module: str = ""
    reason: str = ""                                    # why the node was annotated the way it was


def get_arg(node, pos: ArgPos):
    if isinstance(pos, tuple):
        return node.args[pos[0]][pos[1]]
    return node.args[pos]


def set_arg(node, pos: ArgPos, value) -> None:
    args = list(node.args)
    if isinstance(pos, tuple):
        inner = list(args[pos[0]])
        inner[pos[1]] = value
        args[pos[0]] = inner
    else:
        args[pos] = value
    node.args = tuple(args)
