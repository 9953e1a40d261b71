"""modelfusion: the high-level merge algorithms, checkpoint I/O, streaming pipeline and CLI.

It calls only the public API of :mod:`fusion_kernels`; its layers are drawn in docs/architecture.md.
Importing the package itself loads nothing else (torch included), so that the CLI can set the
OpenMP runtime's defaults before torch loads it.
"""

__all__ = ["__version__"]


def __getattr__(name: str):
    if name == "__version__":
        from fusion_kernels import __version__

        return __version__
    raise AttributeError(f"module 'modelfusion' has no attribute {name!r}")
