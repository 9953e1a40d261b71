"""Streaming-merge benchmark: our pipeline against mergekit on a generated Llama-shaped family.

    python benchmarks/pipeline.py                      # 3 × 1.1B bf16 (base + 2 fine-tunes), all 20 methods
    python benchmarks/pipeline.py --layers 2 --methods linear --skip-mergekit   # a quick smoke run
    python benchmarks/pipeline.py --size 7b --methods linear,ties   # 3 × 6.7B (Llama-2-7B's shape)

Generates the models (HF format, 1 GB shards) under --workdir, measures the disk bounds (every
input byte read once as the merge reads it, mapped through modelfusion.io with no copy, the second
of two passes: from the page cache where the models fit in it, from the disk where they do not; the
output's size written by modelfusion's writer and fsynced), merges once uncounted (the first merge
after generating the models runs slow), then for each method runs ``modelfusion merge`` and
mergekit's ``run_merge`` on the same recipe, each in a fresh process reporting its own wall time and
peak RSS. The disk's sustained write speed wanders from one write to the next, so the
write bound is measured again just before and after each of our runs and the run is held against
their mean; so does this VM's speed of reading the page cache, so where the models fit in it the
read bound is measured around each run too. Checks the free disk space first; removes what it
generated unless --workdir is given. Writes JSON (default benchmarks/results/pipeline-cpu.json, or
pipeline-cpu-7b.json for --size 7b).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from modelfusion.demos.streaming import llama_shapes, make_llama_family, recipe_text
from modelfusion.io import Checkpoint, OutputTensor, ShardWriter
from modelfusion.pipeline import load_recipe
from roofline import git_sha, machine

from fusion_kernels import methods as fk_methods

METHODS = list(fk_methods.METHODS)  # every method of the table; with mergekit beside them about 40 minutes
SIZES = {  # Llama shapes: TinyLlama-1.1B's, and Llama-2-7B's (no grouped KV heads)
    "1b": dict(hidden=2048, layers=22, intermediate=5632, vocab=32000, kv_heads=4, heads=32),
    "7b": dict(hidden=4096, layers=32, intermediate=11008, vocab=32000, kv_heads=32, heads=32),
}
MERGEKIT_7B = "linear,ties"  # mergekit's other methods take long at 7B: --mergekit-methods adds them

OURS = """
import json, sys
import modelfusion.cli  # the command's process defaults (OpenMP's threads wait passively), before torch loads
from modelfusion.pipeline import merge
from modelfusion.pipeline.recipe import parse_size
stats = merge(open(sys.argv[1]).read(), sys.argv[2], memory_budget=parse_size(sys.argv[3], "budget"), progress=False)
print(json.dumps({"seconds": stats.seconds, "peak_rss": stats.peak_rss, "phases": stats.phases}))
"""
COMPUTE_ALONE = """
import json, sys, time
import modelfusion.cli  # the command's process defaults, as for our merge
import torch
from fusion_kernels.methods import METHODS, scratch_buffer_bytes
from modelfusion.pipeline import plan_merge
from modelfusion.pipeline.executor import compute_task
from modelfusion.pipeline.recipe import parse_size
plan = plan_merge(open(sys.argv[1]).read(), memory_budget=parse_size(sys.argv[2], "budget"))
pool, seconds = {}, 0.0
def pooled(key, nbytes):  # reused, as the pipeline pools its output, scratch and conversion buffers
    if key not in pool:
        pool[key] = torch.zeros(nbytes, dtype=torch.uint8)
    return pool[key]
for task in plan.tasks:
    inputs = [None if i is None else plan.checkpoints[k].map(i.name) for k, i in enumerate(task.inputs)]
    out = scratch = None
    if not task.passthrough and task.compute_dtype == task.out.dtype and METHODS[task.method].writes_out:
        out = pooled(("out", task.out.nbytes), task.out.nbytes).view(task.out.dtype).view(task.out.shape)
    nbytes = 0 if task.passthrough else scratch_buffer_bytes(task.method, task.numel, task.compute_dtype)
    if nbytes:
        scratch = pooled(("scratch", nbytes), nbytes)
    taken = []
    take = lambda n: taken.append(pooled(("in", n, len(taken)), n)) or taken[-1]
    start = time.perf_counter()
    with torch.no_grad():
        compute_task(plan, task, inputs, "cpu", out, scratch, take)
    seconds += time.perf_counter() - start
