"""``sparse_merge`` and its presets ``ties_merge``, ``dare_merge``, ``breadcrumbs_merge``, ``della_merge``.

The formula of every option is in :mod:`fusion_kernels.reference.sparse_merge`.
"""

from collections.abc import Sequence

import torch

from .. import _native, _sparse_native, _validate
from .. import reference as ref
from .. import triton as _triton
from .._dispatch import select
from ..errors import ShapeError, WeightError
from ..reference.sparse_merge import threshold_key
from ._engine import custom_op, empty_like, fake_like, run

OP = "sparse_merge"
SPARSIFY = (None, "magnitude", "random", "magnitude_outliers", "della", "threshold")
RESCALE = (None, "inverse_density", "l1")
CONSENSUS = (None, "sum", "count")
ELECT_ON = ("weighted", "unweighted")
COMBINE = ("sum", "mean_count", "mean_weight", "max")


def _torch_impl(out, base, xs, weights, sparsify, rescale, consensus, elect_on, combine, *rest):
    densities, gammas, epsilons, lam, seed, thresholds, tie_sign, first_model, masks = rest
    out.copy_(
        ref.sparse_merge(
            base,
            xs,
            weights,
            sparsify=sparsify or None,
            densities=densities,
            gammas=gammas,
            epsilons=epsilons,
            rescale=rescale or None,
            consensus=consensus or None,
            elect_on=elect_on,
            combine=combine,
            lam=lam,
            seed=seed,
            masks=masks or None,
            thresholds=thresholds,
            tie_sign=tie_sign,
            first_model=first_model,
        )
    )


def _cpu_impl(out, base, xs, weights, sparsify, rescale, consensus, elect_on, combine, *rest):
    _sparse_native.sparse_merge(
        out, base, xs, weights, sparsify or None, rescale or None, consensus or None, elect_on, combine, *rest
    )


def _cpu_declines(base, xs, weights, sparsify, rescale, consensus, elect_on, combine, *rest):
    masks = rest[-1]
    return _sparse_native.sparse_declines(xs, sparsify, rescale, masks)


_cpu_impl.declines = _cpu_declines


_triton_impl = _triton.lazy("sparse_merge")
_triton_impl.declines = _triton.lazy("sparse_merge", "declines")
IMPLS = {"torch": _torch_impl, "cpu": _cpu_impl, "triton": _triton_impl}


# Schema limits: "" stands for None in the string options and [] for no masks.
@custom_op("fusion_kernels::sparse_merge", mutates_args=())
def _sparse_merge(
    base: torch.Tensor | None,
    xs: list[torch.Tensor],
    weights: list[float],
    sparsify: str,
    rescale: str,
    consensus: str,
    elect_on: str,
    combine: str,
    densities: list[float],
    gammas: list[float],
    epsilons: list[float],
    lam: float,
    seed: int,
    thresholds: list[float],
    tie_sign: int,
    first_model: int,
    masks: list[torch.Tensor],
) -> torch.Tensor:
    out = empty_like(xs[0])
    args = (
        sparsify,
        rescale,
        consensus,
        elect_on,
        combine,
        densities,
        gammas,
        epsilons,
        lam,
        seed,
        thresholds,
        tie_sign,
    )
    args = (*args, first_model, masks)
    run(OP, IMPLS, out, base, xs, weights, *args)
    return out


@_sparse_merge.register_fake
def _(base, xs, weights, *options):
    return fake_like(xs[0])


@custom_op("fusion_kernels::sparse_merge_out", mutates_args=("out",))
def _sparse_merge_out(
    base: torch.Tensor | None,
    xs: list[torch.Tensor],
    weights: list[float],
    sparsify: str,
    rescale: str,
    consensus: str,
    elect_on: str,
    combine: str,
    densities: list[float],
    gammas: list[float],
    epsilons: list[float],
    lam: float,
    seed: int,
    thresholds: list[float],
    tie_sign: int,
    first_model: int,
    masks: list[torch.Tensor],
    out: torch.Tensor,
) -> None:
    args = (
        sparsify,
        rescale,
        consensus,
        elect_on,
        combine,
        densities,
        gammas,
        epsilons,
        lam,
        seed,
        thresholds,
        tie_sign,
    )
    args = (*args, first_model, masks)
    run(OP, IMPLS, out, base, xs, weights, *args)


