"""LoRA extraction: a fine-tuned model as a PEFT adapter on its base.

For each linear layer's weight the task matrix Δ = W_tuned − W_base is replaced by its best rank-r
approximation (Eckart–Young: the r largest singular triplets of a float32 SVD), written as PEFT's
factors with the singular values split evenly, B = U·√S [out, r] and A = √S·Vᵀ [r, in], and
``lora_alpha = r`` so PEFT's scale α/r is 1 (mergekit-extract-lora's layout). A matrix of rank
below r keeps its own rank (``rank_pattern``). Embeddings, the LM head and other tensors that
differ but are no linear layer's matrix (norms, biases) are saved whole (``modules_to_save``, PEFT
applies them by module name). Tensors are read one at a time, so the memory needed is the largest
matrix's SVD, not the model; the adapter is written atomically (a ``.partial`` directory renamed
when complete).
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import fusion_kernels as fk

from ..errors import CheckpointError, OutputError, RecipeError
from ..io import Checkpoint
from ..io.lora import ADAPTER_PREFIX
from ..io.writer import OutputTensor, ShardWriter, write_json_atomic
from .executor import peak_rss
from .plan import BEFORE_LAYERS, human_bytes

WHOLE = re.compile(BEFORE_LAYERS.pattern + "|lm_head")  # embeddings and the head: saved whole, as mergekit does


@dataclass
class Extraction:
    rank: int
    modules: int  # linear layers given factors
    saved_whole: list[str] = field(default_factory=list)
    relative_error: float = 0.0  # ‖Δ − B·A‖_F / ‖Δ‖_F over every factored matrix together
    seconds: float = 0.0
    peak_rss: int = 0


def _svd_bytes(shape: tuple[int, ...]) -> int:
    """Float32 Δ and its residual Δ − B·A, and the most a truncated SVD of it may take: a full
    SVD's factors (U, Vᵀ of the smaller side) and LAPACK's workspace of about as much."""
    m, n = shape
    k = min(m, n)
    return 4 * (2 * m * n + m * k + k * n + k * k + max(m, n) * k)


def extract_lora(
    base: str | Path,
    tuned: str | Path,
    out: str | Path,
    rank: int,
    *,
    memory_budget: int | None = None,
    progress: bool = True,
) -> Extraction:
    """Write into ``out`` a PEFT LoRA adapter of rank ``rank`` that turns ``base`` into (nearly) ``tuned``."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise RecipeError(f"rank: expected an int >= 1, got {rank!r}")
    start = time.perf_counter()
    b, t = Checkpoint(Path(base)), Checkpoint(Path(tuned))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"{out}: exists and is not an empty directory; the adapter is not written over it")
    for name, info in t.tensors.items():
        other = b.tensors.get(name)
        if other is None or other.shape != info.shape:
            what = "lacks it" if other is None else f"has shape {other.shape}"
            raise CheckpointError(f"tensor {name!r}: {info.shape} in {t.path}, but {b.path} {what}")
    linear = [n for n, i in t.tensors.items() if len(i.shape) == 2 and n.endswith(".weight") and not WHOLE.search(n)]
    largest = max((_svd_bytes(t.tensors[n].shape) for n in linear), default=0)
    if memory_budget is not None and largest > memory_budget:
        raise RecipeError(
            f"memory_budget: {human_bytes(memory_budget)} is below what the largest matrix's SVD needs "
            f"({human_bytes(largest)})"
        )
    factors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    whole: dict[str, torch.Tensor] = {}
    dropped, total = 0.0, 0.0
    for name in tqdm(list(t.tensors), desc="extract-lora", unit="tensor", disable=not progress):
        x, x0 = t.read(name), b.read(name)
        if not x.is_floating_point() or torch.equal(x, x0):
            continue
        module = name.removesuffix(".weight")
        if name not in linear:
            whole[name] = x
            continue
        delta = x.float() - x0.float()
        u, s, vh = fk.truncated_svd(delta, min(rank, *delta.shape))
        r = int((s > 0).sum())
        total += float(torch.linalg.vector_norm(delta)) ** 2
        if r == 0:
            continue
        root = s[:r].sqrt()
        factors[f"{ADAPTER_PREFIX}{module}.lora_A.weight"] = (root[:, None] * vh[:r]).to(x.dtype)
        factors[f"{ADAPTER_PREFIX}{module}.lora_B.weight"] = (u[:, :r] * root).to(x.dtype)
        if r != rank:
            ranks[module] = r
        delta -= (u[:, :r] * s[:r]) @ vh[:r]  # the part a rank-r adapter leaves out
        dropped += float(torch.linalg.vector_norm(delta)) ** 2
    targets = sorted({k.rsplit(".", 2)[0].rsplit(".", 1)[-1] for k in factors})  # q_proj of m.q_proj.lora_A.weight
    saved = sorted({_module_name(n) for n in whole})
    # PEFT wraps every module of a saved name and loads each one's tensors: the unchanged ones too
    for name in t.tensors:
        if name not in whole and _module_name(name) in saved:
            whole[name] = t.read(name)
    tensors = {**factors, **{ADAPTER_PREFIX + n: whole[n] for n in sorted(whole)}}
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(b.path),
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": ranks,
        "alpha_pattern": ranks,
        "target_modules": targets,
        "modules_to_save": saved or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    _write_adapter(out, tensors, config)
    return Extraction(
        rank=rank,
        modules=len(factors) // 2,
        saved_whole=sorted(whole),  # every tensor of the modules saved whole
        relative_error=(dropped / total) ** 0.5 if total else 0.0,
        seconds=time.perf_counter() - start,
        peak_rss=peak_rss(),
    )


def _module_name(tensor: str) -> str:
    """``input_layernorm`` of ``model.layers.1.input_layernorm.weight``: the name PEFT matches."""
    return tensor.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1]


def _write_adapter(out: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """adapter_model.safetensors and adapter_config.json into ``out.partial``, renamed ``out`` when complete."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        specs = [OutputTensor(n, v.dtype, tuple(v.shape)) for n, v in tensors.items()]
        writer = ShardWriter(partial / "adapter_model.safetensors", specs)
        for v in tensors.values():
            writer.write(v.contiguous())
        writer.commit()
        write_json_atomic(partial / "adapter_config.json", config)
        if out.exists():
            out.rmdir()  # checked empty above
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
