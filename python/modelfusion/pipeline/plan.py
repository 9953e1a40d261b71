"""A merge plan: every output tensor with its inputs, resolved parameters, shard and memory cost,
checked against the models before any file is written."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fusion_kernels.methods import METHODS, REQUIRED, scratch_bytes, tensor_seed

from ..errors import RecipeError
from ..io.checkpoint import FLOAT8, Checkpoint, TensorInfo
from ..io.lora import open_model
from ..io.vocabulary import Vocabulary, build_vocabulary, check_chat_template_target
from ..io.writer import OutputTensor, plan_shards, shard_name
from .recipe import LAYER, Recipe, Slice, layer_position, model_params, resolve, shared_params, slice_roles

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
    base: int | None = None  # the checkpoint of the base tensor handed to the method (None: no base)
    merged: tuple[int, ...] = ()  # the checkpoints of the merged tensors, in the order of their parameters
    vocabulary: Vocabulary | None = None  # a tensor indexed by token id: rows aligned to the merged tokenizer

    @property
    def read_bytes(self) -> int:
        return sum(i.nbytes for i in self.inputs if i is not None)

    @property
    def numel(self) -> int:
        """Elements of the output tensor."""
        return self.out.nbytes // self.out.dtype.itemsize

    @property
    def peak_bytes(self) -> int:
        """Resident bytes while this tensor is merged: the inputs as read and converted, one float32
        scratch tensor of the kernels, and the output."""
        converted = sum(
            i.nbytes // i.dtype.itemsize * self.compute_dtype.itemsize
            + i.dequantized_nbytes
            + (i.scale.nbytes if i.scale is not None else 0)
            for i in self.inputs
            if i is not None and (i.dtype != self.compute_dtype or i.converted)
        )
        if self.passthrough:
            return self.read_bytes + converted + self.out.nbytes
        numel = self.numel
        models = sum(i is not None for i in self.inputs)
        scratch = scratch_bytes(self.method, numel, models)
        if self.vocabulary is not None:  # each model's rows, aligned to the output's token ids
            scratch += models * numel * self.compute_dtype.itemsize
        # the method's result in the compute dtype, before it is converted to the output dtype
        result = numel * self.compute_dtype.itemsize if self.compute_dtype != self.out.dtype else 0
        return self.read_bytes + converted + scratch + result + self.out.nbytes


@dataclass
class Plan:
    recipe: Recipe
    checkpoints: list[Checkpoint]
    shards: list[list[TensorTask]]
    memory_budget: int
    config_overrides: dict = field(default_factory=dict)  # keys of the output config.json (a slices recipe's layers)
    vocabulary: Vocabulary | None = None  # the merged tokenizer, when the recipe asks for one

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
        if self.vocabulary is not None:
            h.update(self.vocabulary.digest.encode())
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


def _num_layers(reference, names: list[str], pattern: re.Pattern = LAYER) -> int:
    """The layer count: the config's, else one past the largest layer index of ``names``."""
    config = (reference.config if reference is not None else None) or {}
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    indices = [int(m.group(1)) for m in map(pattern.search, names) if m]
    return max(indices) + 1 if indices else 1


def _default_compute_dtype(infos: list[TensorInfo]) -> torch.dtype:
    """With no ``dtype`` in the recipe: the models' common dtype (bfloat16 for FP8), or float32 where
    they differ, as mergekit merges and writes mixed-precision inputs."""
    dtypes = {i.dtype for i in infos}
    if len(dtypes) > 1:
        return torch.float32
    (dtype,) = dtypes
    return dtype if dtype in FLOATS else torch.bfloat16


def _mergeable(name: str, found: list[tuple[Path, TensorInfo]]) -> bool:
    """True where every model holds tensor ``name`` as a float (FP8 included): it is merged. False
    where every model holds it in one and the same non-float dtype (step counters, position ids,
    masks): it is copied. Anything else would merge or copy a wrong value, so it is refused, naming
    the models and dtypes."""
    dtypes = [info.dtype for _, info in found]
    if all(d in MERGEABLE for d in dtypes):
        return True
    if len(set(dtypes)) == 1:
        return False
    listed = ", ".join(f"{path}: {info.dtype}" for path, info in found)
    raise RecipeError(
        f"tensor {name!r}: stored as a float in some models and as an integer or bool in others ({listed}); "
        "a float tensor declared with an integer dtype, or the other way round, cannot be merged"
    )