@_sparse_merge_out.register_fake
def _(base, xs, weights, *options_and_out):
    return None


def sparse_merge(
    base: torch.Tensor | None,
    xs: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float] | torch.Tensor | float | None = None,
    *,
    sparsify: str | None = "magnitude",
    density: float | Sequence[float] = 1.0,
    gamma: float | Sequence[float] = 0.01,
    epsilon: float | Sequence[float] = 0.15,
    rescale: str | None = None,
    consensus: str | None = "sum",
    elect_on: str = "weighted",
    combine: str = "mean_weight",
    lam: float = 1.0,
    seed: int = 0,
    masks: Sequence[torch.Tensor] | None = None,
    threshold: float | Sequence[float] = 0.0,
    tie_sign: int = 1,
    first_model: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """General sparse task-vector merge: sparsify each τᵢ = xᵢ − base, rescale, elect signs, combine.

    Args:
        base: the pre-trained tensor ``[*shape]``, or None when ``xs`` already are task vectors
            (then the result is the merged task vector, as PEFT's functions return).
        xs: N fine-tuned tensors (or task vectors) like ``base``, or stacked ``[N, *shape]``.
        weights: N floats (one float for all; None: 1 each).
        sparsify: ``"magnitude"`` | ``"random"`` | ``"magnitude_outliers"`` | ``"della"`` |
            ``"threshold"`` (keep |τᵢ| ≥ ``threshold``, e.g. a model-wide one from
            :func:`~fusion_kernels.global_magnitude_threshold`) | None.
        density: kept fraction in [0, 1], one or per model; k = ⌊density·numel⌋ for magnitude.
        gamma: ``magnitude_outliers``: fraction of largest magnitudes dropped, in [0, 1].
        epsilon: ``della``: spread of keep probabilities around density.
        rescale: ``"inverse_density"`` | ``"l1"`` | None.
        consensus: ``"sum"`` | ``"count"`` | None (sign election).
        elect_on: ``"weighted"`` (mergekit) or ``"unweighted"`` (PEFT) deltas vote.
        combine: ``"sum"`` | ``"mean_count"`` (PEFT) | ``"mean_weight"`` (mergekit ``normalize``) |
            ``"max"`` (σ·the largest agreeing |wᵢ·tᵢ|, FusionBench's TIES ``max``; needs a consensus).
        lam: λ, scales the merged task vector.
        seed: 0 ≤ seed < 2⁶³, for ``random`` and ``della``: same seed, same masks on every backend.
        masks: N bool tensors like ``xs`` replacing the sparsify step (for testing, or a caller's own).
        threshold: ``threshold``: the magnitude each |τᵢ| must reach, ≥ 0, one or per model.
        tie_sign: +1, −1 or 0, the sign elected where the tally is exactly 0 (0: no model agrees
            there); FusionBench's TIES passes its majority sign.
        first_model: ``random``/``della``: xs[i] draws model ``first_model + i``'s stream (≥ 0), so
            one model's mask can be drawn alone exactly as in a call with all of them.
        out: optional output, may be ``base`` or one of ``xs``.

    The exact formulas are in :mod:`fusion_kernels.reference.sparse_merge`.
    """
    op = OP
    xs = _validate.tensor_list(op, "xs", xs)
    ref_t, ref_name = (base, "base") if base is not None else (xs[0], "xs[0]")
    if base is not None:
        _validate.check_tensor(op, "base", base)
    _validate.check_float(op, ref_name, ref_t)
    _validate.inputs_like(op, "xs", xs, ref_t, ref_name)
    n = len(xs)
    w = _validate.weight_list(op, "weights", weights, n, default=1.0)
    _validate.choice(op, "sparsify", sparsify, SPARSIFY)
    _validate.choice(op, "rescale", rescale, RESCALE)
    _validate.choice(op, "consensus", consensus, CONSENSUS)
    _validate.choice(op, "elect_on", elect_on, ELECT_ON)
    _validate.choice(op, "combine", combine, COMBINE)
    densities = _validate.per_model(op, "density", density, n, 0.0, 1.0)
    gammas = _validate.per_model(op, "gamma", gamma, n, 0.0, 1.0)
    epsilons = _validate.per_model(op, "epsilon", epsilon, n, 0.0, 1.0)
    if sparsify == "della":
        for i, (d, e) in enumerate(zip(densities, epsilons, strict=True)):
            if not (d - e >= 0.0 and d + e <= 1.0):
                raise WeightError(
                    f"{op}: argument 'epsilon[{i}]' expected density ± epsilon within [0, 1], "
                    f"got density {d}, epsilon {e}"
                )
    if rescale == "inverse_density" and any(d == 0 for d in densities) and sparsify is not None:
        raise WeightError(f"{op}: argument 'density' must be > 0 with rescale='inverse_density', got {densities}")
    lam = _validate.finite_float(op, "lam", lam)
    seed = _validate.seed(op, seed)
    thresholds = _validate.per_model(op, "threshold", threshold, n, 0.0, float("inf"))
    if sparsify == "threshold" and rescale == "inverse_density":
        raise WeightError(f"{op}: rescale='inverse_density' needs keep probabilities; sparsify='threshold' has none")
    if tie_sign not in (1, -1, 0) or isinstance(tie_sign, bool):
        raise WeightError(f"{op}: argument 'tie_sign' expected +1, -1 or 0, got {tie_sign!r}")
    if combine == "max" and consensus is None:
        raise WeightError(f"{op}: combine='max' takes the elected sign's largest magnitude; it needs a consensus")
    if not isinstance(first_model, int) or isinstance(first_model, bool) or not 0 <= first_model < 2**31 - n:
        raise WeightError(f"{op}: argument 'first_model' expected an int in [0, 2^31 - {n}), got {first_model!r}")
    if masks is not None:
        masks = _validate.tensor_list(op, "masks", masks)
        if len(masks) != n:
            raise ShapeError(f"{op}: argument 'masks' expected {n} tensors (one per input), got {len(masks)}")
        for i, m in enumerate(masks):
            if m.dtype != torch.bool or m.shape != ref_t.shape or m.device != ref_t.device:
                raise ShapeError(
                    f"{op}: argument 'masks[{i}]' expected a bool tensor of shape {tuple(ref_t.shape)} "
                    f"on {ref_t.device}, got {m.dtype} {tuple(m.shape)} on {m.device}"
                )
    args = (
        sparsify or "",
        rescale or "",
        consensus or "",
        elect_on,
        combine,
        densities,
        gammas,
        epsilons,
        lam,
        seed,
        thresholds,
        tie_sign,
        first_model,
        list(masks) if masks is not None else [],
    )
    if out is None:
        return _sparse_merge(base, xs, w, *args)
    inputs = {f"xs[{i}]": x for i, x in enumerate(xs)}
    if base is not None:
        inputs["base"] = base
    _validate.check_out(op, out, ref_t, ref_name, inputs)
    _sparse_merge_out(base, xs, w, *args, out)
    return out


