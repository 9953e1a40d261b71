"""Sparse-merge benchmark work, shared by roofline.py (``--suite sparse``) and bench_sparse_merge.py.

Our ``ties_merge`` / ``dare_merge`` / ``magnitude_prune`` beside PEFT's ``merge_utils`` and
mergekit's generalized task arithmetic (``merge_group``, its per-tensor path) on the same inputs.
PEFT's functions take task vectors, so its timing includes forming τᵢ = xᵢ − base and adding base
back, as a user of it must. The peers are optional: missing ones are reported, not faked.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

import fusion_kernels as fk

DENSITY = 0.2
SEED = 0


def peft_merge_utils():
    spec = importlib.util.find_spec("peft")
    if spec is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "utils" / "merge_utils.py"
    module_spec = importlib.util.spec_from_file_location("_peft_merge_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def mergekit_method(name: str):
    if importlib.util.find_spec("mergekit") is None:
        return None
    from mergekit.merge_methods import generalized_task_arithmetic as gta
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.sparsify import SparsificationMethod

    consensus, sparsification, normalize, rescale = {
        "ties": ("sum", SparsificationMethod.magnitude, True, False),
        "dare_ties": ("sum", SparsificationMethod.random, False, True),
        "dare_linear": (None, SparsificationMethod.random, False, True),
    }[name]
    method = gta.GeneralizedTaskArithmeticMerge(
        consensus_method=consensus and gta.ConsensusMethod(consensus),
        sparsification_method=sparsification,
        default_normalize=normalize,
        default_rescale=rescale,
        method_name=name,
        method_pretty_name=None,
        method_reference_url=None,
    )

    def run(a):
        group = TensorGroup.from_tensors([a["base"], *a["xs"]], base_index=0)
        ids = range(1, len(a["xs"]) + 1)
        return method.merge_group(
            group,
            int8_mask=False,
            normalize=normalize,
            rescale=rescale,
            **{"lambda": 1.0},
            weight={i: w for i, w in zip(ids, a["w"], strict=True)},
            density={i: DENSITY for i in ids},
        )

    return run


def make_inputs(models: int, shape: tuple[int, ...], dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    xs = [(base + 0.01 * torch.randn(shape, generator=g)).to(dtype) for _ in range(models)]
    base = base.to(dtype)
    return {"base": base, "xs": xs, "w": [1.0 / models] * models, "out": torch.empty_like(base)}


def _peft(fn_name: str) -> Callable | None:
    peft = peft_merge_utils()
    if peft is None:
        return None

    def run(a):
        deltas = [x - a["base"] for x in a["xs"]]
        weights = torch.tensor(a["w"], dtype=a["base"].dtype)
        if fn_name == "prune":
            return peft.prune(a["xs"][0], DENSITY, method="magnitude")
        return a["base"] + getattr(peft, fn_name)(deltas, weights, DENSITY)

    return run


def implementations(op: str) -> dict[str, Callable | None]:
    """name -> callable(inputs) for one op; None where the library is not installed.

    "fusion_kernels out=" writes into a reused output, as the streaming pipeline does and as the
    copy that measures the bandwidth roof does; "fusion_kernels" returns a new tensor.
    """
    if op == "ties_merge":
        ties = lambda a, **out: fk.ties_merge(a["base"], a["xs"], a["w"], density=DENSITY, **out)  # noqa: E731
        return {
            "fusion_kernels": ties,
            "fusion_kernels out=": lambda a: ties(a, out=a["out"]),
            "peft": _peft("ties"),
            "mergekit": mergekit_method("ties"),
        }
    if op in ("dare_ties", "dare_linear"):
        consensus = "sum" if op == "dare_ties" else None
        dare = lambda a, **out: fk.dare_merge(  # noqa: E731
            a["base"], a["xs"], a["w"], density=DENSITY, seed=SEED, consensus=consensus, **out
        )
        return {
            "fusion_kernels": dare,
            "fusion_kernels out=": lambda a: dare(a, out=a["out"]),
            "peft": _peft(op),
            "mergekit": mergekit_method(op),
        }
    if op == "magnitude_prune":
        return {
            "fusion_kernels": lambda a: fk.magnitude_prune(a["xs"][0], DENSITY),
            "peft": _peft("prune"),
            "mergekit": None,
        }
    raise ValueError(op)


def streamed_bytes(op: str, models: int, numel: int, dtype: torch.dtype) -> tuple[int, int]:
    """(minimum bytes any fused implementation moves, bytes our passes move)."""
    b = numel * dtype.itemsize
    # Selection is one pass over its inputs (sampled bracket), then the merge pass. The radix
    # fallback (mostly-equal values) adds one or two passes; these inputs never take it.
    if op == "magnitude_prune":
        return 2 * b, 3 * b
    minimum = (models + 2) * b  # base + N inputs read, one output written
    select = (models + 1) * b if op == "ties_merge" else 0
    return minimum, minimum + select


SHAPES = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096)}
OPS = ("ties_merge", "dare_ties", "dare_linear", "magnitude_prune")
