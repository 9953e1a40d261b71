"""FusionBench's headline setting: eight task vectors on a CLIP ViT-B/32-shaped vision model
(transformers' default CLIPVisionConfig, 88M parameters, generated weights), each method run by
FusionBench 0.2.33's own class and by ours (modelfusion.integrations.fusion_bench) on the same
pool, each in a fresh process: seconds of ``run(modelpool)`` and the peak RSS it adds above the
pool; for the classes ``fusion_kernels.compat.fusion_bench.install()`` routes, FusionBench's own
class once more with it installed. Needs fusion-bench (``pip install fusion-kernels[fusion-bench]``;
a separate venv works).

    python benchmarks/fusion_bench.py                          # every method, ViT-B/32 shape
    python benchmarks/fusion_bench.py --layers 2 --methods ties_sum,magmax   # a quick run

Re-running some methods of the same setting replaces their rows in the JSON and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))
from fusion_bench_golden import CASES, DARE_CASES, POOL_TASKS  # noqa: E402  (the methods the tests check)

from fusion_kernels.compat.fusion_bench import ROUTES  # noqa: E402

# every class the tests check: (case, FusionBench module, class, arguments)
BENCH = [
    *CASES,
    *[(case, "fusion_bench.method.dare", name, kwargs) for case, name, kwargs in DARE_CASES],
    ("emr", "fusion_bench.method.emr_merging", "EMRMerging", {}),
    ("tall_masks", "fusion_bench.method.tall_mask", "TallMaskTaskArithmeticAlgorithm", {"tall_mask_lambda": 0.4}),
]

ROUTED = {name for _, name, _ in ROUTES}  # the classes install() routes

RUN = """
import importlib, json, sys, time, torch
from pathlib import Path
from transformers import CLIPVisionConfig, CLIPVisionModel
impl, module, name, kwargs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
layers, tasks = int(sys.argv[5]), int(sys.argv[6])
torch.manual_seed(0)
config = CLIPVisionConfig(num_hidden_layers=layers)
base = CLIPVisionModel(config)
state = base.state_dict()
pool = {"_pretrained_": base}
for i in range(tasks):
    model = CLIPVisionModel(config)
    model.load_state_dict({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()})
    pool[f"task{i}"] = model
if impl.startswith("fusion_bench"):
    from fusion_bench.modelpool import BaseModelPool
    if impl == "fusion_bench_installed":
        from fusion_kernels.compat import fusion_bench as compat
        compat.install()
    algorithm, pool = getattr(importlib.import_module(module), name)(**kwargs), BaseModelPool(pool)
else:
    from modelfusion.integrations import fusion_bench
    algorithm = getattr(fusion_bench, name)(**kwargs)
def rss(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
Path("/proc/self/clear_refs").write_text("5")
before = rss("VmRSS:")
start = time.perf_counter()
with torch.no_grad():
    algorithm.run(pool)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_above_pool": rss("VmHWM:") - before}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--methods", default=",".join(c[0] for c in BENCH))
    parser.add_argument("--json", type=Path, default=HERE / "results" / "fusion-bench-cpu.json")
    args = parser.parse_args()
    from roofline import git_sha, header, machine

    wanted = args.methods.split(",")
    rows = []
    for case, module, name, kwargs in BENCH:
        if case not in wanted:
            continue
        tasks = min(POOL_TASKS.get(case, args.tasks), args.tasks)
        if "weights" in kwargs:
            kwargs = {**kwargs, "weights": [1.0 / tasks] * tasks}
        if isinstance(kwargs.get("alpha"), list):
            kwargs = {**kwargs, "alpha": [1.0] * tasks}
        # a re-run of some methods keeps the others: each row names its commit and machine
        row = {"method": case, "tasks": tasks, "git_sha": git_sha(), "machine": machine("cpu")}
        impls = ["fusion_bench", "ours"]
        if name in ROUTED:  # FusionBench's own class with fusion_kernels.compat.fusion_bench.install()
            impls.append("fusion_bench_installed")
        for impl in impls:
            cmd = [sys.executable, "-c", RUN, impl, module, name, json.dumps(kwargs), str(args.layers), str(tasks)]
            # run from / : this file's name would shadow the fusion_bench package
            run = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
            if run.returncode != 0:  # recorded, not fatal: FusionBench's TIES can exhaust the memory
                killed = " (killed: out of memory?)" if run.returncode in (-9, 137) else ""
                row[f"{impl}_failed"] = f"exit {run.returncode}{killed}: {run.stderr.strip()[-300:]}"
                print(f"{impl} {case} failed{killed}", file=sys.stderr)
                continue
            result = json.loads(run.stdout.strip().splitlines()[-1])
            row[f"{impl}_s"] = round(result["seconds"], 3)
            row[f"{impl}_peak_mib"] = round(result["peak_above_pool"] / 2**20)
        if "fusion_bench_s" in row and "ours_s" in row:
            row["speedup"] = round(row["fusion_bench_s"] / row["ours_s"], 2)
        if "fusion_bench_s" in row and "fusion_bench_installed_s" in row:
            row["installed_speedup"] = round(row["fusion_bench_s"] / row["fusion_bench_installed_s"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    import torch

    report = {
        **header("fusion_bench"),
        "threads": torch.get_num_threads(),
        "shape": f"CLIP ViT-B/32 vision ({args.layers} layers), {args.tasks} task vectors, float32",
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.json.exists():  # a run of some methods replaces their rows and keeps the others of the same setting
        previous = json.loads(args.json.read_text())
        if previous.get("shape") == report["shape"]:
            done = {r["method"] for r in rows}
            kept = [{"machine": previous["machine"], **r} for r in previous["results"] if r["method"] not in done]
            order = [c[0] for c in BENCH]
            report["results"] = sorted(kept + rows, key=lambda r: order.index(r["method"]))
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
