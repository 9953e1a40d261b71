"""Pure-PyTorch implementations of every op: the test oracle and the ``torch`` backend.

They take already-validated arguments (weights as Python floats) and import only torch.
"""

from .emr import emr_statistics
from .fisher_merge import fisher_merge
from .gram import gram
from .linear_assignment import linear_assignment
from .low_rank import polar, truncated_svd
from .magmax import magmax
from .magnitude_prune import global_magnitude_threshold, magnitude_prune, magnitude_threshold, top_k_mask
from .permute import inverse_permutation, permute
from .random_mask import random_keep_mask
from .sinkhorn import sinkhorn
from .slerp import slerp
from .sparse_merge import sign_tally, sparse_merge
from .task_arithmetic import task_arithmetic
from .weighted_sum import weighted_sum

__all__ = [
    "emr_statistics",
    "fisher_merge",
    "global_magnitude_threshold",
    "gram",
    "magmax",
    "inverse_permutation",
    "linear_assignment",
    "magnitude_prune",
    "magnitude_threshold",
    "permute",
    "polar",
    "random_keep_mask",
    "sinkhorn",
    "slerp",
    "sign_tally",
    "sparse_merge",
    "task_arithmetic",
    "top_k_mask",
    "truncated_svd",
    "weighted_sum",
]