Settings = list[tuple[str, dict]]  # (where, parameters) from the most specific to the recipe's own


def _resolve_params(method: str, shared: Settings, per_model: list[Settings], name: str, t: float) -> dict:
    """The parameters of tensor ``name`` at layer position ``t``: shared ones from the first of
    ``shared`` that sets them, per-model ones (one list per merged model) likewise."""

    def first(settings: Settings, key: str, spec):
        for where, params in settings:
            if key in params:
                value = resolve(params[key], name, t, f"{where}.{key}", spec)
                if value is not None:
                    return value, where
        return None, settings[0][0]

    params = {}
    for key, spec in shared_params(method).items():
        value, where = first(shared, key, spec)
        if value is None and spec.default is REQUIRED:
            raise RecipeError(f"{where}.{key}: no value applies to tensor {name!r}")
        params[key] = spec.default if value is None else value
    for key, spec in model_params(method).items():
        values = []
        for settings in per_model:
            value, where = first(settings, key, spec)
            if value is None and spec.default is REQUIRED:
                raise RecipeError(f"{where}.{key}: no value applies to tensor {name!r}")
            values.append(spec.default if value is None else value)
        params[key] = values
    METHODS[method].check_values(params, f"tensor {name!r}: ", RecipeError)
    return params


def _task(recipe: Recipe, out_name: str, inputs: list, paths: list[Path], roles, params, vocabulary=None) -> TensorTask:
    """The task of one output tensor read from ``inputs`` (one slot per checkpoint); ``roles``:
    (base checkpoint or None, merged checkpoints); ``params``: a function giving its parameters;
    ``vocabulary``: the merged tokenizer, whose token ids a vocabulary-indexed tensor takes."""
    found = [(paths[k], i) for k, i in enumerate(inputs) if i is not None]
    first = found[0][1]
    by_token = vocabulary is not None and all(vocabulary.indexes(p, out_name, i.shape) for p, i in found)
    for path, info in found:
        if info.shape[by_token:] != first.shape[by_token:]:
            read = lambda i: "" if i.name == out_name else f" (its {i.name!r})"  # noqa: E731
            raise RecipeError(
                f"tensor {out_name!r}: shape {info.shape} in {path}{read(info)}, "
                f"{first.shape} in {found[0][0]}{read(first)}"
            )
    if not _mergeable(out_name, found):  # copied from the first model that has it
        only = [i if i is first else None for i in inputs]
        return TensorTask(OutputTensor(out_name, first.dtype, first.shape), only, first.dtype, passthrough=True)
    compute = recipe.dtype or _default_compute_dtype([i for _, i in found])
    shape = (vocabulary.rows, *first.shape[1:]) if by_token else first.shape
    out = OutputTensor(out_name, recipe.out_dtype or compute, shape)
    base, merged = roles
    seed = tensor_seed(recipe.seed, out_name)
    task = TensorTask(out, inputs, compute, params(), seed, method=recipe.merge_method, base=base, merged=merged)
    task.vocabulary = vocabulary if by_token else None
    return task


def _outer_settings(recipe: Recipe) -> Settings:
    module = [(f"modules.{recipe.module_name}.parameters", recipe.module_parameters)] if recipe.module_name else []
    return [*module, ("parameters", recipe.parameters)]


# Rotary frequency buffers that older checkpoints saved and newer ones do not: transformers
# recomputes them as it loads a model, and mergekit's architectures never write them. Read from no
# model and not written, so that models saved before and after the change merge.
RECOMPUTED_BUFFER = re.compile(r"(?:^|\.)rotary_emb\.inv_freq$")

# An output head and the input embeddings it may be tied to (transformers leaves the head out of a
# checkpoint saved with tie_word_embeddings; mergekit then reads the embedding in its place).
OUTPUT_HEAD = re.compile(r"(?:^|\.)lm_head\.weight$")
INPUT_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in)\.weight$")


def tensor_info(checkpoint: Checkpoint, name: str) -> TensorInfo | None:
    """Tensor ``name`` of ``checkpoint``; for an output head it does not store, its one input
    embedding (the head it is tied to), as mergekit reads it, unless its config says the two are
    not tied; None where neither is there."""
    info = checkpoint.tensors.get(name)
    untied = (checkpoint.config or {}).get("tie_word_embeddings") is False
    if info is None and OUTPUT_HEAD.search(name) and not untied:
        tied = [i for n, i in checkpoint.tensors.items() if INPUT_EMBEDDING.search(n)]
        return tied[0] if len(tied) == 1 else None
    return info


