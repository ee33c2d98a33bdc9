"""Keys qcompile writes into `node.meta` and `GraphModule.meta`."""

ANNOTATION = "qcompile_annotation"   # node.meta: the node's QAnnotation
GROUP = "qcompile_group"             # node.meta on observer / QDQ nodes: the sharing-group id
FROM_PASS = "qcompile_from_pass"     # node.meta on created nodes: the pass that made them
STATE = "qcompile"                   # GraphModule.meta: the QState of a prepared/quantized module
