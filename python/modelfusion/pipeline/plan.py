"""A merge plan: every output tensor with its inputs, resolved parameters, shard and memory cost,
checked against the models before any file is written."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fusion_kernels.methods import METHODS, REQUIRED, scratch_bytes, tensor_seed

from ..errors import RecipeError
from ..io.checkpoint import FLOAT8, Checkpoint, TensorInfo
from ..io.writer import OutputTensor, plan_shards, shard_name
from .recipe import LAYER, Recipe, layer_position, model_params, resolve, shared_params

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MERGEABLE = (*FLOATS, *FLOAT8)  # FP8 converts exactly to every float dtype we compute in


@dataclass
class TensorTask:
    """One output tensor: ``inputs[k]`` is read from checkpoint ``k`` (None where not needed)."""

    out: OutputTensor
    inputs: list[TensorInfo | None]
    compute_dtype: torch.dtype
    params: dict = field(default_factory=dict)
    seed: int = 0
    passthrough: bool = False  # copied from the base model (non-float tensors)
    method: str = ""  # the recipe's merge method

    @property
    def read_bytes(self) -> int:
        return sum(i.nbytes for i in self.inputs if i is not None)

    @property
    def peak_bytes(self) -> int:
        """Resident bytes while this tensor is merged: the inputs as read and converted, one float32
        scratch tensor of the kernels, and the output."""
        converted = sum(
            i.nbytes // i.dtype.itemsize * self.compute_dtype.itemsize
            + i.dequantized_nbytes
            + (i.scale.nbytes if i.scale is not None else 0)
            for i in self.inputs
            if i is not None and (i.dtype != self.compute_dtype or i.scale is not None)
        )
        if self.passthrough:
            return self.read_bytes + converted + self.out.nbytes
        numel = self.out.nbytes // self.out.dtype.itemsize
        models = sum(i is not None for i in self.inputs)
        scratch = scratch_bytes(self.method, numel, models)
        # the method's result in the compute dtype, before it is converted to the output dtype
        result = numel * self.compute_dtype.itemsize if self.compute_dtype != self.out.dtype else 0
        return self.read_bytes + converted + scratch + result + self.out.nbytes


@dataclass
class Plan:
    recipe: Recipe
    checkpoints: list[Checkpoint]
    base_index: int | None  # the checkpoint of the base tensor handed to the method (None for linear)
    merged: list[int]  # the checkpoints of the merged tensors, in the order of their parameters
    shards: list[list[TensorTask]]
    memory_budget: int

    @property
    def tasks(self) -> list[TensorTask]:
        return [t for shard in self.shards for t in shard]

    @property
    def read_bytes(self) -> int:
        return sum(t.read_bytes for t in self.tasks)

    @property
    def peak_bytes(self) -> int:
        return max((t.peak_bytes for t in self.tasks), default=0)

    def shard_files(self) -> list[str]:
        return [shard_name(i, len(self.shards)) for i in range(len(self.shards))]

    def fingerprint(self, files: bool = True) -> str:
        """What an output depends on: the recipe, and every input tensor's file, place and size;
        with ``files``, also each input file's size and modification time."""
        h = hashlib.sha256(self.recipe.source.encode())
        for shard in self.shards:
            for t in shard:
                h.update(json.dumps([t.out.name, str(t.out.dtype), t.out.shape, t.params, t.seed]).encode())
                for i in t.inputs:
                    h.update(repr(None if i is None else (str(i.file), i.offset, i.nbytes)).encode())
        for c in self.checkpoints if files else ():
            for f in sorted({i.file for i in c.tensors.values()}):
                stat = f.stat()
                h.update(f"{f}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return h.hexdigest()

    def describe(self, owners: list[int] | None = None) -> str:
        """The plan in words; ``owners``: the rank of each shard in a distributed run."""
        gib = 2**30
        lines = [
            f"merge_method: {self.recipe.merge_method}",
            f"inputs: {len(self.checkpoints)} models: " + ", ".join(str(c.path) for c in self.checkpoints),
            f"tensors: {len(self.tasks)} ({sum(t.passthrough for t in self.tasks)} copied from the base)",
            f"read: {self.read_bytes / gib:.3f} GiB; write: {sum(t.out.nbytes for t in self.tasks) / gib:.3f} GiB "
            f"in {len(self.shards)} shards",
            f"estimated peak memory: {self.peak_bytes / gib:.3f} GiB for the largest tensor "
            f"(budget {self.memory_budget / gib:.3f} GiB, which also bounds prefetching)",
        ]
        for i, (file, shard) in enumerate(zip(self.shard_files(), self.shards, strict=True)):
            rank = "" if owners is None else f" (rank {owners[i]})"
            lines.append(f"  {file}: {len(shard)} tensors, {sum(t.out.nbytes for t in shard) / gib:.3f} GiB{rank}")
        return "\n".join(lines)


def _num_layers(reference: Checkpoint, names: list[str]) -> int:
    config = reference.config or {}
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    indices = [int(m.group(1)) for m in map(LAYER.search, names) if m]
    return max(indices) + 1 if indices else 1


def _default_compute_dtype(infos: list[TensorInfo]) -> torch.dtype:
    """With no ``dtype`` in the recipe: the models' common dtype (bfloat16 for FP8), or float32 where
    they differ, as mergekit merges and writes mixed-precision inputs."""
    dtypes = {i.dtype for i in infos}
    if len(dtypes) > 1:
        return torch.float32
    (dtype,) = dtypes
    return dtype if dtype in FLOATS else torch.bfloat16


def _mergeable(name: str, checkpoints: list[Checkpoint]) -> bool:
    """True where every model holds tensor ``name`` as a float (FP8 included): it is merged. False
    where every model holds it in one and the same non-float dtype (step counters, position ids,
    masks): it is copied from the base. Anything else would merge or copy a wrong value, so it is
    refused, naming the models and dtypes."""
    dtypes = [c.tensors[name].dtype for c in checkpoints]
    if all(d in MERGEABLE for d in dtypes):
        return True
    if len(set(dtypes)) == 1:
        return False
    found = ", ".join(f"{c.path}: {d}" for c, d in zip(checkpoints, dtypes, strict=True))
    raise RecipeError(
        f"tensor {name!r}: stored as a float in some models and as an integer or bool in others ({found}); "
        "a float tensor declared with an integer dtype, or the other way round, cannot be merged"
    )


def _resolve_params(recipe: Recipe, name: str, t: float) -> dict:
    method = recipe.merge_method
    params = {}
    for key, spec in shared_params(method).items():
        value = (
            resolve(recipe.parameters[key], name, t, f"parameters.{key}", spec) if key in recipe.parameters else None
        )
        if value is None and spec.default is REQUIRED:
            raise RecipeError(f"parameters.{key}: no value applies to tensor {name!r}")
        params[key] = spec.default if value is None else value
    for key, spec in model_params(method).items():
        values = []
        for entry in recipe.merged:
            i = recipe.models.index(entry)
            value = None
            if key in entry.parameters:
                value = resolve(entry.parameters[key], name, t, f"models[{i}].parameters.{key}", spec)
            if value is None and key in recipe.parameters:
                value = resolve(recipe.parameters[key], name, t, f"parameters.{key}", spec)
            if value is None and spec.default is REQUIRED:
                raise RecipeError(f"models[{i}].parameters.{key}: no value applies to tensor {name!r}")
            values.append(spec.default if value is None else value)
        params[key] = values
    METHODS[method].check_values(params, f"tensor {name!r}: ", RecipeError)
    return params


def build_plan(recipe: Recipe, *, memory_budget: int, allow_pickle: bool = False) -> Plan:
    """Open every model, match tensors by name, resolve parameters and cut shards. Raises
    CheckpointError or RecipeError, each naming the model, tensor or recipe key at fault."""
    _check_device(recipe.device)
    paths = recipe.inputs
    checkpoints = [Checkpoint(p, allow_pickle=allow_pickle) for p in paths]
    base_index = paths.index(recipe.base_model) if recipe.base_model is not None else None
    reference = checkpoints[0]  # the base model when there is one
    names = list(reference.tensors)
    for c in checkpoints:
        missing = [n for n in names if n not in c.tensors]
        extra = [n for n in c.tensors if n not in reference.tensors]
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which {reference.path} lacks"
            raise RecipeError(
                f"model {c.path}: {what} ({len(missing)} missing, {len(extra)} extra tensors against {reference.path})"
            )
    num_layers = _num_layers(reference, names)
    if recipe.layer_range is not None and tuple(recipe.layer_range) != (0, num_layers):
        raise RecipeError(f"slices: layer_range {list(recipe.layer_range)} must cover all {num_layers} layers")
    merged_models = [paths.index(m.path) for m in recipe.merged]
    if METHODS[recipe.merge_method].base_merged:
        base_index = None  # linear and karcher take the base, when there is one, as one more merged model
    tasks = []
    for name in names:
        ref = reference.tensors[name]
        for c in checkpoints:
            if c.tensors[name].shape != ref.shape:
                raise RecipeError(
                    f"tensor {name!r}: shape {c.tensors[name].shape} in {c.path}, {ref.shape} in {reference.path}"
                )
        floating = _mergeable(name, checkpoints)
        compute = recipe.dtype or _default_compute_dtype([c.tensors[name] for c in checkpoints])
        if not floating:
            inputs = [ref if c is reference else None for c in checkpoints]
            out = OutputTensor(name, ref.dtype, ref.shape)
            tasks.append(TensorTask(out, inputs, ref.dtype, passthrough=True))
            continue
        needed = set(merged_models) | ({base_index} if base_index is not None else set())
        inputs = [c.tensors[name] if k in needed else None for k, c in enumerate(checkpoints)]
        out = OutputTensor(name, recipe.out_dtype or compute, ref.shape)
        params = _resolve_params(recipe, name, layer_position(name, num_layers))
        seed = tensor_seed(recipe.seed, name)
        tasks.append(TensorTask(out, inputs, compute, params, seed, method=recipe.merge_method))
    outputs = {id(t.out): t for t in tasks}
    shards = [[outputs[id(o)] for o in shard] for shard in plan_shards([t.out for t in tasks], recipe.max_shard_size)]
    plan = Plan(recipe, checkpoints, base_index, merged_models, shards, memory_budget)
    largest = max(tasks, key=lambda t: t.peak_bytes, default=None)
    if largest is not None and largest.peak_bytes > memory_budget:
        raise RecipeError(
            f"memory_budget: {human_bytes(memory_budget)} is below what tensor {largest.out.name!r} needs "
            f"({human_bytes(largest.peak_bytes)}: its inputs, conversions, scratch and output)"
        )
    return plan


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise RecipeError(f"device: {device!r} asked for, but this machine has {count} CUDA devices")


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def default_memory_budget() -> int:
    """Half of the memory available now (MemAvailable), or 4 GiB where that cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 4 * 2**30
