"""Lazy checkpoint readers: one ``.safetensors`` file, or an HF model directory (sharded with
``model.safetensors.index.json``, or single-file); PyTorch ``.bin`` only when asked for.

Safetensors headers are parsed and checked here (8-byte little-endian length, JSON, contiguous
data offsets that end exactly at the end of the file). Each tensor is mapped on its own
(``map``) or copied with ``pread`` (``read``). We do not map whole files, as ``safe_open`` does:
a mapped file's touched pages count in the process's RSS for as long as the file is mapped, which
would break the pipeline's memory budget (reading a 1 GiB file tensor by tensor through
``safe_open`` raised RSS by 1 GiB here).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, short_repr

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIXES = ("_scale_inv", "_scale")  # an FP8 weight's dequantization scale: weight * scale
MAX_HEADER_BYTES = 100 * 2**20
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python names it from 3.13
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _populate(address: int, length: int) -> None:
    """Map a file range's page-cache pages in now (``madvise(MADV_POPULATE_READ)``), through ctypes,
    which releases the GIL: ``mmap.madvise`` would hold it for the whole call and stall the merge.
    Before Linux 5.14 the call fails and pages fault in on first use instead."""
    _LIBC.madvise(address, length, MADV_POPULATE_READ)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``file`` and the byte range [offset, offset + nbytes)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int
    scale: TensorInfo | None = None  # FP8 weights: the float scale (per tensor, row or block) read beside
    block: tuple[int, ...] | None = None  # the scale's block shape, where it is blocked
    lora: LoraDelta | None = None  # a LoRA adapter's update, added as the tensor is read

    @property
    def dequantized_nbytes(self) -> int:
        """Bytes of the float32 tensors this one becomes when read (0 when it is read as stored):
        the float32 weight, and with a LoRA update its product and factors."""
        if self.lora is not None:
            return _numel(self.shape) * 8 + self.lora.a.nbytes + self.lora.b.nbytes
        return _numel(self.shape) * 4 if self.scale is not None else 0

    @property
    def converted(self) -> bool:
        """Read as something other than its stored bytes (dequantized, or a LoRA update added)."""
        return self.scale is not None or self.lora is not None


@dataclass(frozen=True)
class LoraDelta:
    """W + scale · B·A (transposed with ``transpose``: GPT-2's Conv1D, embeddings)."""

    a: TensorInfo
    b: TensorInfo
    scale: float
    transpose: bool = False

    def apply(self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        product = b.to(torch.float32) @ a.to(torch.float32)
        return weight.to(torch.float32).add_(product.T if self.transpose else product, alpha=self.scale)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, in data order; CheckpointError names the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated: {size} bytes, no safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: header length {length} exceeds the file ({size} bytes): truncated")
            header = json.loads(f.read(length))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # a 200k-deep header recurses
        raise CheckpointError(f"{path}: corrupt safetensors header: {short_repr(str(e), 200)}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: expected a JSON object")
    header.pop("__metadata__", None)
    data_start, tensors, end = 8 + length, [], 0
    for name, entry in header.items():
        try:
            code = entry["dtype"]
            shape = tuple(_dim(d) for d in entry["shape"])
            begin, stop = (_dim(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {short_repr(name)}: bad header entry {short_repr(entry)}") from e
        if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {short_repr(name)}: unsupported dtype {short_repr(code)}; "
                f"expected one of {sorted(SAFETENSORS_DTYPES)}"
            )
        dtype = SAFETENSORS_DTYPES[code]
        nbytes = dtype.itemsize * _numel(shape)
        if stop - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {[begin, stop]} do not hold {shape} {dtype}")
        tensors.append((begin, stop, name, dtype, shape))
    tensors.sort()
    for begin, stop, name, _, _ in tensors:
        if begin != end:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {begin} of the data, expected {end}")
        end = stop
    if data_start + end != size:
        raise CheckpointError(f"{path}: the header describes {data_start + end} bytes, the file has {size}: truncated")
    return {n: TensorInfo(n, dt, sh, path, data_start + b, e - b) for b, e, n, dt, sh in tensors}


def _dim(value) -> int:
    """A header size or offset: a non-negative JSON integer (no bools, floats or strings)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {short_repr(value)}")
    return value


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class Checkpoint:
    """The tensors of a model, read one at a time on demand.

    ``tensors`` maps each name to its :class:`TensorInfo`, in file order. ``read(name)`` returns a
    fresh CPU tensor (safe to call from several threads). ``config`` is ``config.json`` (or None).
    """

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False):
        self.path = hub_snapshot(Path(path))
        self._bin: dict[str, torch.Tensor] | None = None
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        self.directory = self.path if self.path.is_dir() else self.path.parent
        self.config = self._read_config() if self.path.is_dir() else None
        self.tensors = attach_scales(self._locate(allow_pickle), self.config, self.path)

    def _read_config(self) -> dict | None:
        config = self.directory / "config.json"
        if not config.exists():
            return None
        try:
            value = json.loads(config.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{config}: not a valid JSON config: {short_repr(str(e), 200)}") from e
        if not isinstance(value, dict):
            raise CheckpointError(f"{config}: expected a JSON object, got {type(value).__name__}")
        return value

    def _locate(self, allow_pickle: bool) -> dict[str, TensorInfo]:
        p = self.path
        if p.is_file() and p.suffix == ".safetensors":
            return read_header(p)
        if p.is_dir() and (p / SAFETENSORS_INDEX).exists():
            return self._sharded(p / SAFETENSORS_INDEX)
        if p.is_dir() and (p / "model.safetensors").exists():
            return read_header(p / "model.safetensors")
        bins = [p] if p.is_file() and p.suffix == ".bin" else []
        if p.is_dir():
            index = p / BIN_INDEX
            bins = sorted({p / f for f in self._weight_map(index).values()}) if index.exists() else []
            bins = bins or ([p / "pytorch_model.bin"] if (p / "pytorch_model.bin").exists() else [])
        if bins and not allow_pickle:
            raise CheckpointError(
                f"{p}: only PyTorch .bin weights found; loading them unpickles data: pass allow_pickle=True "
                "(--allow-pickle) to load them with torch.load(weights_only=True)"
            )
        if bins:
            return self._load_bins(bins)
        raise CheckpointError(f"{p}: no model weights: expected a .safetensors file or an HF model directory")

    def _weight_map(self, index: Path) -> dict[str, str]:
        """The index's tensor -> file map. Files are checked by name (a plain relative name, no ``..``)
        and must be regular files: symlinks are followed, as a Hugging Face cache links every file
        of a snapshot to its blob."""
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise CheckpointError(f"{index}: not a valid index json: {short_repr(str(e), 200)}") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map: expected a mapping, got {short_repr(weight_map)}")
        for name, file in weight_map.items():
            parts = Path(file).parts if isinstance(file, str) and file else ()
            if not parts or Path(file).is_absolute() or ".." in parts or "\0" in file:
                raise CheckpointError(
                    f"{index}: tensor {short_repr(name)} points to {short_repr(file)}, outside the model "
                    "directory (expected a relative file name with no '..')"
                )
            if not (self.directory / file).is_file():
                raise CheckpointError(f"{index}: tensor {short_repr(name)} points to {file!r}, not a regular file")
        return weight_map

    def _sharded(self, index: Path) -> dict[str, TensorInfo]:
        weight_map = self._weight_map(index)
        headers = {f: read_header(self.directory / f) for f in dict.fromkeys(weight_map.values())}
        tensors = {}
        for file, header in headers.items():
            for name, info in header.items():
                if weight_map.get(name) == file:
                    tensors[name] = info
        missing = [n for n in weight_map if n not in tensors]
        if missing:
            raise CheckpointError(f"{index}: {len(missing)} tensors are not in the files it names, e.g. {missing[0]!r}")
        return tensors

    def _load_bins(self, files: list[Path]) -> dict[str, TensorInfo]:
        self._bin, tensors = {}, {}
        for f in files:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many kinds for a bad pickle
                raise CheckpointError(f"{f}: cannot load: {e}") from e
            for name, t in state.items():
                self._bin[name] = t
                tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), f, 0, t.nbytes)
        return tensors

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        return info

    def map(self, name: str) -> torch.Tensor:
        """Tensor ``name`` mapped from its file alone (copy-on-write: writing to it never changes the
        file), its pages populated now, unmapped when the tensor is freed. No copy is made: the page
        cache's pages are the tensor's, and they count in RSS only while it lives. An FP8 weight with
        a scale is returned dequantized, in float32."""
        return self._load(name, self._map_raw)

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` copied into memory of its own (an FP8 weight with a scale: dequantized)."""
        return self._load(name, self._read_raw)

    def _load(self, name: str, raw) -> torch.Tensor:
        info = self._info(name)
        if self._bin is not None:
            return self._bin[name].clone()
        weight = dequantize(raw(info), self._read_raw(info.scale), info.block) if info.scale is not None else raw(info)
        if info.lora is not None:
            return info.lora.apply(weight, self._read_raw(info.lora.a), self._read_raw(info.lora.b))
        return weight

    def _map_raw(self, info: TensorInfo) -> torch.Tensor:
        name = info.name
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
        try:
            fd = os.open(info.file, os.O_RDONLY)
            try:
                if os.fstat(fd).st_size < info.offset + info.nbytes:
                    raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
                mapped = mmap.mmap(fd, info.offset + info.nbytes - start, flags=mmap.MAP_PRIVATE, offset=start)
            finally:
                os.close(fd)
        except OSError as e:
            raise CheckpointError(f"{info.file}: cannot map tensor {name!r}: {e}") from e
        flat = torch.frombuffer(mapped, dtype=torch.uint8, count=info.nbytes, offset=info.offset - start)
        _populate(flat.data_ptr() - (info.offset - start), info.offset + info.nbytes - start)
        return flat.view(info.dtype).view(info.shape)

    def _read_raw(self, info: TensorInfo) -> torch.Tensor:
        name = info.name
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        view, done = memoryview(buffer.numpy()), 0
        try:
            fd = os.open(info.file, os.O_RDONLY)
            try:
                while done < info.nbytes:
                    got = os.preadv(fd, [view[done:]], info.offset + done)
                    if got == 0:
                        raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
                    done += got
            finally:
                os.close(fd)
        except OSError as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r}: {e}") from e
        return buffer.view(info.dtype).view(info.shape)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as a recipe names a hub model
REVISION = re.compile(r"[\w.-]+")  # a branch, tag or commit as the cache files it (refs/<name>)


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded models: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "huggingface" / "hub"


def cached_hub_model(repo_id: str, revision: str | None = None) -> Path | None:
    """The snapshot of hub model ``repo_id`` (``org/name``) in the local Hugging Face cache, at
    ``revision`` (a branch or tag the cache has a ref of, or a commit; default: ``main``, else the
    only snapshot), or None where the cache does not hold it. Nothing is downloaded."""
    entry = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    if not entry.is_dir():
        return None
    if revision is None:
        return hub_snapshot(entry)
    if not REVISION.fullmatch(revision):
        return None
    ref = entry / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = entry / "snapshots" / commit
    return snapshot if REVISION.fullmatch(commit) and snapshot.is_dir() else None


def hub_snapshot(path: Path) -> Path:
    """A Hugging Face hub cache entry (``models--org--name``, holding ``refs/`` and ``snapshots/``) as
    the snapshot that ``refs/main`` names, or its only snapshot; any other path as it is."""
    snapshots = path / "snapshots"
    if not (path.is_dir() and snapshots.is_dir()):
        return path
    ref = path / "refs" / "main"
    if ref.is_file():
        revision = ref.read_text().strip()
        if revision and "/" not in revision and (snapshots / revision).is_dir():
            return snapshots / revision
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) != 1:
        raise CheckpointError(
            f"{path}: a Hugging Face cache entry with {len(found)} snapshots and no usable refs/main: "
            "give the snapshot directory (snapshots/<revision>)"
        )
    return found[0]


def attach_scales(tensors: dict[str, TensorInfo], config: dict | None, where: Path) -> dict[str, TensorInfo]:
    """FP8 weights with a scale tensor beside them (``<name>_scale_inv``, as DeepSeek-V3 and Qwen3
    FP8 checkpoints store block scales, or ``<name>_scale``): the scale is attached to the weight,
    which then reads as float32 ``weight * scale``, and leaves the tensor list, so the model lines up
    with its bf16 siblings. A scale beside a tensor that is not FP8 is left as it is."""
    block = None
    quant = (config or {}).get("quantization_config")
    if isinstance(quant, dict) and isinstance(quant.get("weight_block_size"), list):
        block = tuple(quant["weight_block_size"])
    out = dict(tensors)
    for name, info in tensors.items():
        if info.dtype not in FLOAT8:
            continue
        for suffix in SCALE_SUFFIXES:
            scale = tensors.get(name + suffix)
            if scale is None:
                continue
            if scale.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise CheckpointError(f"{where}: scale {scale.name!r} of FP8 tensor {name!r} is {scale.dtype}")
            out[name] = TensorInfo(**{**info.__dict__, "scale": scale, "block": _block(info, scale, block, where)})
            del out[scale.name]
            break
    return out


def _block(info: TensorInfo, scale: TensorInfo, block: tuple | None, where: Path) -> tuple[int, ...] | None:
    """None where ``scale`` broadcasts against the weight (per tensor or per row), else the block shape:
    the config's ``weight_block_size``, or the one that the two shapes imply."""
    if len(scale.shape) <= len(info.shape) and all(
        s in (1, d) for s, d in zip(scale.shape[::-1], info.shape[::-1], strict=False)
    ):
        return None
    if len(scale.shape) != len(info.shape) or 0 in scale.shape:
        raise CheckpointError(
            f"{where}: scale {scale.name!r} {scale.shape} does not fit tensor {info.name!r} {info.shape}"
        )
    block = block or tuple(-(-d // s) for d, s in zip(info.shape, scale.shape, strict=True))
    if len(block) != len(info.shape) or any(
        -(-d // b) != s for d, b, s in zip(info.shape, block, scale.shape, strict=True)
    ):
        raise CheckpointError(
            f"{where}: scale {scale.name!r} {scale.shape} does not tile tensor {info.name!r} {info.shape} "
            f"in blocks of {block}"
        )
    return block


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, ...] | None) -> torch.Tensor:
    """float32 ``weight * scale``, the scale broadcast, or repeated over blocks of ``block`` (the
    last block of a dimension may be partial). FP8 values convert to float32 exactly."""
    out = weight.to(torch.float32)
    scale = scale.to(torch.float32)
    if block is None:
        return out.mul_(scale)
    for dim, size in enumerate(block[:-1]):  # expand the leading dims: small, scale rows × column blocks
        scale = scale.repeat_interleave(size, dim).narrow(dim, 0, out.shape[dim])
    last = block[-1]
    for j in range(scale.shape[-1]):  # then one column block at a time, in place
        out[..., j * last : (j + 1) * last].mul_(scale[..., j : j + 1])
    return out
