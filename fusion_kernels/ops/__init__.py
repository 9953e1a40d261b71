"""Public ops: validation at the boundary, a custom_op per op, dispatch to a backend."""

from .arcee import arcee_importance, arcee_select
from .cast import cast
from .emr import emr_statistics
from .fisher_merge import fisher_merge
from .gram import gram
from .linear_assignment import linear_assignment
from .low_rank import polar, truncated_svd
from .magmax import magmax
from .magnitude_prune import global_magnitude_threshold, magnitude_prune, magnitude_threshold, magnitude_thresholds
from .nearswap import nearswap
from .permute import permute, permute_many
from .ram_merge import ram_counts, ram_merge
from .sce import sce_energies, sce_select, sce_variance
from .sinkhorn import SinkhornResult, sinkhorn
from .slerp import slerp
from .sparse_merge import breadcrumbs_merge, dare_merge, della_merge, sign_tally, sparse_merge, ties_merge
from .task_arithmetic import task_arithmetic
from .weighted_sum import weighted_average, weighted_sum

__all__ = [
    "arcee_importance",
    "arcee_select",
    "breadcrumbs_merge",
    "cast",
    "dare_merge",
    "della_merge",
    "emr_statistics",
    "fisher_merge",
    "global_magnitude_threshold",
    "gram",
    "linear_assignment",
    "magmax",
    "magnitude_prune",
    "magnitude_threshold",
    "magnitude_thresholds",
    "nearswap",
    "permute",
    "permute_many",
    "polar",
    "ram_counts",
    "ram_merge",
    "sce_energies",
    "sce_select",
    "sce_variance",
    "SinkhornResult",
    "sign_tally",
    "sinkhorn",
    "slerp",
    "sparse_merge",
    "task_arithmetic",
    "ties_merge",
    "truncated_svd",
    "weighted_average",
    "weighted_sum",
]
