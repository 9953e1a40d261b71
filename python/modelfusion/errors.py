"""The exceptions modelfusion raises, all :class:`fusion_kernels.FusionError` subclasses.

Messages name the file, tensor or recipe key, what was expected and what was found.
"""

from fusion_kernels.errors import FusionError, ParameterError, short_repr

__all__ = [
    "CheckpointError",
    "DistributedError",
    "FusionError",
    "OutputError",
    "ParameterError",
    "RecipeError",
    "StateDictError",
    "short_repr",
]


class CheckpointError(FusionError):
    """A checkpoint is missing, truncated, corrupt, escapes its directory or lacks a tensor."""


class RecipeError(FusionError):
    """A recipe has an unknown key, a bad value, or does not fit the models it names."""


class OutputError(FusionError):
    """The output directory cannot be written: not empty, full disk, or a resume that does not match."""


class StateDictError(FusionError):
    """Models to merge do not line up: missing or extra keys, other shapes, or unusable statistics."""


class DistributedError(FusionError):
    """A distributed run cannot start or go on: missing launcher variables, ranks that planned
    different merges, or a rank that failed, died or went silent."""
