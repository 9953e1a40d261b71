"""pytest-benchmark: fisher_merge, ours vs the two eager formulations (see workloads.py)."""

import pytest
from workloads import BENCH_DTYPES, IMPLEMENTATIONS, run_benchmark


@pytest.mark.parametrize("dtype", BENCH_DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def bench_fisher_merge(benchmark, impl, dtype):
    run_benchmark(benchmark, "fisher_merge", impl, dtype)