def ties_merge(
    base,
    xs,
    weights=None,
    *,
    density,
    consensus="sum",
    elect_on="weighted",
    combine="mean_weight",
    rescale=None,
    lam=1.0,
    out=None,
) -> torch.Tensor:
    """TIES (Yadav et al., 2023): trim each τᵢ to its top ⌊density·n⌋ magnitudes, elect signs, disjoint mean.

    Defaults are mergekit's ``ties``; PEFT's is ``elect_on="unweighted", combine="mean_count"`` with base=None.
    """
    return sparse_merge(
        base,
        xs,
        weights,
        sparsify="magnitude",
        density=density,
        rescale=rescale,
        consensus=consensus,
        elect_on=elect_on,
        combine=combine,
        lam=lam,
        out=out,
    )


def dare_merge(
    base,
    xs,
    weights=None,
    *,
    density,
    seed=0,
    consensus=None,
    rescale="inverse_density",
    elect_on="weighted",
    combine="sum",
    lam=1.0,
    masks=None,
    out=None,
) -> torch.Tensor:
    """DARE (Yu et al., 2024): keep each τᵢ entry with probability density, rescale 1/density, sum.

    ``consensus=None`` is ``dare_linear``, ``consensus="sum"`` is ``dare_ties``. mergekit rescales
    with ``rescale="l1"``; PEFT's ``dare_ties`` is ``elect_on="unweighted", combine="mean_count"``.
    """
    return sparse_merge(
        base,
        xs,
        weights,
        sparsify="random",
        density=density,
        seed=seed,
        rescale=rescale,
        consensus=consensus,
        elect_on=elect_on,
        combine=combine,
        lam=lam,
        masks=masks,
        out=out,
    )


