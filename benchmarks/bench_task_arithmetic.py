"""pytest-benchmark: task_arithmetic, ours vs the two eager formulations (see workloads.py)."""

import pytest
from workloads import BENCH_DTYPES, IMPLEMENTATIONS, run_benchmark


@pytest.mark.parametrize("dtype", BENCH_DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def bench_task_arithmetic(benchmark, impl, dtype):
    run_benchmark(benchmark, "task_arithmetic", impl, dtype)
