"""pytest-benchmark: weighted_sum, ours vs the two eager formulations (see workloads.py)."""

import pytest
from workloads import BENCH_DTYPES, IMPLEMENTATIONS, run_benchmark


@pytest.mark.parametrize("dtype", BENCH_DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def bench_weighted_sum(benchmark, impl, dtype):
    run_benchmark(benchmark, "weighted_sum", impl, dtype)