def breadcrumbs_merge(
    base, xs, weights=None, *, density, gamma=0.01, consensus=None, combine="sum", rescale=None, lam=1.0, out=None
) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky, 2024): drop the ⌊γ·n⌋ largest and the smallest magnitudes.

    mergekit's ``breadcrumbs`` (``consensus=None``) and ``breadcrumbs_ties`` (``consensus="sum"``).
    """
    return sparse_merge(
        base,
        xs,
        weights,
        sparsify="magnitude_outliers",
        density=density,
        gamma=gamma,
        rescale=rescale,
        consensus=consensus,
        combine=combine,
        lam=lam,
        out=out,
    )


def della_merge(
    base,
    xs,
    weights=None,
    *,
    density,
    epsilon=0.15,
    seed=0,
    consensus="sum",
    combine="mean_weight",
    rescale="l1",
    lam=1.0,
    out=None,
) -> torch.Tensor:
    """DELLA (Deep et al., 2024): keep probabilities rising with magnitude rank, then TIES-style merge.

    Defaults are mergekit's ``della``; ``della_linear`` is ``consensus=None, combine="sum"``. The
    ``cpu`` backend ranks 1-D and 2-D tensors (radix sort per row) into one byte of mask per element
    and model, then merges in one pass; ``rescale="inverse_density"`` (per-element 1/p) and other
    ranks run on ``torch``.
    """
    return sparse_merge(
        base,
        xs,
        weights,
        sparsify="della",
        density=density,
        epsilon=epsilon,
        seed=seed,
        rescale=rescale,
        consensus=consensus,
        combine=combine,
        lam=lam,
        out=out,
    )


def _tally_torch(base, xs, thresholds):
    return list(ref.sign_tally(base, xs, thresholds))


def _tally_cpu(base, xs, thresholds):
    lib = _native.lib()
    code = _native.dtype_code(base.dtype)
    return lib.sign_tally(base.data_ptr(), _native.pointers(xs), thresholds, base.numel(), code, _native.threads())


_tally_cpu.declines = lambda base, xs, thresholds: (
    "the C++ sign tally takes float32, float16 and bfloat16 (float64 runs on 'torch')"
    if base.dtype == torch.float64
    else None
)
TALLY_IMPLS = {"torch": _tally_torch, "cpu": _tally_cpu}


def sign_tally(base: torch.Tensor, xs, threshold: float | Sequence[float]) -> tuple[int, int]:
    """TIES' election over the elements ``sparsify="threshold"`` keeps, counted in one pass:
    with s = Σᵢ kept τᵢ per element, (#(s > 0) − #(s < 0), #(s = 0 with some kept τᵢ ≠ 0)).
    FusionBench elects its majority sign — the sign of the first, summed over a model — where
    s = 0; the second says whether any element depends on it. Formula:
    :func:`fusion_kernels.reference.sign_tally`. Thresholds are rounded up to float32."""
    op = "sign_tally"
    base = _validate.check_tensor(op, "base", base)
    _validate.check_float(op, "base", base)
    xs = _validate.tensor_list(op, "xs", xs)
    _validate.inputs_like(op, "xs", xs, base, "base")
    thresholds = _validate.per_model(op, "threshold", threshold, len(xs), 0.0, float("inf"))
    key = threshold_key
    thresholds = [
        float(torch.tensor([key(t, torch.float32, False)], dtype=torch.int32).view(torch.float32)) for t in thresholds
    ]
    args = (base.contiguous(), [x.contiguous() for x in xs], thresholds)
    balance, ties = select(op, TALLY_IMPLS, base.device, base.dtype, args)(*args)
    return int(balance), int(ties)