def untied_heads(reference: Checkpoint, checkpoints: list, names: list[str]) -> list[str]:
    """The output heads some of ``checkpoints`` store while ``reference`` keeps its head tied: they
    are written too (mergekit writes a head any model has), after ``names``."""
    heads = [n for c in checkpoints if c is not None for n in c.tensors if OUTPUT_HEAD.search(n)]
    return [n for n in dict.fromkeys(heads) if n not in names and tensor_info(reference, n) is not None]


def _model_tasks(recipe: Recipe, paths: list[Path], checkpoints: list, vocabulary=None) -> list[TensorTask]:
    """A models recipe: every tensor of its models, merged by name (checkpoints it does not read: None)."""
    used = [c for c, p in zip(checkpoints, paths, strict=True) if p in recipe.inputs]
    reference = used[0]  # the base model when there is one
    names = list(reference.tensors)
    names += untied_heads(reference, used, names)
    known = set(names)
    for c in used:
        missing = [n for n in names if tensor_info(c, n) is None]
        extra = [n for n in c.tensors if n not in known]
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which {reference.path} lacks"
            raise RecipeError(
                f"model {c.path}: {what} ({len(missing)} missing, {len(extra)} extra tensors against {reference.path})"
            )
    positions = _layer_positions(reference, names)
    merged = tuple(paths.index(m.path) for m in recipe.merged)
    base = paths.index(recipe.base_model) if recipe.base_model is not None else None
    if METHODS[recipe.merge_method].base_merged:
        base = None  # linear and karcher take the base, when there is one, as one more merged model
    shared = _outer_settings(recipe)
    per_model = [[(f"models[{recipe.models.index(m)}].parameters", m.parameters), *shared] for m in recipe.merged]
    tasks = []
    for name in names:
        t = positions[name]
        inputs = [tensor_info(c, name) if p in recipe.inputs else None for c, p in zip(checkpoints, paths, strict=True)]
        params = lambda name=name, t=t: _resolve_params(recipe.merge_method, shared, per_model, name, t)  # noqa: E731
        tasks.append(_task(recipe, name, inputs, paths, (base, merged), params, vocabulary))
    return tasks


def _layer_positions(reference, names: list[str]) -> dict[str, float]:
    """Each tensor's t; in a model of several modules, over the layers of its own module, as mergekit."""
    modules = model_modules(names)
    if len(modules) == 1:
        count = _num_layers(reference, names)
        return {name: layer_position(name, count) for name in names}
    positions = {}
    for members in modules.values():
        count = _num_layers(None, members)
        positions.update((name, layer_position(name, count)) for name in members)
    return positions


STACK = re.compile(r"\.(\d+)\.")  # mergekit's inference: a layer stack is the name before a first ".N."


def model_modules(names: list[str]) -> dict[str, list[str]]:
    """A model's modules as mergekit names them where it infers the architecture: one per layer
    stack, named by the tensors' prefix before the layer index (``model.language_model.layers``),
    and ``default`` for the tensors outside layers; a model of one stack is one module, ``default``."""
    stacks: dict[str, list[str]] = {}
    loose = []
    for name in names:
        match = STACK.search(name)
        if match:
            stacks.setdefault(name[: match.start()], []).append(name)
        else:
            loose.append(name)
    if len(stacks) <= 1:
        return {"default": list(names)}
    return {**stacks, **({"default": loose} if loose else {})}


def _module_key(key: str, modules: dict[str, list[str]], path: Path) -> str:
    """The module of ``modules`` a recipe's key names: the same name, or the same once the ``model``
    segments are dropped (mergekit names modules in transformers' layout, e.g.
    ``model.language_model.layers``, which checkpoints may store as ``language_model.model.layers``)."""
    if key in modules:
        return key
    bare = lambda name: tuple(part for part in name.split(".") if part != "model")  # noqa: E731
    found = [name for name in modules if bare(name) == bare(key)]
    if len(found) != 1:
        raise RecipeError(f"modules.{key}: model {path} has no such module; its modules are {sorted(modules)}")
    return found[0]


@dataclass
class _ModuleView:
    """The tensors of one module of a checkpoint, for planning as if they were the whole model."""

    path: Path
    tensors: dict[str, TensorInfo]
    config: dict | None = None


