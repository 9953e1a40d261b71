"""The merge-method table: every recipe method's name, parameters, defaults and checks, and the
computation of one output tensor. Recipes, the streaming pipeline, the in-memory merges of
``modelfusion.average`` and the mergekit plugin all read this one table.

    METHODS["ties"].model_params   -> {"weight": Param(REQUIRED, float), "density": Param(1.0, float, 0, 1)}
    merge_tensor("ties", base, [a, b], {"weight": [1, 1], "density": [.5, .5], ...}, seed)

The generalized task arithmetic family follows mergekit 0.1.5's ``GeneralizedTaskArithmeticMerge``:

    τᵢ = sparsify(xᵢ − base)          (``rescale``: match ‖τᵢ‖₁ after sparsifying)
    vᵢ = wᵢ·τᵢ;  with consensus: keep vᵢ where sign(vᵢ) = sign⁺(Σ vᵢ)
    out = base + λ · Σ vᵢ / (normalize ? Σ agreeing wᵢ : 1)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import spherical
from .errors import FusionError, ParameterError, short_repr
from .ops.arcee import arcee_importance, arcee_select
from .ops.gram import gram
from .ops.magnitude_prune import magnitude_prune, magnitude_thresholds
from .ops.nearswap import nearswap
from .ops.ram_merge import ram_counts, ram_merge
from .ops.sce import sce_energies, sce_select, sce_variance, top_k_threshold
from .ops.slerp import slerp
from .ops.sparse_merge import sparse_merge
from .ops.task_arithmetic import task_arithmetic
from .ops.weighted_sum import weighted_sum
from .reference import composite
from .reference.weighted_sum import accumulation_dtype

REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()


@dataclass(frozen=True)
class Param:
    """One parameter: its default (``REQUIRED`` when there is none; None: optional), kind (float, int or
    bool) and range."""

    default: Any
    kind: type
    lo: float = -math.inf
    hi: float = math.inf

    def check(self, value: Any, key: str, error: type[FusionError] = ParameterError) -> Any:
        """``value`` as a float (or int) in [lo, hi] or a bool; else ``error`` naming ``key``. None is
        accepted where the default is None (an optional setting)."""
        if value is None and self.default is None:
            return None
        if self.kind is int:
            if not isinstance(value, int) or isinstance(value, bool) or not self.lo <= value <= self.hi:
                raise error(f"{key}: expected an integer in [{self.lo}, {self.hi}], got {short_repr(value)}")
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise error(f"{key}: expected true or false, got {short_repr(value)}")
            return value
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise error(f"{key}: expected a number, got {short_repr(value)}") from None
        if isinstance(value, bool) or not math.isfinite(number) or not self.lo <= number <= self.hi:
            raise error(f"{key}: expected a number in [{self.lo}, {self.hi}], got {short_repr(value)}")
        return number


@dataclass(frozen=True)
class Method:
    """A merge method. ``model_params`` take one value per merged model, ``shared_params`` one in all.
    ``others``: how many models are merged besides the base (min, max or None)."""

    name: str
    model_params: Mapping[str, Param]
    shared_params: Mapping[str, Param]
    needs_base: bool = True
    others: tuple[int, int | None] = (1, None)
    sparsify: str | None = None  # the generalized task arithmetic family only
    consensus: str | None = None
    gta: bool = False
    writes_out: bool = True  # merge_tensor writes into a given ``out`` (else it returns a new tensor)
    base_merged: bool = False  # the base, when given, is merged as one more model (linear, karcher)

    @property
    def params(self) -> dict[str, Param]:
        return {**self.shared_params, **self.model_params}

    def count_error(self, others: int) -> str | None:
        """Why ``others`` merged models (besides the base) do not fit this method, or None."""
        lo, hi = self.others
        if lo <= others and (hi is None or others <= hi):
            return None
        count = {1: "one other", 2: "two others"}.get(lo, f"{lo} others")
        what = f"exactly {count}" if lo == hi else f"at least {count}"
        base = "the base model and " if self.needs_base else ""
        return f"{self.name} takes {base}{what}, got {others}"

    def check_values(self, params: Mapping[str, Any], where: str, error: type[FusionError] = ParameterError) -> None:
        """Rules between resolved parameters (``params``: per-model ones as lists)."""
        if self.sparsify == "della":
            for i, (d, e) in enumerate(zip(params["density"], params["epsilon"], strict=True)):
                if not (d - e >= 0.0 and d + e <= 1.0):  # mergekit refuses probabilities outside [0, 1]
                    raise error(f"{where}epsilon[{i}]: expected density ± epsilon within [0, 1], got {d} ± {e}")
        if self.name == "linear" and params["normalize"] and sum(params["weight"]) == 0:
            raise error(f"{where}weight: the weights sum to 0 and normalize is true")


def _gta(name: str, consensus: str | None, sparsify: str | None, normalize: bool, rescale: bool) -> Method:
    per_model = {"weight": Param(REQUIRED, float), "density": Param(1.0, float, 0.0, 1.0)}  # mergekit's spec
    if sparsify == "magnitude_outliers":
        per_model["gamma"] = Param(0.01, float, 0.0, 1.0)
    if sparsify == "della":
        per_model["epsilon"] = Param(0.15, float, 0.0, 1.0)
    shared = {
        "normalize": Param(normalize, bool),
        "rescale": Param(rescale, bool),
        "lambda": Param(1.0, float),
        "int8_mask": Param(False, bool),  # accepted for compatibility: masks are never materialised
    }
    return Method(name, per_model, shared, sparsify=sparsify, consensus=consensus, gta=True)


# (consensus, sparsification, default normalize, default rescale), as mergekit 0.1.5's registry builds them
_GTA = {
    "task_arithmetic": (None, None, False, False),
    "ties": ("sum", "magnitude", True, False),
    "dare_ties": ("sum", "random", False, True),
    "dare_linear": (None, "random", False, True),
    "breadcrumbs": (None, "magnitude_outliers", False, False),
    "breadcrumbs_ties": ("sum", "magnitude_outliers", False, False),
    "della": ("sum", "della", True, True),
    "della_linear": (None, "della", False, True),
}

METHODS: dict[str, Method] = {
    "linear": Method(
        "linear",
        {"weight": Param(REQUIRED, float)},
        {"normalize": Param(True, bool)},
        needs_base=False,
        base_merged=True,
    ),
    **{name: _gta(name, *spec) for name, spec in _GTA.items()},
    "slerp": Method("slerp", {}, {"t": Param(REQUIRED, float, 0.0, 1.0)}, others=(1, 1)),
    "passthrough": Method(
        "passthrough", {"scale": Param(None, float)}, {}, needs_base=False, others=(1, 1), writes_out=False
    ),
    "nearswap": Method("nearswap", {}, {"t": Param(REQUIRED, float, 0.0)}, others=(1, 1)),
    "nuslerp": Method(
        "nuslerp",
        {"weight": Param(REQUIRED, float)},
        {"nuslerp_row_wise": Param(False, bool), "nuslerp_flatten": Param(True, bool)},
        needs_base=False,
        others=(2, 2),
    ),
    "multislerp": Method(
        "multislerp",
        {"weight": Param(REQUIRED, float)},
        {"normalize_weights": Param(True, bool), "eps": Param(1e-8, float, 0.0)},
        needs_base=False,
    ),
    "karcher": Method(
        "karcher",
        {},
        {"max_iter": Param(10, int, 1, 10_000), "tol": Param(1e-5, float, 0.0)},
        needs_base=False,
        base_merged=True,
    ),
    "sce": Method(
        "sce",
        {},
        {"select_topk": Param(1.0, float, 0.0, 1.0), "int8_mask": Param(False, bool)},
    ),
    "model_stock": Method("model_stock", {}, {"filter_wise": Param(False, bool)}, others=(2, None)),
    "arcee_fusion": Method("arcee_fusion", {}, {}, others=(1, 1)),
    "ram": Method("ram", {}, {"epsilon": Param(1e-5, float, 0.0)}, others=(0, None)),
    "ramplus_tl": Method(
        "ramplus_tl",
        {},
        {"r": Param(0.1, float), "alpha": Param(0.2, float), "epsilon": Param(1e-5, float, 0.0)},
        others=(0, None),
    ),
}
GTA_METHODS = tuple(name for name, m in METHODS.items() if m.gta)


def method(name: Any, error: type[FusionError] = ParameterError, key: str = "method") -> Method:
    """The table's entry for ``name``; else ``error`` listing the methods."""
    if not isinstance(name, str) or name not in METHODS:
        raise error(f"{key}: expected one of {list(METHODS)}, got {short_repr(name)}")
    return METHODS[name]


