"""pytest-benchmark: ties_merge, dare_ties, dare_linear and magnitude_prune beside PEFT and mergekit (1024x1024)."""

import pytest
import torch
from sparse_workloads import OPS, implementations, make_inputs


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("impl", ("fusion_kernels", "peft", "mergekit"))
@pytest.mark.parametrize("op", OPS)
def bench_sparse_merge(benchmark, op, impl, dtype):
    fn = implementations(op)[impl]
    if fn is None:
        pytest.skip(f"{impl} has no {op} here (not installed, or no such function)")
    inputs = make_inputs(4, (1024, 1024), dtype)
    benchmark(fn, inputs)
