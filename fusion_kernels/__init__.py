"""fusion_kernels: fused kernels for merging neural-network weights.

Tensors in, tensors out. Every op validates its arguments, then runs on the best backend for the
tensors' device (``cpu``: C++ kernels; ``torch``: the pure-PyTorch reference), see
:func:`available_backends` and :func:`use_backend`.
"""

from ._dispatch import available_backends, use_backend
from ._version import __version__
from .errors import (
    AliasError,
    ArgumentTypeError,
    BackendError,
    DeviceError,
    DTypeError,
    FusionError,
    ParameterError,
    ShapeError,
    WeightError,
)
from .ops import *  # noqa: F403  (the public ops; their list is ops.__all__)
from .ops import __all__ as _ops_all

__all__ = [
    "AliasError",
    "ArgumentTypeError",
    "BackendError",
    "DTypeError",
    "DeviceError",
    "FusionError",
    "ParameterError",
    "ShapeError",
    "WeightError",
    "__version__",
    "available_backends",
    "use_backend",
    *_ops_all,
]