def _module_tasks(
    recipe: Recipe, paths: list[Path], checkpoints: list[Checkpoint], vocabulary=None
) -> tuple[list[TensorTask], dict]:
    """A ``modules`` recipe: each module's tensors planned by its own recipe (models or slices). A
    model of one module is planned whole (a slices recipe then sets the config's layer count)."""
    parts = recipe.modules
    whole = [model_modules(list(c.tensors)) for c in checkpoints]
    if len(parts) == 1 and all(len(m) == 1 for m in whole):
        part = parts[0]
        return (
            (_model_tasks(part, paths, checkpoints, vocabulary), {})
            if part.slices is None
            else _slice_tasks(part, paths, checkpoints, vocabulary)
        )
    tasks = []
    for part in parts:
        views = []
        for c, p, modules in zip(checkpoints, paths, whole, strict=True):
            members = modules[_module_key(part.module_name, modules, p)] if p in part.inputs else []
            views.append(_ModuleView(p, {n: c.tensors[n] for n in members}))
        if part.slices is None:
            tasks += _model_tasks(part, paths, views, vocabulary)
            continue
        layers = sum(piece.length for piece in part.slices)
        before = {_num_layers(None, list(v.tensors), STACK) for v in views if any(map(STACK.search, v.tensors))}
        if before and before != {layers}:
            raise RecipeError(
                f"modules.{part.module_name}.slices: {layers} output layers from models of {sorted(before)}; "
                "changing the layer count of one module of several is not supported (which config key counts "
                "its layers is not known)"
            )
        tasks += _slice_tasks(part, paths, views, vocabulary, STACK)[0]
    planned = {t.out.name for t in tasks}
    left = [n for n in checkpoints[0].tensors if n not in planned]
    if left:
        warnings.warn(
            f"modules: the recipe merges {len(parts)} of the models' modules; {len(left)} tensors of the others "
            f"(e.g. {left[0]!r}) are not written, as mergekit writes only the modules a recipe names",
            stacklevel=3,
        )
    return tasks, {}


# Tensors outside the layers that come before them (embeddings); the others (final norm, LM head)
# come after, from the last slice's sources, as mergekit's architectures order them.
BEFORE_LAYERS = re.compile(r"embed|wte|wpe|word_embeddings")


def _layer_templates(checkpoint: Checkpoint, pattern: re.Pattern) -> dict[int, list[str]]:
    """Layer index -> its tensors' names with the index replaced by ``{}``."""
    layers: dict[int, list[str]] = {}
    for name in checkpoint.tensors:
        match = pattern.search(name)
        if match:
            layers.setdefault(int(match.group(1)), []).append(name[: match.start(1)] + "{}" + name[match.end(1) :])
    return layers


def _slice_tasks(
    recipe: Recipe, paths: list[Path], checkpoints: list, vocabulary=None, pattern: re.Pattern = LAYER
) -> tuple[list[TensorTask], dict]:
    """A slices recipe: the output's layers (tensors whose names ``pattern`` finds a layer index in),
    slice by slice, and the tensors outside the layers."""
    index = {p: k for k, p in enumerate(paths)}
    templates = {k: _layer_templates(c, pattern) for k, c in enumerate(checkpoints) if c is not None}
    method = recipe.merge_method

    def task(piece: Slice, n: int, out_name: str, names: list[str], t: float) -> TensorTask:
        base, merged = slice_roles(recipe, piece)
        inputs: list[TensorInfo | None] = [None] * len(checkpoints)
        for i, (source, name) in enumerate(zip(piece.sources, names, strict=True)):
            info = tensor_info(checkpoints[index[source.path]], name)
            if info is None:
                raise RecipeError(f"slices[{n}].sources[{i}]: model {source.path} lacks {name!r} (for {out_name!r})")
            inputs[index[source.path]] = info
        shared = [(f"slices[{n}].parameters", piece.parameters), *_outer_settings(recipe)]
        per_model = [
            [(f"slices[{n}].sources[{piece.sources.index(s)}].parameters", s.parameters), *shared] for s in merged
        ]
        roles = (None if base is None else index[base], tuple(index[s.path] for s in merged))
        params = lambda: _resolve_params(method, shared, per_model, out_name, t)  # noqa: E731
        return _task(recipe, out_name, inputs, paths, roles, params, vocabulary)

    for n, piece in enumerate(recipe.slices):
        for i, source in enumerate(piece.sources):
            k = index[source.path]
            count = _num_layers(checkpoints[k], list(checkpoints[k].tensors), pattern)
            if source.layer_range[1] > count:
                raise RecipeError(
                    f"slices[{n}].sources[{i}].layer_range: {list(source.layer_range)} reaches past the "
                    f"{count} layers of {source.path}"
                )
    first, last = recipe.slices[0], recipe.slices[-1]
    lead = checkpoints[index[first.sources[0].path]]
    outside = [name for name in lead.tensors if not pattern.search(name)]
    outside += untied_heads(lead, [checkpoints[index[s.path]] for s in last.sources], outside)
    before = [name for name in outside if BEFORE_LAYERS.search(name)]
    tasks = [task(first, 0, name, [name] * len(first.sources), 0.0) for name in before]
    layer = 0
    for n, piece in enumerate(recipe.slices):
        for offset in range(piece.length):
            t = offset / (piece.length - 1) if piece.length > 1 else 1.0
            lead = piece.sources[0]
            for template in templates[index[lead.path]].get(lead.layer_range[0] + offset, []):
                names = [template.format(s.layer_range[0] + offset) for s in piece.sources]
                tasks.append(task(piece, n, template.format(layer), names, t))
            layer += 1
    after = [name for name in outside if not BEFORE_LAYERS.search(name)]
    tasks += [task(last, len(recipe.slices) - 1, name, [name] * len(last.sources), 0.0) for name in after]
    return tasks, _layer_config(checkpoints[0].config or {}, recipe, layer)


