"""Graph helpers shared by passes: meta keys, op families, node predicates and provenance."""
from .meta import ANNOTATION, FROM_PASS, GROUP, STATE
from .nodes import (
    ACTIVATIONS, ADD, AVG_POOL, CAT, CONV, EMBEDDING, LINEAR, MATMUL, MUL, POOL, RESHAPE, SHARE_WITH_INPUT, WEIGHTED,
    activation_name, get_param, held_alone, is_op, module_name, reaches, set_param, tensor_val,
)
