"""What every op does between validation and its kernel: pick a backend, make inputs contiguous,
and write through a contiguous temporary when ``out`` is strided."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._dispatch import select


def _contiguous(arg):
    if isinstance(arg, torch.Tensor):
        return arg.contiguous()
    if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor):
        return [x.contiguous() for x in arg]
    return arg


def run(op: str, impls: dict[str, Callable], out: torch.Tensor, *args) -> None:
    """Run ``impls[backend](target, *args)`` where ``target`` is ``out`` or a contiguous stand-in for it."""
    impl = select(op, impls, out.device, out.dtype)
    args = tuple(_contiguous(a) for a in args)
    target = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    impl(target, *args)
    if target is not out:
        out.copy_(target)


def empty_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)
