"""The weight-average family of model fusion, on state dicts and ``nn.Module``s.

- soups: :func:`uniform_soup`, :func:`weighted_soup`, :func:`greedy_soup`, :func:`wise_ft`,
  :func:`model_stock_by_angle` (FusionBench's Model Stock)
- task vectors: :func:`merge` (task_arithmetic, ties, dare_*, breadcrumbs*, della*, slerp,
  model_stock; the pipeline recipes' parameters)
- subspace and magnitude selection: :func:`magmax`, :func:`ties_global`, :func:`tsv_merge`,
  :func:`iso_c`, :func:`iso_cts`; DARE on whole models: :func:`dare_drop`,
  :func:`dare_task_arithmetic`; EMR: :func:`emr_merge`; TALL masks: :func:`tall_mask_models`
  (:func:`tall_mask_into` writes the task models into given state dicts)
- data-dependent: :func:`estimate_fisher` + :func:`fisher_merge`; :func:`collect_grams` +
  :func:`regmean_merge`
- along a training run: :func:`ema_update_`, :func:`swa_update_`, :func:`averaged_model`,
  :func:`update_bn`

Every merge returns a new state dict (see :mod:`.state` for the key, dtype and tied-weight
policy); :func:`load_merged` puts one into a copy of a template module.
"""

from .dare import dare_drop, dare_task_arithmetic
from .emr import EMR, emr_merge
from .fisher import estimate_fisher, fisher_merge
from .regmean import collect_grams, regmean_merge
from .soups import GreedySoup, greedy_soup, model_stock_by_angle, uniform_soup, weighted_soup, wise_ft
from .state import load_merged, state_of
from .subspace import iso_c, iso_cts, magmax, ties_global, tsv_merge
from .swa import averaged_model, ema_multi_avg_fn, ema_update_, swa_multi_avg_fn, swa_update_, update_bn
from .tall import tall_mask_into, tall_mask_models
from .task_vectors import merge

__all__ = [
    "EMR",
    "GreedySoup",
    "averaged_model",
    "collect_grams",
    "dare_drop",
    "dare_task_arithmetic",
    "ema_multi_avg_fn",
    "ema_update_",
    "emr_merge",
    "estimate_fisher",
    "fisher_merge",
    "greedy_soup",
    "iso_c",
    "iso_cts",
    "load_merged",
    "magmax",
    "model_stock_by_angle",
    "merge",
    "regmean_merge",
    "state_of",
    "swa_multi_avg_fn",
    "swa_update_",
    "tall_mask_into",
    "tall_mask_models",
    "ties_global",
    "tsv_merge",
    "uniform_soup",
    "update_bn",
    "weighted_soup",
    "wise_ft",
]
