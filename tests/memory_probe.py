"""Peak RSS of pipeline merges, one process for many runs: ``python tests/memory_probe.py DIR CASES_JSON``.

With an empty CASES_JSON (``[]``) it builds a Llama-shaped bf16 family in DIR. Else, for each case
{method, dtype, out_dtype, filter_wise, budget_factor} it plans the merge at the smallest budget the
planner accepts (times budget_factor), returns freed heap to the system, resets the process's peak RSS
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

# one 64 MiB bf16 tensor per model (the embedding), the rest small: the budget decides the peak
SHAPE = dict(hidden=2048, layers=1, intermediate=2048, vocab=16384, kv_heads=4, heads=16)


def main() -> None:
    root, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    if not cases:  # the family is made by a process of its own, whose memory the merges never see
        make_llama_family(root / "family", 3, torch.bfloat16, max_shard_size=2**27, **SHAPE)
        return
    trim = ctypes.CDLL(None).malloc_trim
    for case in cases:
        family = sorted((root / "family").iterdir())
        recipe = recipe_text(case["method"], family, dtype=case.get("dtype"))
        if case.get("out_dtype"):
            recipe += f"out_dtype: {case['out_dtype']}\n"
        if case.get("filter_wise"):
            recipe = recipe.replace(
                "merge_method: model_stock", "merge_method: model_stock\nparameters: {filter_wise: true}"
            )
        # the smallest budget the planner accepts, or a multiple of it
        budget = plan_merge(recipe, memory_budget=2**40).peak_bytes * case.get("budget_factor", 1)
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
