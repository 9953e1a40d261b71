"""pytest-benchmark: permute_many, sinkhorn and linear_assignment beside their peers (small shapes)."""

import pytest
import torch
from align_workloads import assignment_cost, llama_layer, permute_impls, scipy_assignment, sinkhorn_impls

import fusion_kernels as fk


@pytest.mark.parametrize("impl", ("fusion_kernels", "index_select"))
def bench_permute_many(benchmark, impl):
    tensors, specs = llama_layer(torch.float32, scale=0.125)
    benchmark(permute_impls()[impl], tensors, specs)


@pytest.mark.parametrize("impl", ("fusion_kernels", "torch loop", "POT"))
def bench_sinkhorn(benchmark, impl):
    fn = sinkhorn_impls()[impl]
    if fn is None:
        pytest.skip(f"{impl} is not installed")
    benchmark(fn, torch.rand(8, 128, 128))


@pytest.mark.parametrize("impl", ("fusion_kernels", "scipy"))
def bench_linear_assignment(benchmark, impl):
    fn = fk.linear_assignment if impl == "fusion_kernels" else scipy_assignment
    benchmark(fn, assignment_cost(512, "randn"))
