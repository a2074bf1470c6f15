"""Checkpoint tools: ZeRO consolidation, export, split/merge, AF1 import/export (see docs/checkpoints.md)."""
from .integrity import CheckpointError, parse_size, sha256_file
from .load import load_state_dict, open_checkpoint
from .merge import merge
from .source import TensorRef, TensorSource, from_state_dict
from .split import write_sharded

__all__ = ["CheckpointError", "TensorRef", "TensorSource", "from_state_dict", "load_state_dict", "merge",
           "open_checkpoint", "parse_size", "sha256_file", "write_sharded"]
