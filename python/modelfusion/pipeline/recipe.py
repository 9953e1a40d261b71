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
whose first filter contained in the tensor name applies — mergekit's rules.

Instead of ``models``, ``slices`` build the output layer by layer (mergekit's frankenmerges): each
slice lists ``sources`` (``model``, ``layer_range: [start, end)``, ``parameters``), all of one
length, and may name its own ``base_model`` and ``parameters``. Output layers are numbered in slice
order; inside a slice t = offset / (length − 1). Tensors outside layers come from the first slice's
sources (embeddings) or the last slice's (final norm, LM head), at t = 0. A per-model parameter is
looked up in the source, then the slice, then the recipe; a shared one in the slice, then the recipe.

``tokenizer_source: base | union | MODEL`` (or a ``tokenizer:`` block with ``source``, ``tokens`` and
``pad_to_multiple_of``) writes that tokenizer and aligns every model's embedding and LM-head rows to
its token ids (modelfusion.io.vocabulary); ``chat_template: auto | chatml | llama3 | alpaca | mistral |
exaone | <Jinja>`` sets its chat template (modelfusion.io.chat_templates).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from fusion_kernels import methods as fk_methods
from fusion_kernels.methods import REQUIRED, Param

from ..errors import RecipeError, short_repr
from ..io.chat_templates import NAMED
from ..io.checkpoint import HUB_ID, cached_hub_model, hub_cache_dir
from ..io.vocabulary import TokenizerSpec, TokenRule

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
    "modules",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    # ours
    "seed",
    "memory_budget",
    "threads",
    "device",
    "max_shard_size",
}
LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


@dataclass
class ModelEntry:
    path: Path
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSource:
    path: Path
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Slice:
    sources: list[SliceSource]
    base_model: Path | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        start, end = self.sources[0].layer_range
        return end - start


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
    slices: list[Slice] | None = None  # a slices recipe (models then lists every source model once)
    module_parameters: dict[str, Any] = field(default_factory=dict)  # of its entry of ``modules``
    module_name: str = ""
    modules: list[Recipe] | None = None  # a recipe of several modules: one recipe each
    source: str = ""
    model_card: bool = True  # write README.md and mergekit_config.yml beside the model
    tokenizer: TokenizerSpec | None = None  # tokenizer_source / tokenizer / chat_template

    @property
    def inputs(self) -> list[Path]:
        """Every model read: the base first (when there is one), then the others, each once."""
        paths = ([self.base_model] if self.base_model else []) + [m.path for m in self.models]
        for piece in self.slices or ():
            paths += [piece.base_model] if piece.base_model else []
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


def _reference(value: Any, where: str) -> str:
    """A path, or a hub model (``org/name``, ``org/name@revision`` or mergekit's ``{path, revision}``)
    that is no local path: its snapshot in the local Hugging Face cache (nothing is downloaded)."""
    revision = None
    if isinstance(value, dict) and set(value) <= {"path", "revision"} and isinstance(value.get("path"), str):
        value, revision = value["path"], value.get("revision") or None
    if not isinstance(value, str) or not value or not (revision is None or isinstance(revision, str)):
        raise RecipeError(f"{where}: expected a model path, got {short_repr(value)}")
    if revision is None and "@" in value and not Path(value).exists():
        value, _, revision = value.rpartition("@")  # mergekit's org/name@revision
    if revision is None and Path(value).exists():
        return value
    if HUB_ID.fullmatch(value):
        found = cached_hub_model(value, revision)
        if found is None:
            named = value if revision is None else f"{value}@{revision}"
            raise RecipeError(
                f"{where}: {named!r} is no local path, and the Hugging Face cache ({hub_cache_dir()}) does not "
                f"hold it; models are never downloaded: fetch it first (`huggingface-cli download {value}"
                f"{'' if revision is None else ' --revision ' + revision}`) or give its directory"
            )
        return str(found)
    if revision is not None:
        raise RecipeError(
            f"{where}: revision {short_repr(revision)} of {short_repr(value)}: a revision names a "
            "hub model (org/name) in the local Hugging Face cache"
        )
    return value


def _model_path(value: Any, where: str) -> Path:
    """A model reference: a path or hub model (see _reference), ``model+adapter`` (a PEFT LoRA
    adapter applied as the model is read), or mergekit's mapping ``{model: PATH, lora: PATH}``;
    returned as one path, ``model+adapter`` for a LoRA reference."""
    if isinstance(value, dict) and "model" in value and set(value) <= {"model", "lora", "override_architecture"}:
        model = _reference(value["model"], f"{where}.model")
        lora = _reference(value["lora"], f"{where}.lora") if value.get("lora") is not None else None
        return Path(model if lora is None else f"{model}+{lora}")
    if isinstance(value, str) and "+" in value and not Path(value).exists():
        model, _, lora = value.rpartition("+")
        return Path(f"{_reference(model, where)}+{_reference(lora, where)}")
    return Path(_reference(value, where))


def _tokenizer_source(value: Any, where: str) -> str | Path:
    if value in ("base", "union"):
        return value
    if isinstance(value, (str, dict)):
        return _model_path(value, where)
    raise RecipeError(f"{where}: expected 'base', 'union' or a model path, got {short_repr(value)}")


def _token_rule(token: str, value: Any) -> TokenRule:
    """A ``tokenizer.tokens`` entry: ``{source: MODEL | {kind: zero} | {kind: model_token, model,
    token | token_id}, force: bool}``."""
    where = f"tokenizer.tokens.{token}"
    if not isinstance(value, dict) or set(value) - {"source", "force"}:
        raise RecipeError(f"{where}: expected {{source: ..., force: true|false}}, got {short_repr(value)}")
    force = value.get("force", False)
    if not isinstance(force, bool):
        raise RecipeError(f"{where}.force: expected true or false, got {short_repr(force)}")
    source = value.get("source")
    if source is None:
        return TokenRule(force=force)
    if isinstance(source, dict) and "kind" in source:
        kind = source["kind"]
        if kind == "zero" and set(source) == {"kind"}:
            return TokenRule("zero", force=force)
        if kind == "model_token" and set(source) <= {"kind", "model", "token", "token_id"} and "model" in source:
            token_id, text = source.get("token_id"), source.get("token")
            if (token_id is None) == (text is None):
                raise RecipeError(f"{where}.source: give one of token_id or token, got {short_repr(source)}")
            if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0):
                raise RecipeError(f"{where}.source.token_id: expected an int >= 0, got {short_repr(token_id)}")
            if text is not None and not isinstance(text, str):
                raise RecipeError(f"{where}.source.token: expected a string, got {short_repr(text)}")
            model = _model_path(source["model"], f"{where}.source.model")
            return TokenRule("model_token", model, text, token_id, force)
        raise RecipeError(
            f"{where}.source: expected a model, {{kind: zero}} or {{kind: model_token, model, token|token_id}}, "
            f"got {short_repr(source)}"
        )
    return TokenRule("model", _model_path(source, f"{where}.source"), force=force)


def _tokenizer(raw: dict) -> TokenizerSpec | None:
    """The tokenizer a recipe asks for (mergekit's ``tokenizer_source``, ``tokenizer:``, ``chat_template``)."""
    source, block, template = raw.get("tokenizer_source"), raw.get("tokenizer"), raw.get("chat_template")
    if source is not None and block is not None:
        raise RecipeError("tokenizer_source: give tokenizer_source or a tokenizer block, not both")
    if template is not None and (
        not isinstance(template, str) or (template != "auto" and template not in NAMED and "{" not in template)
    ):
        raise RecipeError(
            f"chat_template: expected 'auto', one of {sorted(NAMED)} or a Jinja template, got {short_repr(template)}"
        )
    tokens, pad = {}, None
    if block is not None:
        if not isinstance(block, dict):
            raise RecipeError(f"tokenizer: expected {{source, tokens, pad_to_multiple_of}}, got {short_repr(block)}")
        for key in block:
            if key not in ("source", "tokens", "pad_to_multiple_of"):
                raise RecipeError(f"tokenizer.{key}: unknown key; expected source, tokens or pad_to_multiple_of")
        source = block.get("source", "union")
        pad = block.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise RecipeError(f"tokenizer.pad_to_multiple_of: expected an int >= 1, got {short_repr(pad)}")
        entries = block.get("tokens") or {}
        if not isinstance(entries, dict):
            raise RecipeError(f"tokenizer.tokens: expected a mapping of token to rule, got {short_repr(entries)}")
        tokens = {str(token): _token_rule(str(token), rule) for token, rule in entries.items()}
    if source is None and template is None:
        return None
    where = "tokenizer.source" if block is not None else "tokenizer_source"
    source = None if source is None else _tokenizer_source(source, where)
    return TokenizerSpec(source, tokens, pad, template)


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
        elif key in IGNORED_BY_MERGEKIT and (where.startswith("models[") or ".sources[" in where):
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


