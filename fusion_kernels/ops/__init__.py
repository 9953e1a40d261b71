"""Public ops: validation at the boundary, a custom_op per op, dispatch to a backend."""

from .fisher_merge import fisher_merge
from .task_arithmetic import task_arithmetic
from .weighted_sum import weighted_average, weighted_sum

__all__ = ["fisher_merge", "task_arithmetic", "weighted_average", "weighted_sum"]
