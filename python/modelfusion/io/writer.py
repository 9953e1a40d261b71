"""Sharded safetensors output, written atomically and streamed one tensor at a time.

A shard's header is known before its data (names, dtypes, shapes come from the plan), so each
shard is written as its tensors are produced and no shard is ever held in memory whole (the
``safetensors`` library can only save a complete dict). Each shard goes to ``<name>.partial``,
is fsynced and renamed; ``model.safetensors.index.json`` is written the same way, last: an output
directory is complete only when its index exists.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import shutil
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OutputError
from .checkpoint import DTYPE_CODES, SAFETENSORS_INDEX

PARTIAL = ".partial"
STAGE_BYTES = 16 * 2**20  # each of the two staging buffers: a multiple of any block size O_DIRECT asks for
BLOCK_BYTES = 4096
DIRECT_BYTES = 2**20  # a tensor at least this large, block-aligned in memory, is written without a copy
# the tokenizer files a model directory may hold
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
MODEL_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


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
    # spaces (the format's padding) until the data starts on a block: a tensor whose bytes are
    # block-aligned in memory can then go to an O_DIRECT file straight from there (ShardWriter.write)
    raw += b" " * (-(8 + len(raw)) % BLOCK_BYTES)
    return struct.pack("<Q", len(raw)) + raw


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Writes one shard: ``write`` each planned tensor in order, then ``commit``; ``abort`` removes it.

    Bytes go through aligned staging buffers to a file opened with ``O_DIRECT`` where the file
    system allows it: the disk reads the buffer itself, with no copy into the page cache. Through
    the page cache, writing 2.2 GB cost 5.5 s of CPU on the 2-core VM we measure on (0.37 GB/s);
    with O_DIRECT 0.3–0.5 s (1.5–2.4 GB/s). Two buffers take turns: one is written to the disk by
    a helper thread while the caller fills the other, so copying tensors in (and the page faults of
    reading them from a mapped checkpoint) overlaps the disk's time. The last block is padded and
    the file truncated. A tensor of ``DIRECT_BYTES`` or more whose memory starts on a block (the
    pipeline's output buffers do) while the file's end is on one is written from its own memory,
    with no copy (``write``'s ``on_written`` says when that memory is free again)."""

    def __init__(self, path: Path, tensors: Sequence[OutputTensor]):
        self.path, self.tensors, self._next = Path(path), list(tensors), 0
        self._partial = self.path.with_name(self.path.name + PARTIAL)
        self._stages = [mmap.mmap(-1, STAGE_BYTES) for _ in range(2)]  # page-aligned, as O_DIRECT needs
        self._views = [memoryview(stage).cast("B") for stage in self._stages]
        self._pending: list[Future | None] = [None, None]
        self._direct: list[Future] = []  # tensors being written from their own memory
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._current = self._filled = self._offset = 0
        self._fd = None
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            try:
                self._fd = os.open(self._partial, flags | getattr(os, "O_DIRECT", 0), 0o644)
            except OSError:  # tmpfs and some others refuse O_DIRECT
                self._fd = os.open(self._partial, flags, 0o644)
            self._append(memoryview(_header(self.tensors)))
        except OSError as e:
            self.abort()
            raise OutputError(f"{self._partial}: cannot write: {e}") from e

    def _append(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            n = min(len(data) - done, STAGE_BYTES - self._filled)
            self._views[self._current][self._filled : self._filled + n] = data[done : done + n]
            self._filled += n
            done += n
            if self._filled == STAGE_BYTES:
                self._flush(STAGE_BYTES)

    def _flush(self, nbytes: int) -> None:
        """Hand the current buffer's first ``nbytes`` to the disk thread and take the other buffer,
        once the disk is done with it (its error, if any, raised here)."""
        data = self._views[self._current][:nbytes]
        self._pending[self._current] = self._disk.submit(self._pwrite, data, self._offset)
        self._offset += self._filled
        self._current, self._filled = 1 - self._current, 0
        self._wait(self._current)

    def _wait(self, stage: int) -> None:
        pending, self._pending[stage] = self._pending[stage], None
        if pending is not None:
            pending.result()

    def _pwrite(self, data: memoryview, offset: int) -> None:
        with data:  # released when written or failed: an error's traceback must not pin the buffer
            try:
                written = os.pwrite(self._fd, data, offset)
            except OSError as e:
                flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                if e.errno != errno.EINVAL or not flags & getattr(os, "O_DIRECT", 0):
                    raise
                # O_DIRECT refuses what it cannot write whole (a size limit cutting the block): retry buffered
                fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                written = os.pwrite(self._fd, data, offset)
            if written < len(data):  # regular files write short only when out of room
                short = f"short write ({written} of {len(data)} bytes): disk full or file size limit"
                raise OSError(errno.ENOSPC, short)

    def _write_direct(self, data: memoryview, offset: int, on_written: Callable[[], None] | None) -> None:
        self._pwrite(data, offset)
        if on_written is not None:
            on_written()

    def write(self, tensor: torch.Tensor, on_written: Callable[[], None] | None = None) -> None:
        """Append ``tensor``. Without ``on_written`` the tensor's memory is free for reuse when this
        returns; with it, when ``on_written()`` is called (maybe later, from the disk's thread)."""
        expected = self.tensors[self._next]
        if tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
            raise OutputError(
                f"{self.path.name}: tensor {expected.name!r} expected {expected.dtype} {expected.shape}, "
                f"got {tensor.dtype} {tuple(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        view = memoryview(data).cast("B")
        try:
            for done in [f for f in self._direct if f.done()]:  # a failed write is raised here
                self._direct.remove(done)
                done.result()
            direct = len(view) // BLOCK_BYTES * BLOCK_BYTES
            if direct >= DIRECT_BYTES and data.ctypes.data % BLOCK_BYTES == 0 and self._filled % BLOCK_BYTES == 0:
                if self._filled:
                    self._flush(self._filled)
                self._append(view[direct:])  # the tail, if any, is copied into the stage now
                written = self._disk.submit(self._write_direct, view[:direct], self._offset, on_written)
                self._offset += direct
                if on_written is None:
                    written.result()
                else:
                    self._direct.append(written)
            else:
                self._append(view)
                if on_written is not None:
                    on_written()
        except OSError as e:
            self.abort()
            raise OutputError(f"{self._partial}: cannot write tensor {expected.name!r}: {e}") from e
        self._next += 1

    def commit(self) -> int:
        """Write the last block, fsync and rename into place; returns the file's size."""
        if self._next != len(self.tensors):
            raise OutputError(f"{self.path.name}: {len(self.tensors) - self._next} planned tensors were not written")
        try:
            size = self._offset + self._filled
            if self._filled:
                padded = -(-self._filled // BLOCK_BYTES) * BLOCK_BYTES
                self._views[self._current][self._filled : padded] = bytes(padded - self._filled)
                self._flush(padded)
            self._wait(0)
            self._wait(1)
            for written in self._direct:
                written.result()
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
            self._close()
            os.replace(self._partial, self.path)
            _fsync_dir(self.path.parent)
        except OSError as e:
            self.abort()
            raise OutputError(f"{self._partial}: cannot commit: {e}") from e
        return size

    def _close(self) -> None:
        self._disk.shutdown(wait=True)  # a write in flight finishes before its buffer goes
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for view, stage in zip(self._views, self._stages, strict=True):
            if not stage.closed:
                view.release()
                stage.close()

    def abort(self) -> None:
        self._close()
        self._partial.unlink(missing_ok=True)


def write_json_atomic(path: Path, content: dict) -> None:
    write_text_atomic(path, json.dumps(content, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` to ``path`` through ``path.partial``, fsynced and renamed: never a half-written file."""
    partial = path.with_name(path.name + PARTIAL)
    try:
        with open(partial, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
        _fsync_dir(path.parent)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write: {e}") from e


def write_index(directory: Path, shards: Sequence[Sequence[OutputTensor]], **metadata) -> None:
    """The HF index of ``shards``: written last, it marks the directory complete. ``metadata`` (strings)
    joins ``total_size`` in its metadata."""
    weight_map = {t.name: shard_name(i, len(shards)) for i, shard in enumerate(shards) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    write_json_atomic(directory / SAFETENSORS_INDEX, index)


def copy_model_files(source: Path, directory: Path, config_overrides: dict | None = None) -> list[str]:
    """Copy config, tokenizer and generation files of the model at ``source``; returns the names copied.
    ``config_overrides`` replace keys of ``config.json``; a None value removes the key."""
    copied = []
    for name in MODEL_FILES:
        src = source / name
        if not src.is_file():
            continue
        try:
            if name == "config.json" and config_overrides:
                config = {**json.loads(src.read_text()), **config_overrides}
                write_json_atomic(directory / name, {k: v for k, v in config.items() if v is not None})
            else:
                shutil.copyfile(src, directory / name)
        except OSError as e:
            raise OutputError(f"{directory / name}: cannot copy from {src}: {e}") from e
        copied.append(name)
    return copied


def save_model(
    directory: Path, tensors: dict[str, torch.Tensor], config: dict | None = None, max_shard_size: int = 5 * 10**9
) -> None:
    """Write a state dict as an HF model directory: sharded safetensors, index, and ``config``
    as ``config.json`` when given."""
    outputs = [OutputTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    save_tensors(directory, outputs, tensors.__getitem__, config, max_shard_size)


def save_tensors(
    directory: Path,
    outputs: list[OutputTensor],
    tensor: Callable[[str], torch.Tensor],
    config: dict | None = None,
    max_shard_size: int = 5 * 10**9,
) -> None:
    """:func:`save_model` for tensors made one at a time: ``tensor(name)`` is called once per output,
    in file order, so memory holds one tensor however large the model."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(outputs, max_shard_size)
    for i, shard in enumerate(shards):
        writer = ShardWriter(directory / shard_name(i, len(shards)), shard)
        for o in shard:
            writer.write(tensor(o.name))
        writer.commit()
    write_index(directory, shards)
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config, indent=2))
