"""Sharded safetensors output, written atomically and streamed one tensor at a time.

A shard's header is known before its data (names, dtypes, shapes come from the plan), so each
shard is written as its tensors are produced and no shard is ever held in memory whole (the
``safetensors`` library can only save a complete dict). Each shard goes to ``<name>.partial``,
is fsynced and renamed; ``model.safetensors.index.json`` is written the same way, last: an output
directory is complete only when its index exists.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OutputError
from .checkpoint import DTYPE_CODES, SAFETENSORS_INDEX

PARTIAL = ".partial"
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def plan_shards(tensors: Sequence[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Tensors in order, cut into shards of at most ``max_shard_size`` bytes (a bigger tensor gets its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _header(tensors: Sequence[OutputTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
    return struct.pack("<Q", len(raw)) + raw


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Writes one shard: ``write`` each planned tensor in order, then ``commit``; ``abort`` removes it."""

    def __init__(self, path: Path, tensors: Sequence[OutputTensor]):
        self.path, self.tensors, self._next = Path(path), list(tensors), 0
        self._partial = self.path.with_name(self.path.name + PARTIAL)
        try:
            self._file = open(self._partial, "wb")  # noqa: SIM115  (kept open across write() calls)
            self._file.write(_header(self.tensors))
        except OSError as e:
            self.abort()
            raise OutputError(f"{self._partial}: cannot write: {e}") from e

    def write(self, tensor: torch.Tensor) -> None:
        expected = self.tensors[self._next]
        if tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
            raise OutputError(
                f"{self.path.name}: tensor {expected.name!r} expected {expected.dtype} {expected.shape}, "
                f"got {tensor.dtype} {tuple(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        try:
            self._file.write(memoryview(data))
        except OSError as e:
            self.abort()
            raise OutputError(f"{self._partial}: cannot write tensor {expected.name!r}: {e}") from e
        self._next += 1

    def commit(self) -> int:
        """Flush, fsync and rename into place; returns the file's size."""
        if self._next != len(self.tensors):
            raise OutputError(f"{self.path.name}: {len(self.tensors) - self._next} planned tensors were not written")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._partial, self.path)
            _fsync_dir(self.path.parent)
        except OSError as e:
            self.abort()
            raise OutputError(f"{self._partial}: cannot commit: {e}") from e
        return self.path.stat().st_size

    def abort(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None and not file.closed:
            file.close()
        self._partial.unlink(missing_ok=True)


def write_json_atomic(path: Path, content: dict) -> None:
    partial = path.with_name(path.name + PARTIAL)
    try:
        with open(partial, "w") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
        _fsync_dir(path.parent)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write: {e}") from e


def write_index(directory: Path, shards: Sequence[Sequence[OutputTensor]]) -> None:
    """The HF index of ``shards``: written last, it marks the directory complete."""
    weight_map = {t.name: shard_name(i, len(shards)) for i, shard in enumerate(shards) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    write_json_atomic(directory / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def copy_model_files(source: Path, directory: Path, config_overrides: dict | None = None) -> list[str]:
    """Copy config, tokenizer and generation files of the model at ``source``; returns the names copied."""
    copied = []
    for name in MODEL_FILES:
        src = source / name
        if not src.is_file():
            continue
        try:
            if name == "config.json" and config_overrides:
                write_json_atomic(directory / name, {**json.loads(src.read_text()), **config_overrides})
            else:
                shutil.copyfile(src, directory / name)
        except OSError as e:
            raise OutputError(f"{directory / name}: cannot copy from {src}: {e}") from e
        copied.append(name)
    return copied
