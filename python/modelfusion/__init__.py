"""modelfusion: the high-level merge algorithms, checkpoint I/O, streaming pipeline and CLI.

It calls only the public API of :mod:`fusion_kernels`; its layers are drawn in docs/architecture.md.
"""

from fusion_kernels import __version__

__all__ = ["__version__"]
