"""Dealing work to the ranks of a distributed run: used by the pipeline (shards) and by distributed
weight matching (tensors). Sits below both, beside ``errors``."""

from __future__ import annotations


def deal_by_cost(costs: list[int], ranks: int) -> list[int]:
    """The rank of each item: largest first, each to the rank with the least cost so far (the
    lowest rank on ties), so no rank gets more than the average plus one item."""
    owners, load = [0] * len(costs), [0] * ranks
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners
