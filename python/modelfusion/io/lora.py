"""LoRA references (mergekit's ``model+adapter``): a PEFT adapter's update added to the base model's
tensors as they are read, with no merged copy of the model anywhere.

For a module ``m`` the adapter holds ``base_model.model.m.lora_A.weight`` [r, in] and
``...lora_B.weight`` [out, r]; ``m.weight`` then reads as W + s·B·A, s = lora_alpha / r
(lora_alpha / √r with ``use_rslora``; ``alpha_pattern`` and ``rank_pattern`` per module, as PEFT
matches them). Embeddings (``lora_embedding_A``/``_B``) and ``fan_in_fan_out`` layers add (B·A)ᵀ.
Full tensors the adapter saves (``modules_to_save``, an embedding's ``base_layer``, trained biases)
replace the base's.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

from ..errors import CheckpointError, short_repr
from .checkpoint import Checkpoint, LoraDelta, TensorInfo, read_header

ADAPTER_PREFIX = "base_model.model."
FACTORS = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.default)?(?:\.weight)?$"
)


def split_reference(path: Path) -> tuple[Path, Path | None]:
    """``model+adapter`` as (model, adapter); a path that exists (or has no ``+``) is a model."""
    text = str(path)
    if path.exists() or "+" not in text:
        return path, None
    model, _, adapter = text.rpartition("+")
    return Path(model), Path(adapter)


def open_model(path: Path, *, allow_pickle: bool = False) -> Checkpoint:
    """The checkpoint at ``path``, with the LoRA adapter of a ``model+adapter`` reference attached."""
    model, adapter = split_reference(path)
    checkpoint = Checkpoint(model, allow_pickle=allow_pickle)
    if adapter is not None:
        checkpoint.tensors = attach_adapter(checkpoint.tensors, adapter)
    return checkpoint


def _adapter_config(adapter: Path) -> dict:
    path = adapter / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"{adapter}: not a PEFT adapter (cannot read adapter_config.json: {e})") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {short_repr(str(e), 200)}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(f"{path}: peft_type {short_repr(kind)}; only LoRA adapters can be applied")
    if config.get("use_dora"):
        raise CheckpointError(f"{path}: a DoRA adapter (use_dora); only plain LoRA can be applied")
    return config


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the first pattern key that matches the end of the module's name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def attach_adapter(tensors: dict[str, TensorInfo], adapter: Path) -> dict[str, TensorInfo]:
    """``tensors`` with the adapter's updates attached (and its full tensors in place of the base's);
    CheckpointError names an adapter tensor that fits nothing or fits badly."""
    config = _adapter_config(adapter)
    weights = adapter / "adapter_model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"{adapter}: no adapter_model.safetensors (only safetensors adapters can be applied)")
    factors: dict[str, dict[str, TensorInfo]] = {}
    embeddings = set()
    out = dict(tensors)
    for name, info in read_header(weights).items():
        key = name.removeprefix(ADAPTER_PREFIX)
        match = FACTORS.match(key)
        if match:
            factors.setdefault(match["module"], {})[match["kind"][-1]] = info
            if "embedding" in match["kind"]:
                embeddings.add(match["module"])
        elif "lora_" in key:
            raise CheckpointError(f"{weights}: tensor {name!r} is not a LoRA factor this reader knows")
        else:  # a module saved whole (modules_to_save, an embedding's base layer) or a trained bias
            key = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key).replace(".base_layer.", ".")
            if key not in out or out[key].shape != info.shape:
                raise CheckpointError(f"{weights}: tensor {name!r} replaces nothing of the same shape in the model")
            out[key] = info
    for module, pair in factors.items():
        target = f"{module}.weight"
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{weights}: module {module!r} lacks one of its lora_A and lora_B")
        if target not in out:
            raise CheckpointError(f"{weights}: the model has no {target!r} for the adapter's module {module!r}")
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        transpose = bool(config.get("fan_in_fan_out")) or module in embeddings
        shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
        if len(a.shape) != 2 or len(b.shape) != 2 or b.shape[1] != rank or tuple(out[target].shape) != shape:
            raise CheckpointError(
                f"{weights}: module {module!r}: lora_A {a.shape} and lora_B {b.shape} do not fit "
                f"{target!r} {out[target].shape}"
            )
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        out[target] = replace(out[target], lora=LoraDelta(a, b, float(scale), transpose))
    return out