print(json.dumps({"seconds": seconds}))
"""
MERGEKIT = """
import json, sys, time, yaml
from modelfusion.pipeline.executor import peak_rss
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
config = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
start = time.perf_counter()
run_merge(config, sys.argv[2], MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss": peak_rss()}))
"""


def run(script: str, *args) -> dict:
    """Run ``script`` in a fresh Python; its report plus the process's whole wall time (imports too)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": wall}


def read_pass(paths: list[Path]) -> tuple[float, int]:
    """Seconds to read every tensor of ``paths`` once as the merge reads it (mapped, its pages
    populated: no copy), and bytes. A copy into fresh memory (``Checkpoint.read``) timed page faults
    more than the read: on this VM the same 6.6 GB took 1.09-1.21 s that way, 2.4-3.2 s just after
    other processes had freed a few GB, 0.64-0.71 s into one reused buffer, 0.34-0.36 s mapped."""
    start = time.perf_counter()
    total = 0
    for c in [Checkpoint(p) for p in paths]:
        for name in c.tensors:
            total += c.map(name).nbytes
    return time.perf_counter() - start, total


def read_bound(paths: list[Path]) -> tuple[float, int]:
    """``read_pass``, the second of two (the page cache warm after the first where the models fit)."""
    read_pass(paths)
    return read_pass(paths)


def write_bound(directory: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` as one shard and fsync it, through the pipeline's own writer
    (O_DIRECT where the file system allows it) with nothing to merge: the output's floor. One
    zero buffer of at most 1 GiB is written again and again."""
    piece = min(nbytes, 2**30)
    data = torch.zeros(piece, dtype=torch.uint8)
    sizes = [piece] * (nbytes // piece) + ([nbytes % piece] if nbytes % piece else [])
    outputs = [OutputTensor(f"x{i}", torch.uint8, (size,)) for i, size in enumerate(sizes)]
    start = time.perf_counter()
    writer = ShardWriter(directory / "write-bound.safetensors", outputs)
    for size in sizes:
        writer.write(data[:size])
    writer.commit()
    seconds = time.perf_counter() - start
    (directory / "write-bound.safetensors").unlink()
    return seconds


def check_disk(root: Path, shape: dict, models: int) -> None:
    """Exit with a message unless ``root``'s file system has room for the models, one output at a
    time beside them (ours, mergekit's and the write bound's are written and removed in turn), and
    1 GB to spare."""
    shapes, _ = llama_shapes(**shape)
    model_bytes = 2 * sum(math.prod(s) for s in shapes.values())  # bf16
    need = (models + 1) * model_bytes + 10**9
    free = shutil.disk_usage(root).free
    print(
        f"# disk: needs {need / 1e9:.1f} GB in {root} ({models} models and one output of "
        f"{model_bytes / 1e9:.1f} GB each, 1 GB to spare); {free / 1e9:.1f} GB free"
    )
    if free < need:
        sys.exit(f"pipeline.py: not enough disk space in {root}: needs {need / 1e9:.1f} GB, has {free / 1e9:.1f} GB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="1b", help="the models' shape (default 1b)")
    p.add_argument("--layers", type=int, help="fewer layers of that shape (a smoke run)")
    p.add_argument("--finetunes", type=int, default=2, help="models besides the base")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budget", default="4GiB", help="our --memory-budget for every method")
    p.add_argument("--small-budget", default="1GiB", help="one more linear run under this budget ('' to skip)")
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument(
        "--recipe-dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="the recipes' dtype: the models are bfloat16, so another one converts every input (default bfloat16)",
    )
    p.add_argument("--mergekit-methods", help=f"mergekit beside these only (default: all; {MERGEKIT_7B} at 7b)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="print our seconds per phase (read, compute, write, wait), and measure each method's compute "
        "alone: every tensor merged with its inputs already mapped and nothing read or written beside it",
    )
    p.add_argument("--workdir", help="default: a temporary directory, removed after")
    p.add_argument("--json", type=Path, help="default benchmarks/results/pipeline-cpu[-7b].json")
    args = p.parse_args()
    results = Path(__file__).parent / "results"
    args.json = args.json or results / ("pipeline-cpu.json" if args.size == "1b" else f"pipeline-cpu-{args.size}.json")
    shape = {**SIZES[args.size], **({"layers": args.layers} if args.layers else {})}
    mergekit_methods = args.mergekit_methods or (MERGEKIT_7B if args.size == "7b" else ",".join(METHODS))

    root = Path(args.workdir or tempfile.mkdtemp(prefix="fk-pipeline-"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        check_disk(root, shape, 1 + args.finetunes)
        start = time.perf_counter()
        paths = make_llama_family(root / "models", args.finetunes, torch.bfloat16, max_shard_size=10**9, **shape)
        params = sum(t.nbytes // 2 for t in Checkpoint(paths[0]).tensors.values())
        print(
            f"# generated {len(paths)} models × {params / 1e9:.2f}B params bf16 in {time.perf_counter() - start:.0f} s"
        )
        bound_s, total = read_bound(paths)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        cached = total < memory // 2
        where = "page cache" if cached else "disk: the models outgrow the page cache"
        print(f"# read bound: {total / 1e9:.2f} GB in {bound_s:.2f} s = {total / bound_s / 1e9:.2f} GB/s ({where})")
        out_bytes = total // len(paths) * getattr(torch, args.recipe_dtype).itemsize // 2  # the models: bfloat16
        # the disk writes its first few GB fast, then at its sustained speed (the first bound of a run
        # took 2.6-3.4 s, those after it 4.8-5.6 s): one write first, so the bounds and the runs all
        # see the sustained speed
        first_s = write_bound(root, out_bytes)
        print(f"# first write: {out_bytes / 1e9:.2f} GB in {first_s:.2f} s (fsync; the disk's burst, not counted)")
        wb_s = write_bound(root, out_bytes)
        print(f"# write bound: {out_bytes / 1e9:.2f} GB in {wb_s:.2f} s = {out_bytes / wb_s / 1e9:.2f} GB/s (fsync)")
        rows = []
        runs = [(m, args.budget) for m in args.methods.split(",")]
        # the first merge after the models were generated ran 1.3-1.8x slower than the same merge later
        # (linear 2.09-2.68 s against 1.5-1.6 s, its compute phase 2.3 s against 0.9 s): one merge first,
        # not counted, so that no method pays for coming first (where the models outgrow the page
        # cache every merge reads from the disk alike)
        if cached:
            warm = root / "warm-up.yaml"
            warm.write_text(recipe_text(runs[0][0], paths, dtype=args.recipe_dtype))
            warm_s = run(OURS, warm, root / "out-ours", args.budget)["seconds"]
            print(f"# warm-up merge ({runs[0][0]}, not counted): {warm_s:.2f} s")
            shutil.rmtree(root / "out-ours")
        if args.small_budget:
            runs.append(("linear", args.small_budget))
        for method, budget in runs:
            recipe = root / f"{method}.yaml"
            recipe.write_text(recipe_text(method, paths, dtype=args.recipe_dtype))
            # the disk's sustained write speed wanders (2.2 GB fsynced took 3.3, 4.4, 4.9, 4.8 s back to
            # back on the 2-core VM): each run is held against the bound measured just before and after it
            before = write_bound(root, out_bytes)
            read_before = read_pass(paths)[0] if cached else bound_s
            ours = run(OURS, recipe, root / "out-ours", budget)
            shutil.rmtree(root / "out-ours")
            read_after = read_pass(paths)[0] if cached else bound_s
            after = write_bound(root, out_bytes)
            adjacent = (before + after) / 2
            read_s = (read_before + read_after) / 2
            alone = run(COMPUTE_ALONE, recipe, budget)["seconds"] if args.profile else None
            theirs = None
            if not args.skip_mergekit and budget == args.budget and method in mergekit_methods.split(","):
                theirs = run(MERGEKIT, recipe, root / "out-mergekit")
                shutil.rmtree(root / "out-mergekit")
            read = total * len(load_recipe(recipe.read_text()).inputs) // len(paths)  # the models it reads
            row = {
                "method": method,
                "budget": budget,
                "ours_s": ours["seconds"],
                "ours_gbs": read / ours["seconds"] / 1e9,
                "write_bound_s": [before, after],
                "read_bound_s": [read_before, read_after],  # every model's bytes; the run reads `read` of them
                "disk_bound_s": max(read_s * read / total, adjacent),
                "ours_fraction_of_disk_bound": max(read_s * read / total, adjacent) / ours["seconds"],
                "ours_peak_rss_mib": ours["peak_rss"] / 2**20,
                "ours_process_s": ours["process_s"],
                "ours_phases_s": ours["phases"],
                "ours_compute_alone_s": alone,  # --profile: the merge's kernels with no I/O beside them
                "mergekit_s": theirs and theirs["seconds"],
                "mergekit_gbs": theirs and read / theirs["seconds"] / 1e9,
                "mergekit_peak_rss_mib": theirs and theirs["peak_rss"] / 2**20,
                "mergekit_process_s": theirs and theirs["process_s"],
                "speedup": theirs and theirs["seconds"] / ours["seconds"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.profile:
                phases = ", ".join(f"{k} {v:.2f} s" for k, v in ours["phases"].items())
                print(
                    f"# {method}: {ours['seconds']:.2f} s; per phase (threads overlap): {phases}; "
                    f"compute alone {alone:.2f} s",
                    flush=True,
                )
        result = {
            "benchmark": "pipeline",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine("cpu"),
            "git_sha": git_sha(),
            "cpus": torch.get_num_threads(),
            "torch": torch.__version__,
            "size": args.size,
            "recipe_dtype": args.recipe_dtype,
            "shape": shape,
            "models": len(paths),
            "params_per_model": params,
            "input_bytes": total,
            "read_bound_s": bound_s,
            "read_bound_gbs": total / bound_s / 1e9,
            "output_bytes": out_bytes,
            "first_write_s": first_s,
            "write_bound_s": wb_s,
            "write_bound_gbs": out_bytes / wb_s / 1e9,
            "rows": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
