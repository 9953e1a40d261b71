"""What every op does between validation and its kernel: pick a backend, make inputs contiguous,
and write through a contiguous temporary when ``out`` is strided."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

from .. import _cuda_native, _native
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


def native_kernels(name: str, kernel_args: Callable) -> tuple[Callable, Callable]:
    """The ``cpu`` and ``cuda`` impls of the averaging kernel ``name``, which both bindings take as
    ``(out, *kernel_args(*inputs), numel, dtype code, threads | stream)``."""

    def make(module, last_arg):
        def impl(out: torch.Tensor, *inputs) -> None:
            kernel = getattr(module.lib(), name)
            kernel(out.data_ptr(), *kernel_args(*inputs), out.numel(), _native.dtype_code(out.dtype), last_arg(out))

        return impl

    return make(_native, lambda out: _native.threads()), make(_cuda_native, _cuda_native.stream)


def fake_like(x: torch.Tensor) -> torch.Tensor:
    """The output metadata for fake/meta tensors (``register_fake``); never touches memory."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """A contiguous output for ``x``; large CPU ones are advised onto huge pages before first touch."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _native.advise_hugepages(out)
    return out


def _plain_tensor(t: torch.Tensor, grad: bool) -> bool:
    return (
        type(t) is torch.Tensor
        and (t.is_cpu or t.is_cuda)
        and not (grad and t.requires_grad)
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def plain_eager_call(args: Sequence) -> bool:
    """True when nothing but the kernel has work to do in this call: no autograd to record, no
    compiler, tracer, vmap or dispatch/function mode watching, and only ordinary CPU/CUDA tensors."""
    if torch.compiler.is_compiling():  # first: dynamo folds it to True and traces nothing below
        return False
    if (
        torch._C._len_torch_dispatch_stack()
        or torch._C._len_torch_function_stack()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch.jit.is_tracing()
    ):
        return False
    grad = torch.is_grad_enabled()
    for arg in args:
        items = arg if isinstance(arg, (list, tuple)) else (arg,)
        for t in items:
            if isinstance(t, torch.Tensor) and not _plain_tensor(t, grad):
                return False
    return True


class CustomOp:
    """A ``torch.library.custom_op`` whose plain eager calls run the function directly.

    The dispatcher stays in charge whenever it has work (autograd, ``torch.compile``, fake or
    meta tensors, vmap, modes). Bypassing it in the plain case saves its per-call overhead and,
    on a process's first call, the ~1 s import of ``torch._dynamo`` that the dispatcher's
    kernel wrapper performs. Mutated arguments get their version bumped, as the dispatcher does.
    """

    def __init__(self, name: str, fn: Callable, mutates_args: tuple[str, ...]):
        self.op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        self.fn = fn
        params = list(inspect.signature(fn).parameters)
        self.mutated = [params.index(a) for a in mutates_args]
        self.register_fake = self.op.register_fake
        self.register_autograd = self.op.register_autograd

    def __call__(self, *args):
        if not plain_eager_call(args):
            return self.op(*args)
        result = self.fn(*args)
        for i in self.mutated:
            torch.autograd.graph.increment_version(args[i])
        return result


def custom_op(name: str, *, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], CustomOp]:
    """Decorator: ``torch.library.custom_op`` with the plain-eager bypass of :class:`CustomOp`."""
    return lambda fn: CustomOp(name, fn, mutates_args)
