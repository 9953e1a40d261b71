"""FusionBench 0.2.33's merging algorithms on modelfusion: each class has FusionBench's name and
constructor parameters, so a FusionBench method config changes only the module of its
``_target_`` (``modelfusion.integrations.fusion_bench.TiesMergingAlgorithm``).

``run(modelpool)`` takes what FusionBench's does: a FusionBench ``BaseModelPool`` (anything with
``model_names`` and ``load_model(name)``), or a dict of ``nn.Module`` holding the pretrained model
under ``_pretrained_``. It returns the merged model as FusionBench does: the pretrained model (or,
for the averages, the first model) with the merged weights loaded, in place where FusionBench's
``inplace`` says so. fusion-bench itself is never imported.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

import fusion_kernels as fk

from .. import average
from ..average.soups import model_stock_by_angle_tensor, soup_weights
from ..average.state import aligned, merge_into
from ..errors import ParameterError

PRETRAINED = "_pretrained_"


def _names(modelpool) -> list[str]:
    if isinstance(modelpool, Mapping):
        return [k for k in modelpool if not str(k).startswith("_")]
    return list(modelpool.model_names)


def _load(modelpool, name: str) -> nn.Module:
    if isinstance(modelpool, Mapping):
        if name not in modelpool:
            raise ParameterError(f"modelpool: expected a model named {name!r}, got {sorted(map(str, modelpool))}")
        return modelpool[name]
    return modelpool.load_model(name)


def _into(model: nn.Module, state: Mapping, inplace: bool = True) -> nn.Module:
    target = model if inplace else copy.deepcopy(model)
    target.load_state_dict(state)
    return target


def _merged_into(model: nn.Module, models: Sequence[nn.Module], names: Sequence[str], merge, inplace=True) -> nn.Module:
    """``model`` (or a copy) with every float tensor written by ``merge(name, tensors of models,
    out)`` straight into its parameters: no merged state dict beside it, nothing to load."""
    states = aligned(list(models), list(names))
    target = model if inplace else copy.deepcopy(model)
    merge_into(target.state_dict(keep_vars=False), states, merge)
    return target


def _soup_into(models: Sequence[nn.Module], names: Sequence[str], weights: list[float], inplace=True) -> nn.Module:
    """The first model (or a copy) holding Σᵢ wᵢ·θᵢ."""
    return _merged_into(models[0], models, names, lambda _, xs, out: fk.weighted_sum(xs, weights, out=out), inplace)


class _Algorithm:
    """Keeps FusionBench's extra keyword arguments (``config``) as its BaseAlgorithm does."""

    def __init__(self, **kwargs: Any):
        self.config = dict(kwargs)

    def _pool(self, modelpool) -> tuple[nn.Module, list[nn.Module]]:
        names = _names(modelpool)
        if not names:
            raise ParameterError("modelpool: expected at least one fine-tuned model, got none")
        return _load(modelpool, PRETRAINED), [_load(modelpool, n) for n in names]


