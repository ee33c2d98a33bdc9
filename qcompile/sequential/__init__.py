"""Sequential (out-of-core) PTQ: quantize a model block by block, its weights read from disk."""
from .checkpoint import Checkpoint, open_checkpoint
from .driver import quantize_sequential
from .result import QuantizedCheckpoint

__all__ = ["quantize_sequential", "QuantizedCheckpoint", "Checkpoint", "open_checkpoint"]