def _layer_config(config: dict, recipe: Recipe, layers: int) -> dict:
    """The output config's layer count, and its per-layer lists (``layer_types`` and the like:
    lists as long as the reference model's layer count) taken layer by layer from the slices."""
    key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(config.get(k), int)), None)
    if key is None:
        return {}
    overrides: dict = {key: layers}
    for name, value in config.items():
        if isinstance(value, list) and len(value) == config[key]:
            starts = [(piece.sources[0].layer_range[0], piece.length) for piece in recipe.slices]
            overrides[name] = [value[start + o] for start, length in starts for o in range(length)]
    return overrides


def build_plan(recipe: Recipe, *, memory_budget: int, allow_pickle: bool = False) -> Plan:
    """Open every model, match tensors by name (or by layer, for slices), resolve parameters and cut
    shards. Raises CheckpointError or RecipeError, each naming the model, tensor or recipe key at fault."""
    _check_device(recipe.device)
    paths = recipe.inputs
    checkpoints = [open_model(p, allow_pickle=allow_pickle) for p in paths]
    for c in checkpoints:  # the plan's own checkpoints: what it reads of them
        for name in [n for n in c.tensors if RECOMPUTED_BUFFER.search(n)]:
            del c.tensors[name]
    overrides = {}
    spec = recipe.tokenizer
    vocabulary = None
    if spec is not None and spec.source is not None:
        vocabulary = build_vocabulary(spec, recipe.base_model, paths)
    elif spec is not None:
        check_chat_template_target(spec, paths[0])
    if recipe.modules is not None:
        tasks, overrides = _module_tasks(recipe, paths, checkpoints, vocabulary)
    elif recipe.slices is None:
        tasks = _model_tasks(recipe, paths, checkpoints, vocabulary)
    else:
        several = next((c for c in checkpoints if len(model_modules(list(c.tensors))) > 1), None)
        if several is not None:
            found = sorted(model_modules(list(several.tensors)))
            raise RecipeError(
                f"slices: model {several.path} has several modules ({found}); slice them under 'modules', "
                "as mergekit asks"
            )
        tasks, overrides = _slice_tasks(recipe, paths, checkpoints, vocabulary)
    if vocabulary is not None:
        overrides["vocab_size"] = vocabulary.rows
    if any(OUTPUT_HEAD.search(t.out.name) and t.out.name not in checkpoints[0].tensors for t in tasks):
        overrides["tie_word_embeddings"] = False  # else transformers would tie the written head to the embedding
    outputs = {id(t.out): t for t in tasks}
    shards = [[outputs[id(o)] for o in shard] for shard in plan_shards([t.out for t in tasks], recipe.max_shard_size)]
    plan = Plan(recipe, checkpoints, shards, memory_budget, overrides, vocabulary)
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
