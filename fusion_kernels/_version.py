"""The one version of the project: the wheel's, ``fusion_kernels.__version__`` and ``modelfusion --version``."""

__version__ = "0.2.0"