class SimpleAverageAlgorithm(_Algorithm):
    """θ = (1/N)·Σ θᵢ over the pool's models (the pretrained one not among them)."""

    def __init__(self, show_pbar: bool = False, inplace: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.show_pbar, self.inplace = show_pbar, inplace

    def run(self, modelpool) -> nn.Module:
        names = _names(modelpool)
        models = [_load(modelpool, n) for n in names]
        return _soup_into(models, names, soup_weights([1.0] * len(models)), self.inplace)


class WeightedAverageAlgorithm(_Algorithm):
    """θ = Σ wᵢ·θᵢ (÷ Σ wᵢ with ``normalize``); the first model receives the result."""

    def __init__(self, normalize: bool, weights: Sequence[float], verbose: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.normalize, self.weights, self.verbose = normalize, list(weights), verbose

    def run(self, modelpool) -> nn.Module:
        names = _names(modelpool)
        models = [_load(modelpool, n) for n in names]
        if len(self.weights) != len(models):
            raise ParameterError(f"weights: expected {len(models)} (one per model), got {len(self.weights)}")
        return _soup_into(models, names, soup_weights(self.weights, normalize=self.normalize))


class TaskArithmeticAlgorithm(_Algorithm):
    """θ = θ₀ + λ·Σ τᵢ."""

    def __init__(self, scaling_factor: float, inplace: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.scaling_factor, self.inplace = scaling_factor, inplace

    def run(self, modelpool) -> nn.Module:
        base, models = self._pool(modelpool)
        weights = [float(self.scaling_factor)] * len(models)
        names = [PRETRAINED, *_names(modelpool)]
        return _merged_into(
            base,
            [base, *models],
            names,
            lambda _, xs, out: fk.task_arithmetic(xs[0], xs[1:], weights, out=out),
            self.inplace,
        )


class TiesMergingAlgorithm(_Algorithm):
    """TIES with one threshold per model over all its tensors (:func:`modelfusion.average.ties_global`)."""

    def __init__(self, scaling_factor: float, threshold: float, remove_keys: Sequence[str], merge_func: str, **kwargs):
        super().__init__(**kwargs)
        self.scaling_factor, self.threshold = scaling_factor, threshold
        self.remove_keys, self.merge_func = list(remove_keys or []), merge_func

    def run(self, modelpool, **kwargs: Any) -> nn.Module:
        base, models = self._pool(modelpool)
        state = average.ties_global(
            base, models, self.threshold, self.merge_func, self.scaling_factor, remove_keys=self.remove_keys
        )
        return _into(base, state)


class MagMaxAlgorithm(_Algorithm):
    """θ = θ₀ + λ·(the τᵢ of largest magnitude per element)."""

    def __init__(self, scaling_factor: float = 0.5, inplace: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.scaling_factor, self.inplace = scaling_factor, inplace

    def run(self, modelpool) -> nn.Module:
        # as modelfusion.average.magmax, written straight into the pretrained model's tensors
        base, models = self._pool(modelpool)
        lam = float(self.scaling_factor)
        names = [PRETRAINED, *_names(modelpool)]
        merge = lambda _, xs, out: fk.magmax(xs[0], xs[1:], lam, out=out)  # noqa: E731
        return _merged_into(base, [base, *models], names, merge, self.inplace)


class TaskSingularVectorMerging(_Algorithm):
    """TSV-M (:func:`modelfusion.average.tsv_merge`)."""

    def __init__(self, alpha=None, exclude_keys=None, return_single_task_models: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        if return_single_task_models:
            raise ParameterError("return_single_task_models: not supported here (the merged model only)")
        self.alpha, self.exclude_keys = alpha, list(exclude_keys or [])

    def run(self, modelpool) -> nn.Module:
        base, models = self._pool(modelpool)
        return _into(base, average.tsv_merge(base, models, self.alpha, self.exclude_keys))


class IsotropicMergingInCommonSubspace(_Algorithm):
    """Iso-C (:func:`modelfusion.average.iso_c`)."""

    def __init__(self, scaling_factor: float, exclude_keys=None, **kwargs: Any):
        super().__init__(**kwargs)
        self.scaling_factor, self.exclude_keys = scaling_factor, list(exclude_keys or [])

    def run(self, modelpool) -> nn.Module:
        base, models = self._pool(modelpool)
        return _into(base, average.iso_c(base, models, self.scaling_factor, self.exclude_keys))


class IsotropicMergingInCommonAndTaskSubspace(_Algorithm):
    """Iso-CTS (:func:`modelfusion.average.iso_cts`)."""

    def __init__(self, scaling_factor: float, common_space_fraction: float, exclude_keys=None, **kwargs: Any):
        super().__init__(**kwargs)
        self.scaling_factor, self.common_space_fraction = scaling_factor, common_space_fraction
        self.exclude_keys = list(exclude_keys or [])

    def run(self, modelpool) -> nn.Module:
        base, models = self._pool(modelpool)
        state = average.iso_cts(base, models, self.scaling_factor, self.common_space_fraction, self.exclude_keys)
        return _into(base, state)


class SlerpMergeAlgorithm(_Algorithm):
    """θ = slerp(θ_A, θ_B, t) per tensor over the pool's two models (all its names, ``_pretrained_``
    included, as FusionBench's ``all_model_names``); the first model receives the result."""

    def __init__(self, t: float, DOT_THRESHOLD: float = 0.9995, epsilon: float = 1e-8, **kwargs: Any):  # noqa: N803
        super().__init__(**kwargs)
        self.t, self.DOT_THRESHOLD, self.epsilon = t, DOT_THRESHOLD, epsilon

    def run(self, modelpool) -> nn.Module:
        names = list(modelpool) if isinstance(modelpool, Mapping) else list(modelpool.all_model_names)
        if len(names) != 2:
            raise ParameterError(f"modelpool: slerp expects exactly 2 models, got {len(names)}: {names}")
        primary, secondary = (_load(modelpool, n) for n in names)
        t, threshold, eps = self.t, self.DOT_THRESHOLD, self.epsilon
        return _merged_into(
            primary,
            [primary, secondary],
            names,
            lambda _, xs, out: fk.slerp(xs[0], xs[1], t, dot_threshold=threshold, eps=eps, out=out),
        )


class ModelStock(_Algorithm):
    """Model Stock as FusionBench computes it: per tensor, the angle between task vectors averaged
    over pairs of models (in degrees), r = k·cos θ / ((k − 1)·cos θ + 1), θ = r·mean(θᵢ) + (1 − r)·θ₀
    (:func:`modelfusion.average.model_stock_by_angle`)."""

    def __init__(self, ignore_keys=None, model_save_path=None, model_save_kwargs=None, **kwargs: Any):
        super().__init__(**kwargs)
        if model_save_path is not None:
            raise ParameterError("model_save_path: not supported here; save the returned model yourself")
        self.ignore_keys = list(ignore_keys or [])

    def run(self, modelpool) -> nn.Module:
        base, models = self._pool(modelpool)
        if len(models) < 2:
            raise ParameterError(f"modelpool: ModelStock needs at least 2 fine-tuned models, got {len(models)}")
        # as modelfusion.average.model_stock_by_angle, written straight into the pretrained model's tensors
        ignore, names = set(self.ignore_keys), [PRETRAINED, *_names(modelpool)]
        merge = lambda name, xs, out: model_stock_by_angle_tensor(xs, name in ignore, out)  # noqa: E731
        return _merged_into(base, [base, *models], names, merge)


def _dropped_names(pretrained: nn.Module, only_on_linear_weights: bool) -> set[str]:
    """The tensors FusionBench's DARE drops from: every trainable parameter, or the linear weights."""
    if only_on_linear_weights:
        return {
            f"{name}.weight" if name else "weight" for name, m in pretrained.named_modules() if isinstance(m, nn.Linear)
        }
    return {name for name, p in pretrained.named_parameters() if p.requires_grad}


class DareTaskArithmetic(_Algorithm):
    """θ = θ₀ + λ·Σ DARE(τᵢ) (:func:`modelfusion.average.dare_task_arithmetic`; masks from the
    engine's hash, seeded by ``seed``, where FusionBench draws ``torch.rand_like``)."""

    def __init__(
        self, scaling_factor: float, sparsity_ratio: float, only_on_linear_weights: bool, rescale: bool = True, **kwargs
    ):
        super().__init__(**kwargs)
        self.scaling_factor, self.sparsity_ratio = scaling_factor, sparsity_ratio
        self.only_on_linear_weights, self.rescale = only_on_linear_weights, rescale
        self.seed = int(kwargs.get("seed", 0))

    def run(self, modelpool) -> nn.Module:
        base, models = self._pool(modelpool)
        names = _dropped_names(base, self.only_on_linear_weights)
        state = average.dare_task_arithmetic(
            base, models, self.scaling_factor, self.sparsity_ratio, rescale=self.rescale, seed=self.seed, names=names
        )
        return _into(base, state)


class DareSimpleAverage(DareTaskArithmetic):
    """DARE task arithmetic with λ = 1/N (FusionBench's ``DareSimpleAverage``)."""

    def __init__(self, sparsity_ratio: float, only_on_linear_weights: bool, rescale: bool = True, **kwargs: Any):
        super().__init__(0.0, sparsity_ratio, only_on_linear_weights, rescale, **kwargs)

    def run(self, modelpool) -> nn.Module:
        self.scaling_factor = 1.0 / len(_names(modelpool))
        return super().run(modelpool)


class DareTiesMerging(_Algorithm):
    """DARE on each τᵢ, then TIES with one threshold per model (:func:`modelfusion.average.ties_global`)."""

    def __init__(
        self,
        sparsity_ratio: float,
        only_on_linear_weights: bool,
        rescale: bool,
        scaling_factor: float,
        threshold: float,
        remove_keys: Sequence[str],
        merge_func: str,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.sparsity_ratio, self.only_on_linear_weights, self.rescale = sparsity_ratio, only_on_linear_weights, rescale
        self.scaling_factor, self.threshold, self.merge_func = scaling_factor, threshold, merge_func
        self.remove_keys = list(remove_keys or [])
        self.seed = int(kwargs.get("seed", 0))

    def run(self, modelpool) -> nn.Module:
        base, models = self._pool(modelpool)
        names = _dropped_names(base, self.only_on_linear_weights)
        drop = average.dare_drop(self.sparsity_ratio, rescale=self.rescale, seed=self.seed, names=names)
        state = average.ties_global(
            base, models, self.threshold, self.merge_func, self.scaling_factor, remove_keys=self.remove_keys, drop=drop
        )
        return _into(base, state)


class EMRModel(nn.Module):
    """What :class:`EMRMerging` returns, with FusionBench's ``EMRModulatedModel`` interface:
    ``set_task(name)`` turns the backbone into that task's model (θ₀ + rᵢ·Mᵢ ⊙ τ_u), ``forward``
    runs it, ``current_task`` names it; ``emr`` holds the unified vector, masks and rescalers."""

    def __init__(self, backbone: nn.Module, emr: average.EMR, task_names: Sequence[str]):
        super().__init__()
        self.backbone, self.emr, self.task_names = backbone, emr, list(task_names)
        self._current_task: str | None = None

    @property
    def current_task(self) -> str | None:
        return self._current_task

    def set_task(self, task_name: str) -> None:
        if task_name not in self.task_names:
            raise ParameterError(f"task_name: expected one of {self.task_names}, got {task_name!r}")
        if task_name != self._current_task:
            self.backbone.load_state_dict(self.emr.task(self.task_names.index(task_name)))
            self._current_task = task_name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._current_task is None:
            raise ParameterError("set_task(name) first: EMR keeps one model per task")
        return self.backbone(*args, **kwargs)


class EMRMerging(_Algorithm):
    """EMR merging (:func:`modelfusion.average.emr_merge`): one unified task vector, a mask and a
    rescaler per task; returns an :class:`EMRModel`."""

    def run(self, modelpool) -> EMRModel:
        base, models = self._pool(modelpool)
        return EMRModel(base, average.emr_merge(base, models), _names(modelpool))


class TallMaskTaskArithmeticAlgorithm(_Algorithm):
    """TALL masks (:func:`modelfusion.average.tall_mask_models`), with FusionBench's mask formula
    unless ``as_in_paper=True``; returns ``{"models": {name: model}, "metadata": None}`` as it does."""

    def __init__(self, tall_mask_lambda: float, debug: int = 0, verbose: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.tall_mask_lambda, self.debug, self.verbose = tall_mask_lambda, debug, verbose
        self.as_in_paper = bool(kwargs.get("as_in_paper", False))

    def run(self, modelpool) -> dict:
        base, models = self._pool(modelpool)
        copies = [copy.deepcopy(base) for _ in models]  # each task's model written into its own copy
        targets = [c.state_dict() for c in copies]
        average.tall_mask_into(base, models, targets, self.tall_mask_lambda, as_fusion_bench=not self.as_in_paper)
        return {"models": dict(zip(_names(modelpool), copies, strict=True)), "metadata": None}


ISO_C_Merge = IsotropicMergingInCommonSubspace  # FusionBench's aliases
ISO_CTS_Merge = IsotropicMergingInCommonAndTaskSubspace

__all__ = [
    "EMRMerging",
    "EMRModel",
    "DareSimpleAverage",
    "DareTaskArithmetic",
    "DareTiesMerging",
    "ISO_CTS_Merge",
    "ISO_C_Merge",
    "IsotropicMergingInCommonAndTaskSubspace",
    "IsotropicMergingInCommonSubspace",
    "MagMaxAlgorithm",
    "ModelStock",
    "SimpleAverageAlgorithm",
    "SlerpMergeAlgorithm",
    "TaskArithmeticAlgorithm",
    "TallMaskTaskArithmeticAlgorithm",
    "TaskSingularVectorMerging",
    "TiesMergingAlgorithm",
    "WeightedAverageAlgorithm",
]