def tensor_seed(seed: int, name: str) -> int:
    """Each tensor's own DARE/DELLA seed from the merge's ``seed`` and the tensor's name, so
    equal-shaped tensors get different masks."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generalized_task_arithmetic(
    name: str,
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    density: float | Sequence[float] = 1.0,
    normalize: bool | None = None,
    rescale: bool | None = None,
    lam: float = 1.0,
    gamma: float | Sequence[float] = 0.01,
    epsilon: float | Sequence[float] = 0.15,
    seed: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One tensor of the task-arithmetic method ``name`` (see the module doc); ``normalize`` and
    ``rescale`` default to the method's own, ``lam`` is λ; ``out`` as in :func:`sparse_merge`."""
    m = method(name)
    if not m.gta:
        raise ParameterError(f"method: expected one of {list(GTA_METHODS)}, got {name!r}")
    if not tensors:
        return base
    normalize = m.shared_params["normalize"].default if normalize is None else normalize
    rescale = m.shared_params["rescale"].default if rescale is None else rescale
    if m.sparsify == "magnitude":
        density = _keep_at_least_one(density, base.numel(), len(tensors))
    return sparse_merge(
        base,
        list(tensors),
        list(weights),
        sparsify=m.sparsify,
        density=density,
        gamma=gamma,
        epsilon=epsilon,
        rescale="l1" if rescale and m.sparsify is not None else None,
        consensus=m.consensus,
        elect_on="weighted",
        combine="mean_weight" if normalize else "sum",
        lam=lam,
        seed=seed,
        out=out,
    )


