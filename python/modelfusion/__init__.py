"""modelfusion: the high-level merge algorithms, checkpoint I/O, streaming pipeline and CLI.

It calls only the public API of :mod:`fusion_kernels`. Empty for now: the algorithms, I/O and
pipeline land with their own issues (see the README's roadmap).
"""

__version__ = "0.1.0"
