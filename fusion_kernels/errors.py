"""The exceptions fusion_kernels raises. Every one is a :class:`FusionError`, itself a ``ValueError``.

Messages name the op, the argument, what was expected and what was given, e.g.
``weighted_sum: argument 'xs[2]' expected shape (4, 8) (the shape of xs[0]), got (4, 9)``.
They are raised before any output memory is written.
"""


class FusionError(ValueError):
    """Base class of every fusion_kernels error about arguments, configuration or backends."""


class ArgumentTypeError(FusionError, TypeError):
    """An argument has the wrong Python type (e.g. a list where a tensor was expected)."""


class ShapeError(FusionError):
    """Tensors that must share a shape do not, or a sequence has the wrong length."""


class DTypeError(FusionError):
    """An unsupported dtype, or tensors that must share a dtype do not."""


class DeviceError(FusionError):
    """Tensors that must be on one device are not."""


class WeightError(FusionError):
    """Weights of the wrong count, NaN or infinite, or summing to zero where they are normalised."""


class AliasError(FusionError):
    """``out`` overlaps an input other than exactly, or has elements that share memory."""


class ParameterError(FusionError):
    """A merge parameter is missing, unknown, of the wrong kind, or out of its range."""


class BackendError(FusionError):
    """An unknown backend was named, or no backend can run the op (the message lists each reason)."""


def short_repr(value, limit: int = 80) -> str:
    """A bounded form of ``value`` for an error message: a container is named by its type and length,
    anything else is its repr cut to ``limit`` characters, so a huge (or self-referencing) value
    never expands into a message."""
    if isinstance(value, (dict, list, tuple, set)):
        text = f"a {type(value).__name__} of {len(value)} items"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
