"""What every op does between validation and its kernel: pick a backend, make inputs contiguous,
and write through a contiguous temporary when ``out`` is strided."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _native
from .._dispatch import select


def _contiguous(arg):
    if isinstance(arg, torch.Tensor):
        return arg.contiguous()
    if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor):
        return [x.contiguous() for x in arg]
    return arg


def run(op: str, impls: dict[str, Callable], out: torch.Tensor, *args) -> None:
    """Run ``impls[backend](target, *args)`` where ``target`` is ``out`` or a contiguous stand-in for it."""
    impl = select(op, impls, out.device, out.dtype, args)
    args = tuple(_contiguous(a) for a in args)
    target = out if out.is_contiguous() else empty_like(out)
    impl(target, *args)
    if target is not out:
        out.copy_(target)


def fake_like(x: torch.Tensor) -> torch.Tensor:
    """The output metadata for fake/meta tensors (``register_fake``); never touches memory."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """A contiguous output for ``x``; large CPU ones are advised onto huge pages before first touch."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _native.advise_hugepages(out)
    return out
