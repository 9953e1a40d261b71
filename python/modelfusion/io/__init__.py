"""Checkpoint I/O: lazy readers and an atomic, streamed, sharded safetensors writer."""

from .checkpoint import Checkpoint, TensorInfo, read_header
from .writer import OutputTensor, ShardWriter, copy_model_files, plan_shards, save_model, save_tensors, write_index

__all__ = [
    "Checkpoint",
    "TensorInfo",
    "read_header",
    "OutputTensor",
    "ShardWriter",
    "copy_model_files",
    "plan_shards",
    "save_model",
    "save_tensors",
    "write_index",
]
