"""Peak RSS of pipeline merges, one process for many runs: ``python tests/memory_probe.py DIR CASES_JSON``.

With an empty CASES_JSON (``[]``) it builds a Llama-shaped bf16 family in DIR. Else, for each case
{method, dtype, out_dtype, filter_wise, budget, family} it plans the merge at that budget (default: the
smallest the planner accepts), returns freed heap to the system, resets the process's peak RSS
(``/proc/self/clear_refs``), runs the merge and prints one JSON line with the budget, the planned
peak and the measured peak RSS. Run in a subprocess by tests/test_memory_budget.py.
"""

from __future__ import annotations

import ctypes
import gc
import json
import shutil
import sys
from pathlib import Path

import torch
from modelfusion.demos.streaming import make_llama_family, recipe_text
from modelfusion.pipeline import plan_merge, run_plan
from modelfusion.pipeline.executor import peak_rss
from modelfusion.pipeline.recipe import parse_size

# one 64 MiB bf16 tensor per model (the embedding), the rest small: the budget decides the peak
SHAPE = dict(hidden=2048, layers=2, intermediate=2048, vocab=16384, kv_heads=4, heads=16)
# a 16 MiB embedding: for the pure-PyTorch composite methods, whose temporaries (12-18 bytes per
# element and model) still dwarf the slack at this size
SMALL_SHAPE = dict(hidden=1024, layers=2, intermediate=1024, vocab=8192, kv_heads=4, heads=8)


def main() -> None:
    root, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    if not cases:  # the families are made by a process of their own, whose memory the merges never see
        make_llama_family(root / "family", 3, torch.bfloat16, max_shard_size=2**27, **SHAPE)
        make_llama_family(root / "small", 3, torch.bfloat16, max_shard_size=2**27, **SMALL_SHAPE)
        return
    trim = ctypes.CDLL(None).malloc_trim
    for case in cases:
        family = sorted((root / case.get("family", "family")).iterdir())
        recipe = recipe_text(case["method"], family, dtype=case.get("dtype"))
        if case.get("out_dtype"):
            recipe += f"out_dtype: {case['out_dtype']}\n"
        if case.get("filter_wise"):
            recipe = recipe.replace(
                "merge_method: model_stock", "merge_method: model_stock\nparameters: {filter_wise: true}"
            )
        budget = parse_size(case["budget"], "budget") if case.get("budget") else None
        plan = plan_merge(recipe, memory_budget=budget or 2**40)
        budget = budget or plan.peak_bytes * case.get("budget_factor", 1)  # default: the smallest accepted
        plan = plan_merge(recipe, memory_budget=budget)
        out = root / "out"
        shutil.rmtree(out, ignore_errors=True)
        gc.collect()
        trim(0)  # freed heap back to the system, so one case's garbage is not the next one's baseline
        Path("/proc/self/clear_refs").write_text("5")
        baseline = peak_rss()
        run_plan(plan, out, progress=False)
        print(
            json.dumps(
                {
                    **case,
                    "budget_bytes": budget,
                    "planned_peak": plan.peak_bytes,
                    "peak_rss": peak_rss(),
                    "baseline_rss": baseline,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
