"""Distributed-merge benchmark: one recipe run by 1, 2 and 4 processes on this machine, against the
scaling model of the README, whose inputs are measured on the 1-process run only.

    python benchmarks/distributed.py                        # 3 × 1.1B bf16, linear and ties, 1/2/4 processes
    python benchmarks/distributed.py --layers 2 --processes 1,2 --repeat 1   # a quick smoke run

For each method and process count P, ``modelfusion merge --distributed`` runs as P processes of
our own launcher (MASTER_ADDR=127.0.0.1); the time is the wall time from the first start to the
last exit (imports, planning, merging, the index), its median over --repeat runs, beside the CPU
seconds all processes used. The model (README, "Scaling model"):

    T(P) = S(P) + max(W / B_write, C / min(K, P · u))
    S(P) = startup wall of one process, or its CPU seconds · P / K once P > K (imports and planning)
    C    = CPU seconds of the 1-process merge beyond startup;  u = C / its wall time (cores it keeps busy)

with K this machine's cores, W the output bytes and B_write the writer's measured bandwidth.
Writes JSON (default benchmarks/results/distributed-cpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from modelfusion.demos.streaming import make_llama_family, recipe_text
from modelfusion.io import Checkpoint
from modelfusion.pipeline import plan_merge
from modelfusion.pipeline.distributed import shard_costs
from modelfusion.ranks import deal_by_cost
from pipeline import write_bound


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, args: list, distributed: bool) -> tuple[float, float]:
    """Wall and CPU seconds of ``processes`` concurrent ``modelfusion merge ARGS`` processes."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(processes)}
    flags = ["--distributed"] if distributed else []
    cpu, start = children_cpu(), time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "modelfusion", "merge", *map(str, args), *flags, "--quiet"],
            env={**env, "RANK": str(r)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for r in range(processes)
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(err.decode()[-3000:])
    return time.perf_counter() - start, children_cpu() - cpu


def predict(p: int, cores: int, startup_s: float, startup_cpu: float, merge_cpu: float, busy: float, write_s: float):
    startup = startup_s if p <= cores else startup_cpu * p / cores
    return startup + max(write_s, merge_cpu / min(cores, p * busy))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=22, help="22: TinyLlama-1.1B's shape")
    p.add_argument("--methods", default="linear,ties")
    p.add_argument("--processes", default="1,2,4")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-shard-size", default="100MB", help="the unit of work dealt to ranks")
    p.add_argument("--workdir", help="default: a temporary directory, removed after")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "distributed-cpu.json")
    args = p.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="fk-distributed-"))
    counts = [int(x) for x in args.processes.split(",")]
    cores = os.cpu_count()
    try:
        shape = dict(hidden=2048, layers=args.layers, intermediate=5632, vocab=32000, kv_heads=4, heads=32)
        paths = make_llama_family(root / "models", 2, torch.bfloat16, max_shard_size=10**9, **shape)
        output_bytes = sum(t.nbytes for t in Checkpoint(paths[0]).tensors.values())
        write_s = write_bound(root, output_bytes)
        print(f"# {len(paths)} models, output {output_bytes / 1e9:.2f} GB; write bound {write_s:.2f} s; {cores} cores")
        report = {
            "machine": platform.processor() or platform.machine(),
            "cpus": cores,
            "torch": torch.__version__,
            "output_bytes": output_bytes,
            "write_bound_s": write_s,
            "rows": [],
        }
        for method in args.methods.split(","):
            recipe = root / f"{method}.yaml"
            recipe.write_text(recipe_text(method, paths, dtype="bfloat16") + f"max_shard_size: {args.max_shard_size}\n")
            plan = plan_merge(recipe)
            costs = shard_costs(plan)
            launch(1, [recipe, root / "out"], distributed=False)  # warm-up: inputs into the page cache
            shutil.rmtree(root / "out")
            times: dict[int, list[tuple[float, float]]] = {n: [] for n in counts}
            startup: dict[int, list[tuple[float, float]]] = {n: [] for n in counts}
            for _ in range(args.repeat):  # interleaved, so drifts of the VM touch every count alike
                for n in counts:
                    startup[n].append(launch(n, [recipe, root / "dry", "--dry-run"], distributed=False))
                    times[n].append(launch(n, [recipe, root / "out"], distributed=n > 1))
                    shutil.rmtree(root / "out")

            def median(runs, i):
                return statistics.median(r[i] for r in runs)

            one = 1 if 1 in counts else counts[0]
            s1, s1_cpu = median(startup[one], 0), median(startup[one], 1) / one
            merge_cpu = median(times[one], 1) - median(startup[one], 1)
            busy = merge_cpu / max(median(times[one], 0) - s1, 1e-9)
            for n in counts:
                owners = deal_by_cost(costs, n)
                loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(n)]
                wall = median(times[n], 0)
                model = predict(n, cores, s1, s1_cpu, merge_cpu, busy, write_s)
                row = {
                    "method": method,
                    "processes": n,
                    "wall_s": wall,
                    "runs_s": [r[0] for r in times[n]],
                    "cpu_s": median(times[n], 1),
                    "startup_wall_s": median(startup[n], 0),
                    "model_s": model,
                    "model_error": model / wall - 1,
                    "speedup_vs_1": median(times[one], 0) / wall,
                    "max_rank_bytes_over_mean": max(loads) / (sum(loads) / n),
                    "shards": len(costs),
                }
                report["rows"].append(row)
                print(
                    f"{method:<8} P={n}  wall {wall:6.2f} s  (runs {', '.join(f'{x:.2f}' for x in row['runs_s'])})  "
                    f"cpu {row['cpu_s']:6.2f} s  startup {row['startup_wall_s']:5.2f} s  model {model:6.2f} s "
                    f"({row['model_error']:+.0%})  speedup {row['speedup_vs_1']:.2f}×  "
                    f"rank bytes max/mean {row['max_rank_bytes_over_mean']:.2f}"
                )
            report["rows"][-len(counts)]["model_inputs"] = {
                "startup_s": s1,
                "startup_cpu_s": s1_cpu,
                "merge_cpu_s": merge_cpu,
                "busy_cores": busy,
            }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"# wrote {args.json}")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
