"""The benchmarked work, shared by roofline.py and the pytest-benchmark files so they never drift.

For each op: how to make its inputs, how many bytes one call must move at least, our call, and the
two eager-PyTorch formulations users write today:
- ``stack``: stack the models, upcast, multiply by the weights, reduce (mergekit's linear /
  task-arithmetic style);
- ``loop``: one float32 accumulator and an in-place ``add_`` per model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import fusion_kernels as fk


@dataclass(frozen=True)
class Workload:
    op: str
    streams: Callable[[int], int]  # tensors of B bytes read or written by one call, given N models
    make: Callable[[int, int, torch.dtype, str], dict]
    ours: Callable[..., torch.Tensor]  # (inputs, out=None)
    eager: dict[str, Callable[[dict], torch.Tensor]]


def _models(n, numel, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(numel, generator=g, dtype=torch.float32).to(device=device, dtype=dtype) for _ in range(n)]


def _column(w: list[float], device) -> torch.Tensor:
    return torch.tensor(w, dtype=torch.float32, device=device)[:, None]


def _weights(n: int) -> list[float]:
    return [(i + 1) / (n * (n + 1) / 2) for i in range(n)]


# weighted_sum ----------------------------------------------------------------------------------
def _ws_make(n, numel, dtype, device):
    return {"xs": _models(n, numel, dtype, device, 0), "w": _weights(n)}


def _ws_stack(a):
    return (torch.stack(a["xs"]).float() * _column(a["w"], a["xs"][0].device)).sum(0).to(a["xs"][0].dtype)


def _ws_loop(a):
    acc = torch.zeros(a["xs"][0].shape, dtype=torch.float32, device=a["xs"][0].device)
    for x, w in zip(a["xs"], a["w"], strict=True):
        acc.add_(x.float(), alpha=w)
    return acc.to(a["xs"][0].dtype)


# task_arithmetic -------------------------------------------------------------------------------
def _ta_make(n, numel, dtype, device):
    return {"base": _models(1, numel, dtype, device, 99)[0], "xs": _models(n, numel, dtype, device, 0), "w": [0.5] * n}


def _ta_stack(a):
    base = a["base"].float()
    deltas = torch.stack(a["xs"]).float() - base
    return (base + (deltas * _column(a["w"], base.device)).sum(0)).to(a["base"].dtype)


def _ta_loop(a):
    base = a["base"].float()
    acc = base.clone()
    for x, w in zip(a["xs"], a["w"], strict=True):
        acc.add_(x.float() - base, alpha=w)
    return acc.to(a["base"].dtype)


# fisher_merge ----------------------------------------------------------------------------------
def _fm_make(n, numel, dtype, device):
    fs = [f.abs_() for f in _models(n, numel, dtype, device, 50)]
    return {"xs": _models(n, numel, dtype, device, 0), "fs": fs, "w": _weights(n), "eps": 1e-8}


def _fm_stack(a):
    f = torch.stack(a["fs"]).float() * _column(a["w"], a["xs"][0].device)
    merged = (f * torch.stack(a["xs"]).float()).sum(0) / (f.sum(0) + a["eps"])
    return merged.to(a["xs"][0].dtype)


def _fm_loop(a):
    num = torch.zeros(a["xs"][0].shape, dtype=torch.float32, device=a["xs"][0].device)
    den = torch.zeros_like(num)
    for x, f, w in zip(a["xs"], a["fs"], a["w"], strict=True):
        wf = f.float() * w
        num.addcmul_(wf, x.float())
        den.add_(wf)
    return (num / (den + a["eps"])).to(a["xs"][0].dtype)


def _ws_ours(a, out=None):
    return fk.weighted_sum(a["xs"], a["w"], out=out)


def _ta_ours(a, out=None):
    return fk.task_arithmetic(a["base"], a["xs"], a["w"], out=out)


def _fm_ours(a, out=None):
    return fk.fisher_merge(a["xs"], a["fs"], a["w"], eps=a["eps"], out=out)


WORKLOADS = {
    "weighted_sum": Workload(
        "weighted_sum", lambda n: n + 1, _ws_make, _ws_ours, {"stack": _ws_stack, "loop": _ws_loop}
    ),
    "task_arithmetic": Workload(
        "task_arithmetic", lambda n: n + 2, _ta_make, _ta_ours, {"stack": _ta_stack, "loop": _ta_loop}
    ),
    "fisher_merge": Workload(
        "fisher_merge", lambda n: 2 * n + 1, _fm_make, _fm_ours, {"stack": _fm_stack, "loop": _fm_loop}
    ),
}


# pytest-benchmark glue ---------------------------------------------------------------------------
BENCH_NUMEL = 1 << 22  # 4M elements per model: large enough to leave the caches, quick to run
BENCH_MODELS = 4
IMPLEMENTATIONS = ("fusion_kernels", "eager_stack", "eager_loop")
BENCH_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def run_benchmark(benchmark, op: str, impl: str, dtype: torch.dtype) -> None:
    """Times one implementation of ``op``; records the bytes moved and GB/s in ``extra_info``."""
    work = WORKLOADS[op]
    inputs = work.make(BENCH_MODELS, BENCH_NUMEL, dtype, "cpu")
    fn = work.ours if impl == "fusion_kernels" else work.eager[impl.removeprefix("eager_")]
    nbytes = work.streams(BENCH_MODELS) * BENCH_NUMEL * dtype.itemsize
    benchmark.extra_info["bytes"] = nbytes
    result = benchmark(fn, inputs)
    torch.testing.assert_close(result.float(), work.eager["loop"](inputs).float(), rtol=2e-2, atol=1e-2)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9