def _slices(raw: Any, method: str, shared: dict[str, Param], per_model: dict[str, Param]) -> list[Slice]:
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"slices: expected a non-empty list of {{sources, parameters}}, got {short_repr(raw)}")
    slices = []
    for n, piece in enumerate(raw):
        where = f"slices[{n}]"
        if not isinstance(piece, dict) or "sources" not in piece:
            raise RecipeError(f"{where}: expected {{sources, base_model, parameters}}, got {short_repr(piece)}")
        extra = set(piece) - {"sources", "base_model", "parameters"}
        if extra:
            what = sorted(map(str, extra))[0]
            hint = " (mergekit 0.1.5 has one merge_method per recipe)" if what == "merge_method" else ""
            raise RecipeError(f"{where}.{short_repr(what)}: unknown key (sources, base_model, parameters){hint}")
        sources = piece["sources"]
        if not isinstance(sources, list) or not sources:
            raise RecipeError(f"{where}.sources: expected a non-empty list of {{model, layer_range}}")
        parsed = []
        for i, source in enumerate(sources):
            at = f"{where}.sources[{i}]"
            keys = {"model", "layer_range", "parameters"}
            if not isinstance(source, dict) or "model" not in source or set(source) - keys:
                raise RecipeError(f"{at}: expected {{model, layer_range, parameters}}, got {short_repr(source)}")
            layer_range = source.get("layer_range")
            if not (
                isinstance(layer_range, list)
                and len(layer_range) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layer_range)
                and layer_range[0] <= layer_range[1]
            ):
                raise RecipeError(
                    f"{at}.layer_range: expected [start, end], two ints with 0 <= start <= end, "
                    f"got {short_repr(layer_range)}"
                )
            params = _parameters(source.get("parameters"), f"{at}.parameters", per_model, method)
            parsed.append(SliceSource(_model_path(source["model"], f"{at}.model"), tuple(layer_range), params))
        lengths = sorted({s.layer_range[1] - s.layer_range[0] for s in parsed})
        if len(lengths) > 1:
            raise RecipeError(f"{where}.sources: every source must span the same number of layers, got {lengths}")
        if len({s.path for s in parsed}) != len(parsed):
            raise RecipeError(f"{where}.sources: a model is listed twice")
        base = _model_path(piece["base_model"], f"{where}.base_model") if piece.get("base_model") else None
        params = _parameters(piece.get("parameters"), f"{where}.parameters", {**shared, **per_model})
        slices.append(Slice(parsed, base, params))
    return slices


def _modules(raw: dict) -> list[tuple[str, dict | None]]:
    """mergekit's ``modules: {name: {models | slices, parameters}}`` as (name, module) pairs; one
    unnamed pair without a module for a ``models`` or ``slices`` recipe. A module's parameters rank
    between a slice's and the recipe's; its name is one of the models' modules (plan.model_modules)."""
    if "modules" not in raw:
        return [("", None)]
    modules = raw["modules"]
    if "models" in raw or "slices" in raw:
        raise RecipeError("modules: give 'modules', 'models' or 'slices', only one of them")
    if not isinstance(modules, dict) or not modules:
        expected = "a mapping of module name to {models | slices}"
        raise RecipeError(f"modules: expected {expected}, got {short_repr(modules)}")
    for name, module in modules.items():
        if not isinstance(module, dict) or set(module) - {"models", "slices", "parameters"}:
            expected = "{models | slices, parameters}"
            raise RecipeError(f"modules.{short_repr(name)}: expected {expected}, got {short_repr(module)}")
        if ("models" in module) == ("slices" in module):
            raise RecipeError(f"modules.{short_repr(name)}: give either 'models' or 'slices', not both and not neither")
    return [(str(name), module) for name, module in modules.items()]


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
        if key not in TOP_KEYS:
            raise RecipeError(f"{key}: unknown key; expected one of {sorted(TOP_KEYS)}")
    method = raw.get("merge_method")
    if method not in METHODS:
        raise RecipeError(f"merge_method: expected one of {list(METHODS)}, got {short_repr(method)}")
    if "modules" not in raw:
        return _recipe(raw, text, method, "", None)
    parts = []
    for name, module in _modules(raw):
        try:
            parts.append(_recipe(raw, text, method, name, module))
        except RecipeError as e:
            message = str(e)
            where = f"modules.{name}." if message.startswith(("models", "slices")) else ""
            raise RecipeError(where + message) from e
    # each module merges its own tensors (plan.model_modules); the whole reads every module's models
    models = list({m.path: m for part in parts for m in part.models}.values())
    return replace(parts[0], models=models, slices=None, module_name="", module_parameters={}, modules=parts)