def _keep_at_least_one(density, numel: int, models: int):
    """mergekit's magnitude sparsification keeps k = max(1, ⌊density·n⌋) for a density > 0: the
    densities whose ⌊density·n⌋ is 0 become one that keeps exactly one element (1.5/n, floored: 1)."""
    values = [float(d) for d in density] if isinstance(density, Sequence) else [float(density)] * models
    fixed = [min(1.0, 1.5 / numel) if 0 < d < 1 and numel and int(d * numel) == 0 else d for d in values]
    return fixed if fixed != values else density


def merge_tensor(
    name: str,
    base: torch.Tensor | None,
    others: list[torch.Tensor],
    params: Mapping[str, Any],
    seed: int,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """One output tensor of method ``name``. ``base``: the base model's tensor (None for ``linear``);
    ``others``: the merged models' tensors; ``params``: resolved values (per-model ones as lists in
    the order of ``others``). Methods whose table entry has ``writes_out`` write into ``out`` when
    given (nuslerp along a dimension returns a new tensor). ``scratch``: a flat uint8 buffer of
    :func:`scratch_buffer_bytes` bytes on the inputs' device that the method may use for its
    temporaries (a reused one spares the page faults of fresh memory)."""
    m = method(name)
    if name == "linear":
        w = params["weight"]
        scale = 1 / sum(w) if params["normalize"] else 1.0
        return weighted_sum(others, [x * scale for x in w], out=out)
    if name == "task_arithmetic":
        w = params["weight"]
        total = sum(w) if params["normalize"] and abs(sum(w)) >= 1e-8 else 1.0  # mergekit's guard
        return task_arithmetic(base, others, [x * params["lambda"] / total for x in w], out=out)
    if m.gta:
        options = {k: params[k] for k in ("density", "gamma", "epsilon") if k in params}
        return generalized_task_arithmetic(
            name,
            base,
            others,
            params["weight"],
            normalize=params["normalize"],
            rescale=params["rescale"],
            lam=params["lambda"],
            seed=seed,
            out=out,
            **options,
        )
    if name == "slerp":
        return slerp(base, others[0], params["t"], out=out)  # the whole tensor, as mergekit's run_merge batches it
    if name == "model_stock":
        return model_stock(base, others, filter_wise=params["filter_wise"], out=out)
    if name == "arcee_fusion":
        return _arcee_fusion(base, others[0], out, scratch)
    return _composite(name, base, others, params, out, scratch)


def scratch_buffer_bytes(name: str, numel: int, dtype: torch.dtype) -> int:
    """Bytes of the ``scratch`` buffer :func:`merge_tensor` uses for method ``name`` on ``numel``
    elements computed in ``dtype`` (0: none): arcee_fusion's fused importance and sce's variances,
    in the accumulation dtype (and sce's mask, a byte each)."""
    if name == "sce":
        return numel * (accumulation_dtype(dtype).itemsize + 1)
    fused = name == "arcee_fusion" and _arcee_fused(numel, dtype)
    return numel * accumulation_dtype(dtype).itemsize if fused else 0


def _composite(
    name: str, base, others: list[torch.Tensor], params: Mapping[str, Any], out=None, scratch=None
) -> torch.Tensor:
    """The methods composed in :mod:`fusion_kernels.reference.composite`; a base, where given, is the
    origin of the spherical ones (they interpolate the task vectors)."""
    if name == "passthrough":
        scale = params["scale"][0]
        return others[0] if scale is None else weighted_sum(others, [scale])
    if name == "nearswap":
        return nearswap(base, others[0], params["t"], out=out)
    if name == "sce":
        return _sce(base, others, params["select_topk"], out, scratch)
    if name == "ram":
        return ram_merge(base, others, params["epsilon"], out=out)
    if name == "ramplus_tl":  # RAM+'s counts over the whole tensor first, then one fused pass
        eps = params["epsilon"]
        scales = composite.ram_scales(ram_counts(base, others, eps), eps, params["r"], params["alpha"])
        return ram_merge(base, others, eps, scales, out=out)
    if name == "karcher":
        uniform = [1 / len(others)] * len(others)
        return spherical.karcher(others, uniform, params["max_iter"], params["tol"], out=out)
    if name == "nuslerp" and params["nuslerp_flatten"]:
        w = params["weight"]
        return spherical.nuslerp(0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w), others, base, out=out)
    if name == "multislerp":
        return spherical.multislerp(others, base, params["weight"], params["normalize_weights"], params["eps"], out=out)
    if base is not None:  # task vectors, in the float32 arithmetic the result is computed in
        wide = torch.float64 if base.dtype == torch.float64 else torch.float32
        origin = base.to(wide)
        others = [x.to(wide) - origin for x in others]
    w = params["weight"]  # nuslerp of vectors along a dimension: per-vector coefficients
    t = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
    merged = composite.nuslerp(t, others[0], others[1], row_wise=params["nuslerp_row_wise"], flatten=False)
    return merged if base is None else (origin + merged).to(base.dtype)


