"""``python -m fusion_kernels.info``: versions, built backends, CPU features and the active choices."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

import torch

from . import __version__, _dispatch, _native


def collect() -> dict[str, object]:
    """The facts printed by ``main``, as a dict (also recorded in benchmark JSON)."""
    facts: dict[str, object] = {
        "fusion_kernels": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _version_of("triton"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "backends_available": _dispatch.available_backends(),
        "backend_forced": _dispatch.requested_backend()[0],
    }
    reason = _native.unavailable_reason()
    if reason is None:
        lib = _native.lib()
        facts.update(
            {
                "cpu_extension": "built",
                "cpu_features": dict(lib.cpu_features()),
                "cpu_isas": list(lib.supported_isas()),
                "cpu_isa_active": lib.active_isa(),
                "openmp": lib.openmp,
                "compiler": lib.compiler,
            }
        )
    else:
        facts["cpu_extension"] = f"missing: {reason}"
    return facts


def _version_of(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return __import__(module).__version__
    except Exception as exc:  # a broken install should not hide the rest of the report
        return f"unimportable: {exc}"


def main() -> None:
    for key, value in collect().items():
        print(f"{key:20} {value}")


if __name__ == "__main__":
    main()
