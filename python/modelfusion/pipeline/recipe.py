"""YAML merge recipes: mergekit's format for the methods both projects have, plus our options.

    merge_method: ties
    base_model: path/to/base
    models:
      - model: path/to/a
        parameters: {weight: 0.5, density: [0.2, 0.8]}   # a gradient over the layers
    parameters: {normalize: true, lambda: 1.0}
    dtype: bfloat16            # inputs are converted to it; out_dtype defaults to it
    seed: 0                    # ours: DARE/DELLA masks; memory_budget, threads, device, max_shard_size too

A parameter is a scalar, a gradient (a list of numbers, interpolated over the layer index
t = layer / (layers − 1); tensors outside layers take t = 0), or a list of ``{filter, value}``
whose first filter contained in the tensor name applies — mergekit's rules. ``slices`` are
accepted when they cover all layers of every model alike (as mergekit's SLERP examples write it).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from fusion_kernels import methods as fk_methods
from fusion_kernels.methods import REQUIRED, Param

from ..errors import RecipeError, short_repr

METHODS = tuple(fk_methods.METHODS)


def shared_params(method: str) -> dict[str, Param]:
    return dict(fk_methods.METHODS[method].shared_params)


def model_params(method: str) -> dict[str, Param]:
    return dict(fk_methods.METHODS[method].model_params)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    # ours
    "seed",
    "memory_budget",
    "threads",
    "device",
    "max_shard_size",
}
UNSUPPORTED_KEYS = {"modules", "tokenizer", "chat_template"}
LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


@dataclass
class ModelEntry:
    path: Path
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    merge_method: str
    models: list[ModelEntry]
    base_model: Path | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    seed: int = 0
    memory_budget: int | None = None
    threads: int | None = None
    device: str = "cpu"
    max_shard_size: int = 5 * 10**9
    layer_range: tuple[int, int] | None = None  # from single-slice recipes
    source: str = ""
    model_card: bool = True  # write README.md and mergekit_config.yml beside the model

    @property
    def inputs(self) -> list[Path]:
        """Every model read: the base first (when there is one), then the others, each once."""
        paths = ([self.base_model] if self.base_model else []) + [m.path for m in self.models]
        return list(dict.fromkeys(paths))

    @property
    def non_base(self) -> list[ModelEntry]:
        return [m for m in self.models if m.path != self.base_model]

    @property
    def merged(self) -> list[ModelEntry]:
        """The models whose per-model parameters apply: all for ``linear``, else all but the base."""
        return self.models if fk_methods.METHODS[self.merge_method].base_merged else self.non_base


def parse_size(value: Any, key: str) -> int:
    """``4GiB``, ``500MB``, ``1.5G`` or a number of bytes."""
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20}
    units.update({"g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40})
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    text = str(value)[:64] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if (
        not match
        or match.group(2).lower() not in units
        or int(float(match.group(1)) * units[match.group(2).lower()]) < 1
    ):
        raise RecipeError(f"{key}: expected a positive size such as 4GiB or 500MB, got {short_repr(value)}")
    return int(float(match.group(1)) * units[match.group(2).lower()])


def _model_path(value: Any, where: str) -> Path:
    if isinstance(value, dict) and "model" in value:  # mergekit's long form {model: {path: ...}}
        value = value["model"]
    if isinstance(value, dict) and set(value) <= {"path", "lora"} and "path" in value:
        if value.get("lora"):
            raise RecipeError(f"{where}: LoRA references are not supported")
        value = value["path"]
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{where}: expected a model path, got {short_repr(value)}")
    if "+" in value and not Path(value).exists():
        raise RecipeError(f"{where}: 'model+lora' references are not supported, got {short_repr(value)}")
    return Path(value)


IGNORED_BY_MERGEKIT = {"weight"}  # per-model keys mergekit accepts, and ignores, for methods without them


def _parameters(value: Any, where: str, allowed: dict[str, Param], method: str = "") -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: expected a mapping of parameters, got {short_repr(value)}")
    kept = {}
    for key, setting in value.items():
        if key in allowed:
            kept[key] = setting
        elif key in IGNORED_BY_MERGEKIT and where.startswith("models["):
            warnings.warn(f"{where}.{key}: {method} takes no {key!r}; ignored, as mergekit ignores it", stacklevel=3)
        else:
            name = key if isinstance(key, str) and len(key) <= 80 else short_repr(key)
            raise RecipeError(f"{where}.{name}: unknown parameter; expected one of {sorted(allowed)}")
    return kept


def _dtype(value: Any, key: str) -> torch.dtype | None:
    if value is None:
        return None
    if value not in DTYPES:
        raise RecipeError(f"{key}: expected one of {sorted(DTYPES)}, got {short_repr(value)}")
    return DTYPES[value]


def _models_from_slices(slices: Any) -> tuple[list[dict], tuple]:
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        raise RecipeError("slices: only one slice covering all layers is supported (no layer-range frankenmerges)")
    sources = slices[0].get("sources")
    extra = set(slices[0]) - {"sources"}
    if extra:
        raise RecipeError(f"slices[0].{sorted(extra)[0]}: not supported")
    if not isinstance(sources, list) or not sources:
        raise RecipeError("slices[0].sources: expected a list of {model, layer_range}")
    for i, source in enumerate(sources):
        if not isinstance(source, dict):
            raise RecipeError(f"slices[0].sources[{i}]: expected {{model, layer_range}}, got {short_repr(source)}")
        layer_range = source.get("layer_range")
        if layer_range is not None and not (
            isinstance(layer_range, list)
            and len(layer_range) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layer_range)
        ):
            raise RecipeError(
                f"slices[0].sources[{i}].layer_range: expected [start, end], two non-negative ints, "
                f"got {short_repr(layer_range)}"
            )
    ranges = {tuple(s.get("layer_range") or ()) for s in sources}
    if len(ranges) != 1:
        raise RecipeError(f"slices[0].sources: every source must take the same layer_range, got {sorted(ranges)}")
    return [{k: v for k, v in s.items() if k != "layer_range"} for s in sources], next(iter(ranges))


MAX_RECIPE_BYTES = 4 * 2**20
MAX_NODES, MAX_DEPTH = 100_000, 32


def _check_size(raw: Any) -> None:
    """Refuse a recipe whose parsed value is deeper or larger than any real one: YAML aliases can
    expand a few hundred bytes into billions of nodes ("billion laughs"). Walks shared nodes once
    per reference, stopping at the first limit crossed, so the check itself stays cheap."""
    stack, seen = [(raw, 0)], 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_NODES or depth > MAX_DEPTH:
            what = f"more than {MAX_NODES} values" if seen > MAX_NODES else f"nesting deeper than {MAX_DEPTH}"
            raise RecipeError(f"recipe: {what} (YAML aliases can expand a small file); refused")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
            stack.extend((k, depth + 1) for k in value if not isinstance(k, str))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def load_recipe(text_or_path: str | Path) -> Recipe:
    """Parse and check a recipe (YAML text, or the path of a YAML file). Raises RecipeError."""
    text = str(text_or_path)
    if isinstance(text_or_path, Path) or (text.endswith((".yml", ".yaml")) and "\n" not in text):
        try:
            text = Path(text_or_path).read_text()
        except OSError as e:
            raise RecipeError(f"recipe: cannot read {text_or_path}: {e}") from e
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe: {len(text)} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe: not valid YAML: {short_repr(str(e), 300)}") from e
    except RecursionError:
        raise RecipeError("recipe: nested too deeply to parse") from None
    _check_size(raw)
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe: expected a mapping at the top, got {type(raw).__name__}")
    for key in raw:
        if key in UNSUPPORTED_KEYS:
            raise RecipeError(f"{key}: mergekit's {short_repr(key)} is not supported by modelfusion")
        if key not in TOP_KEYS:
            raise RecipeError(f"{key}: unknown key; expected one of {sorted(TOP_KEYS)}")
    method = raw.get("merge_method")
    if method not in METHODS:
        raise RecipeError(f"merge_method: expected one of {list(METHODS)}, got {short_repr(method)}")
    layer_range = None
    if ("models" in raw) == ("slices" in raw):
        raise RecipeError("models: give either 'models' or 'slices', not both and not neither")
    entries = raw.get("models")
    if "slices" in raw:
        entries, layer_range = _models_from_slices(raw["slices"])
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"models: expected a non-empty list, got {short_repr(entries)}")
    per_model, shared = model_params(method), shared_params(method)
    models = []
    for i, entry in enumerate(entries):
        where = f"models[{i}]"
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise RecipeError(f"{where}: expected {{model: PATH, parameters: {{...}}}}, got {short_repr(entry)}")
        params = _parameters(entry.get("parameters"), f"{where}.parameters", per_model, method)
        models.append(ModelEntry(_model_path(entry["model"], f"{where}.model"), params))
    base = _model_path(raw["base_model"], "base_model") if raw.get("base_model") else None
    recipe = Recipe(
        merge_method=method,
        models=models,
        base_model=base,
        parameters=_parameters(raw.get("parameters"), "parameters", {**shared, **per_model}),
        dtype=_dtype(raw.get("dtype"), "dtype"),
        out_dtype=_dtype(raw.get("out_dtype"), "out_dtype"),
        source=text,
    )
    if fk_methods.METHODS[method].base_merged and base is not None and base not in [m.path for m in models]:
        models.insert(0, ModelEntry(base))  # mergekit's linear (and karcher) merge the base too
    _check_shape_of_recipe(recipe, raw, layer_range)
    return recipe


def _check_shape_of_recipe(recipe: Recipe, raw: dict, layer_range) -> None:
    method = recipe.merge_method
    spec = fk_methods.METHODS[method]
    if spec.needs_base and recipe.base_model is None:
        raise RecipeError(f"base_model: merge_method {short_repr(method)} needs a base model")
    others = len(recipe.models) if spec.base_merged else len(recipe.non_base)
    problem = spec.count_error(others)
    if problem:
        raise RecipeError(f"models: {problem}")
    if len({m.path for m in recipe.models}) != len(recipe.models):
        raise RecipeError("models: a model is listed twice")
    if raw.get("tokenizer_source") not in (None, "base"):
        raise RecipeError(f"tokenizer_source: only 'base' is supported, got {short_repr(raw['tokenizer_source'])}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise RecipeError(f"seed: expected an int in [0, 2**63), got {short_repr(seed)}")
    recipe.seed = seed
    if raw.get("memory_budget") is not None:
        recipe.memory_budget = parse_size(raw["memory_budget"], "memory_budget")
    if raw.get("max_shard_size") is not None:
        recipe.max_shard_size = parse_size(raw["max_shard_size"], "max_shard_size")
    threads = raw.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 4096):
        raise RecipeError(f"threads: expected an int in [1, 4096], got {short_repr(threads)}")
    recipe.threads = threads
    device = raw.get("device", "cpu")
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise RecipeError(f"device: expected 'cpu' or 'cuda[:N]', got {short_repr(device)}")
    recipe.device = device
    recipe.layer_range = layer_range or None  # checked against the models' layer count by the planner
    for key, p in shared_params(method).items():
        if p.default is REQUIRED and key not in recipe.parameters:
            raise RecipeError(f"parameters.{key}: required by {method}")
    for i, m in enumerate(recipe.models):
        if m.path == recipe.base_model:
            continue
        for key, p in model_params(method).items():
            if p.default is REQUIRED and key not in m.parameters and key not in recipe.parameters:
                raise RecipeError(f"models[{i}].parameters.{key}: required by {method}")


def layer_position(name: str, num_layers: int) -> float:
    """mergekit's t of a tensor: layer / (layers − 1) inside a layer (1 for a single layer), else 0."""
    match = LAYER.search(name)
    if match is None:
        return 0.0
    return int(match.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def resolve(setting: Any, name: str, t: float, key: str, spec: Param) -> Any:
    """The value of one parameter setting for tensor ``name`` at layer position ``t``."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(s, dict) for s in setting):
        for cond in setting:
            if set(cond) - {"filter", "value"} or "value" not in cond:
                raise RecipeError(f"{key}: expected {{filter, value}} entries, got {short_repr(cond)}")
            f = cond.get("filter")
            if f is None or f == "*" or f in name:
                return resolve(cond["value"], name, t, key, spec)
        return None
    if isinstance(setting, list):
        if not setting:
            return None
        values = [_scalar(v, key, spec) for v in setting]
        if spec.kind is bool:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        return _scalar((1 - (scaled - i0)) * values[i0] + (scaled - i0) * values[i1], key, spec)
    return _scalar(setting, key, spec)


def _scalar(value: Any, key: str, spec: Param) -> Any:
    return spec.check(value, key, RecipeError)