ELEMENTWISE_CHUNK = 1 << 18  # elements per step of the elementwise composites: their temporaries stay in cache


def _by_chunks(fn, base: torch.Tensor, others: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """An elementwise composite ``fn(base, others, where)`` evaluated piece by piece into one
    output (``out`` when given): the same values, with float32 temporaries of one piece instead of
    the whole tensor."""
    result = torch.empty(base.shape, dtype=base.dtype, device=base.device) if out is None else out
    flat = result.view(-1)
    for where, (b, *xs) in composite.flat_pieces([base, *others], ELEMENTWISE_CHUNK):
        flat[where] = fn(b, xs, where)
    return result


ARCEE_EXACT_NUMEL = 1_000_000  # mergekit takes exact quartiles up to this many elements, a random sample's above


def _arcee_fused(numel: int, dtype: torch.dtype) -> bool:
    """Whether arcee_fusion takes the fused importance (else the reference's float32 steps)."""
    return numel > ARCEE_EXACT_NUMEL or dtype in (torch.float16, torch.bfloat16)


def _arcee_fusion(
    base: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """reference.composite.arcee_fusion: x where its importance reaches median + 1.5·IQR, else the
    base. For float32/float64 tensors of up to ARCEE_EXACT_NUMEL elements the importance takes the
    reference's float32 steps (by pieces of whole vectors), so such a merge equals mergekit's bit for
    bit. Otherwise it comes from the fused :func:`fusion_kernels.arcee_importance` (into ``scratch``
    when given), whose KL is far closer to the float64 formula than the reference's (whose float32
    rounding is of the order of the KL of two close vectors): there mergekit's own result is not
    reproducible in bits anyway — its cut comes from a random sample of 10⁶ elements, and it
    computes 16-bit merges in 16 bits."""
    if base.numel() == 0 or base.dim() == 0:
        merged = composite.arcee_fusion(base, x)
        return merged if out is None else out.copy_(merged)
    width = base.shape[-1]
    b2, x2 = base.reshape(-1, width), x.reshape(-1, width)
    if _arcee_fused(base.numel(), base.dtype):
        wide = accumulation_dtype(base.dtype)
        buffer = None if scratch is None else scratch[: base.numel() * wide.itemsize].view(wide).view(b2.shape)
        importance = arcee_importance(b2, x2, out=buffer)
    else:
        importance = torch.empty(b2.shape, dtype=base.dtype, device=base.device)
        step = max(1, ELEMENTWISE_CHUNK // max(width, 1))
        for r in range(0, b2.shape[0], step):  # the reference's steps, written into the importance
            b, x_rows = b2[r : r + step], x2[r : r + step]
            torch.sub(x_rows, b, out=importance[r : r + step]).abs_().mul_(composite.arcee_kl(b, x_rows))
    q1, median, q3 = _quartiles(importance.reshape(-1))
    return arcee_select(base, x, importance.view(base.shape), median + 1.5 * (q3 - q1), out=out)


def _quartiles(values: torch.Tensor) -> list[float]:
    """mergekit's quartiles of non-negative values, by selection: the sorted values at indices
    ⌊f·(n − 1)⌋ for f = 0.25, 0.5, 0.75."""
    n = values.numel()
    return magnitude_thresholds(values, [n - int(f * (n - 1)) for f in (0.25, 0.5, 0.75)]).tolist()


def _sce(
    base: torch.Tensor,
    others: list[torch.Tensor],
    density: float,
    out: torch.Tensor | None,
    scratch: torch.Tensor | None,
) -> torch.Tensor:
    """reference.composite.sce's steps: the variances by one pass, the top-k by variance (its
    threshold by radix selection, the mask and the energies over it by one more pass), the merge on
    the sparse engine; variances and mask in ``scratch`` when given (see :func:`scratch_buffer_bytes`)."""
    mask = energies = None
    if density < 1:
        var_buf = mask_buf = None
        if scratch is not None:
            wide = accumulation_dtype(base.dtype)
            split = base.numel() * wide.itemsize
            var_buf = scratch[:split].view(wide).view(base.shape)
            mask_buf = scratch[split : split + base.numel()].view(torch.bool).view(base.shape)
        var, nonzero = sce_variance(base, others, out=var_buf)
        mask, energies = _sce_top_k(base, others, var, int(nonzero * density), mask_buf)
        del var
    if energies is None:
        energies = sce_energies(base, others, mask)
    weights = composite.sce_weights([e / max(base.numel(), 1) for e in energies])
    if not any(0 < w < 1e-6 for w in weights):  # else the reference's 1e-6 floor on Σ agreeing wᵢ applies
        # the same election and weighted mean as the sparse engine's: one fused pass
        masks = None if mask is None else [mask] * len(others)
        return sparse_merge(base, others, weights, sparsify=None, masks=masks, elect_on="unweighted", out=out)
    flat_mask = None if mask is None else mask.view(-1)
    return _by_chunks(
        lambda b, xs, where: composite.sce_combine(b, xs, None if mask is None else flat_mask[where], weights),
        base,
        others,
        out,
    )


def _sce_top_k(base, others, var: torch.Tensor, k: int, out: torch.Tensor | None):
    """The mask of the k largest variances (ties at the threshold: lowest index; NaN ranks above
    inf) and the energies over it (None where the k-th largest is not finite: the mask then comes
    from magnitude_prune). Returns (mask, energies)."""
    if out is None:
        out = torch.empty(var.shape, dtype=torch.bool, device=var.device)
    if k <= 0:
        return out.zero_(), [0.0] * len(others)
    threshold, cut = top_k_threshold(var, k)
    if math.isfinite(threshold):
        mask, _, energies = sce_select(base, others, var, threshold, k, out=out, cut=cut)
        return mask, energies
    torch.ne(magnitude_prune(var, k=k), 0, out=out)
    return out, None


MODEL_STOCK_CHUNK = 1 << 20  # elements per step of model_stock's float64 passes: bounds its scratch memory


def scratch_bytes(name: str, numel: int, models: int) -> int:
    """Bytes method ``name`` allocates beside its inputs and output for a tensor of ``numel`` elements
    merged from ``models`` tensors (the base included): what a memory budget must count."""
    if name == "model_stock":  # its float64 chunk buffers (see model_stock)
        return 8 * min(numel, MODEL_STOCK_CHUNK) * (models + 2)
    if name in COMPOSITE_BYTES:
        per_model, once, per_piece = COMPOSITE_BYTES[name]
        return (per_model * models + once) * numel + per_piece * models * min(numel, ELEMENTWISE_CHUNK)
    return 4 * numel  # the kernels' float32 scratch (DELLA's ranks and keep probabilities included)


# bytes per element of the float32 temporaries of the methods beyond task arithmetic, measured with
# bf16 and float32 inputs (the larger, rounded up): (whole tensor, per model), (whole tensor, once),
# (one piece of ELEMENTWISE_CHUNK elements, per model: the methods run by _by_chunks)
COMPOSITE_BYTES = {
    "passthrough": (0, 0, 0),
    "nuslerp": (8, 0, 0),  # along a dimension (flattened: from the Gram matrix, as multislerp and karcher)
    "multislerp": (0, 0, 0),
    "karcher": (0, 0, 0),
    "nearswap": (0, 0, 0),
    "ram": (0, 0, 0),  # fused (ram_merge)
    "ramplus_tl": (0, 0, 0),
    # once: the float32 variances and the mask (the pooled scratch), the merge's float32 scratch, and
    # magnitude_prune's copy where the threshold is not finite; per piece: the torch backend's steps
    "sce": (0, 13, 14),
    "arcee_fusion": (0, 4, 16),  # once: the float32 importance
}


def model_stock(
    base: torch.Tensor, others: list[torch.Tensor], filter_wise: bool = False, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Model Stock (Jang et al., 2024), as mergekit computes it: with offsets dᵢ = xᵢ − base and
    c the mean pairwise cosine of the dᵢ (per vector along the last dimension when ``filter_wise``),
    t = N·c / (1 + (N − 1)·c)   (0 where the denominator vanishes),
    out = t·mean(xᵢ) + (1 − t)·base.
    The statistics are one float64 Gram pass over the offsets (:func:`fusion_kernels.gram`); the
    per-vector combination runs over chunks of ``MODEL_STOCK_CHUNK`` elements in buffers allocated
    once (no offset, no float64 copy of a whole tensor; see :func:`scratch_bytes`). Written into
    ``out`` when given (a tensor like ``base``)."""
    n = len(others)
    rows = base.numel() // base.shape[-1] if filter_wise and base.dim() > 1 and base.numel() else 1
    flat = [x.reshape(rows, -1) for x in [base, *others]]
    cols = flat[0].shape[1]
    products = gram(others, base, rows=rows).to(base.device)  # [rows, n, n] of the offsets, in float64
    norms = products.diagonal(dim1=1, dim2=2).sqrt()
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = torch.stack(
        [(products[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1, 1) for i, j in pairs]
    ).mean(0)
    denominator = 1 + (n - 1) * cos
    t = torch.where(denominator.abs() < 1e-6, 0.0, n * cos / torch.where(denominator.abs() < 1e-6, 1.0, denominator))
    if rows == 1:
        w = float(t)
        return weighted_sum([base, *others], [1 - w] + [w / n] * n, out=out)
    result = torch.empty_like(base) if out is None else out
    flat_out = result.reshape(rows, cols)
    buffers = torch.empty(2, min(rows * cols, MODEL_STOCK_CHUNK), dtype=torch.float64, device=base.device)
    for r, c, k in _chunks(rows, cols):
        acc = buffers[0, : k * _width(c, cols)].view(k, -1)
        part = buffers[1, : acc.numel()].view(k, -1)
        acc.copy_(flat[0][r, c]).mul_(1 - t[r, None])
        for x in flat[1:]:
            acc.add_(part.copy_(x[r, c]).mul_(t[r, None] / n))
        flat_out[r, c] = acc
    return result


def _width(c: slice, cols: int) -> int:
    return len(range(*c.indices(cols)))


def _chunks(rows: int, cols: int):
    """(row slice, column slice, rows in it): pieces of a [rows, cols] matrix of at most
    MODEL_STOCK_CHUNK elements each."""
    if cols >= MODEL_STOCK_CHUNK:
        for r in range(rows):
            for c in range(0, cols, MODEL_STOCK_CHUNK):
                yield slice(r, r + 1), slice(c, c + MODEL_STOCK_CHUNK), 1
        return
    step = max(1, MODEL_STOCK_CHUNK // max(cols, 1))
    for r in range(0, rows, step):
        yield slice(r, r + step), slice(None), min(step, rows - r)
