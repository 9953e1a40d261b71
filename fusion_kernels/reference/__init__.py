"""Pure-PyTorch implementations of every op: the test oracle and the ``torch`` backend.

They take already-validated arguments (weights as Python floats) and import only torch.
"""

from .fisher_merge import fisher_merge
from .task_arithmetic import task_arithmetic
from .weighted_sum import weighted_sum

__all__ = ["fisher_merge", "task_arithmetic", "weighted_sum"]