def _recipe(raw: dict, text: str, method: str, module_name: str, module: dict | None) -> Recipe:
    """The recipe of one module (or of a recipe without ``modules``)."""
    if module is not None:
        inner = {k: v for k, v in module.items() if k != "parameters"}  # its models or slices
        raw = {**{k: v for k, v in raw.items() if k != "modules"}, **inner}
    if ("models" in raw) == ("slices" in raw):
        raise RecipeError("models: give either 'models' or 'slices', not both and not neither")
    per_model, shared = model_params(method), shared_params(method)
    slices = _slices(raw["slices"], method, shared, per_model) if "slices" in raw else None
    entries = raw.get("models")
    if slices is not None:
        entries = [{"model": str(p)} for p in dict.fromkeys(s.path for piece in slices for s in piece.sources)]
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"models: expected a non-empty list, got {short_repr(entries)}")
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
        module_parameters=(
            {}
            if module is None
            else _parameters(module.get("parameters"), f"modules.{module_name}.parameters", {**shared, **per_model})
        ),
        module_name=module_name,
        dtype=_dtype(raw.get("dtype"), "dtype"),
        out_dtype=_dtype(raw.get("out_dtype"), "out_dtype"),
        slices=slices,
        source=text,
        tokenizer=_tokenizer(raw),
    )
    base_merged = slices is None and fk_methods.METHODS[method].base_merged
    if base_merged and base is not None and base not in [m.path for m in models]:
        models.insert(0, ModelEntry(base))  # mergekit's linear (and karcher) merge the base too
    _check_shape_of_recipe(recipe, raw)
    return recipe


def slice_roles(recipe: Recipe, piece: Slice) -> tuple[Path | None, list[SliceSource]]:
    """(the base handed to the method, the sources merged) of one slice: as for a models recipe,
    with the slice's own base_model when it names one; passthrough takes its one source whatever
    the base."""
    spec = fk_methods.METHODS[recipe.merge_method]
    base = piece.base_model or recipe.base_model
    if recipe.merge_method == "passthrough" or spec.base_merged:
        return None, list(piece.sources)
    return base, [s for s in piece.sources if s.path != base]


def _check_slices(recipe: Recipe) -> None:
    spec = fk_methods.METHODS[recipe.merge_method]
    for n, piece in enumerate(recipe.slices):
        base, merged = slice_roles(recipe, piece)
        if spec.needs_base and base is None:
            raise RecipeError(f"slices[{n}]: merge_method {short_repr(recipe.merge_method)} needs a base model")
        if base is not None and base not in [s.path for s in piece.sources]:
            raise RecipeError(
                f"slices[{n}]: the base model {base} is not one of its sources; list it there with a layer_range"
            )
        problem = spec.count_error(len(merged))
        if problem:
            raise RecipeError(f"slices[{n}].sources: {problem}")
        for i, source in enumerate(piece.sources):
            if source not in merged:
                continue
            for key, p in model_params(recipe.merge_method).items():
                levels = (source.parameters, piece.parameters, recipe.module_parameters, recipe.parameters)
                found = any(key in level for level in levels)
                if p.default is REQUIRED and not found:
                    raise RecipeError(f"slices[{n}].sources[{i}].parameters.{key}: required by {recipe.merge_method}")


def _check_shape_of_recipe(recipe: Recipe, raw: dict) -> None:
    method = recipe.merge_method
    spec = fk_methods.METHODS[method]
    if recipe.slices is not None:
        _check_slices(recipe)
    else:
        if spec.needs_base and recipe.base_model is None:
            raise RecipeError(f"base_model: merge_method {short_repr(method)} needs a base model")
        others = len(recipe.models) if spec.base_merged else len(recipe.non_base)
        problem = spec.count_error(others)
        if problem:
            raise RecipeError(f"models: {problem}")
        if len({m.path for m in recipe.models}) != len(recipe.models):
            raise RecipeError("models: a model is listed twice")
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
    for key, p in shared_params(method).items():
        in_slices = recipe.slices is not None and all(key in piece.parameters for piece in recipe.slices)
        given = key in recipe.parameters or key in recipe.module_parameters or in_slices
        if p.default is REQUIRED and not given:
            raise RecipeError(f"parameters.{key}: required by {method}")
    for i, m in enumerate(recipe.models if recipe.slices is None else ()):
        if m.path == recipe.base_model:
            continue
        for key, p in model_params(method).items():
            levels = (m.parameters, recipe.module_parameters, recipe.parameters)
            if p.default is REQUIRED and not any(key in level for level in levels):
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
