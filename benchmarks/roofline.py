"""Roofline benchmark: each op's bandwidth against this machine's measured copy bandwidth, beside
eager PyTorch doing the same work, in one run.

    python benchmarks/roofline.py                       # 4 models x 64M elements, bf16/fp16/fp32
    python benchmarks/roofline.py --numel 4194304 --ops weighted_sum --dtypes bfloat16

An op over N models of B bytes each must move streams(N)·B bytes ((N+1)·B for weighted_sum), so
its time is bounded below by that over the copy bandwidth (read + write bytes of ``dst.copy_(src)``).
Our op is timed twice: returning a new output (what a plain call does, page faults included) and
writing into a reused ``out=`` buffer (what the streaming pipeline does; like ``copy_``'s ``dst``).
Prints a markdown table and writes JSON (machine, versions, git sha, every timing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import WORKLOADS  # noqa: E402

import fusion_kernels as fk  # noqa: E402
from fusion_kernels import info  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, repeat: int, device: str) -> float:
    """Median seconds of ``repeat`` calls after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, device: str, repeat: int) -> float:
    """GB/s of ``dst.copy_(src)`` counting read + write bytes: the roof."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / timeit(lambda: dst.copy_(src), repeat, device) / 1e9


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=64 * 2**20, help="elements per model tensor (default 64M)")
    p.add_argument("--models", type=int, default=4, help="number of models N (default 4)")
    p.add_argument("--ops", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=5, help="timed calls of our ops (median reported)")
    p.add_argument("--eager-repeat", type=int, default=3, help="timed calls of each eager formulation")
    p.add_argument("--json", type=Path, default=None, help="where to write results (default benchmarks/results/)")
    args = p.parse_args(argv)

    copy_gbs = copy_bandwidth(max(args.numel * 4, 256 * 2**20), args.device, 10)
    print(f"# fusion_kernels roofline on {machine(args.device)}")
    print(f"# torch {torch.__version__}, backend chosen automatically from {fk.available_backends(args.device)}")
    print(
        f"# measured copy bandwidth (read + write): {copy_gbs:.1f} GB/s; N = {args.models}, "
        f"{args.numel:,} elements per tensor\n"
    )
    print(
        "| op | dtype | ours GB/s (new out) | % of copy | ours GB/s (out=) | % of copy | eager stack GB/s "
        "| eager loop GB/s | speedup vs stack | speedup vs loop |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for op in args.ops:
        work = WORKLOADS[op]
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            inputs = work.make(args.models, args.numel, dtype, args.device)
            nbytes = work.streams(args.models) * args.numel * dtype.itemsize
            ours = timeit(lambda work=work, inputs=inputs: work.ours(inputs), args.repeat, args.device)
            out = work.ours(inputs)
            ours_out = timeit(
                lambda work=work, inputs=inputs, out=out: work.ours(inputs, out=out), args.repeat, args.device
            )
            eager = {
                name: timeit(lambda fn=fn, inputs=inputs: fn(inputs), args.eager_repeat, args.device)
                for name, fn in work.eager.items()
            }
            torch.testing.assert_close(
                work.ours(inputs).float(), work.eager["loop"](inputs).float(), rtol=2e-2, atol=1e-2
            )
            row = {
                "op": op,
                "dtype": dname,
                "models": args.models,
                "numel": args.numel,
                "bytes": nbytes,
                "seconds": ours,
                "gbps": nbytes / ours / 1e9,
                "fraction_of_copy": nbytes / ours / 1e9 / copy_gbs,
                "out_seconds": ours_out,
                "out_gbps": nbytes / ours_out / 1e9,
                "out_fraction_of_copy": nbytes / ours_out / 1e9 / copy_gbs,
                **{f"eager_{k}_seconds": v for k, v in eager.items()},
                **{f"eager_{k}_gbps": nbytes / v / 1e9 for k, v in eager.items()},
                **{f"speedup_vs_{k}": v / ours for k, v in eager.items()},
            }
            rows.append(row)
            print(
                f"| {op} | {dname} | {row['gbps']:.1f} | {100 * row['fraction_of_copy']:.0f}% "
                f"| {row['out_gbps']:.1f} | {100 * row['out_fraction_of_copy']:.0f}% "
                f"| {row['eager_stack_gbps']:.2f} | {row['eager_loop_gbps']:.2f} "
                f"| {row['speedup_vs_stack']:.0f}x | {row['speedup_vs_loop']:.0f}x |",
                flush=True,
            )
            del inputs, out

    result = {
        "benchmark": "roofline",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(args.device),
        "device": args.device,
        "git_sha": git_sha(),
        "copy_gbps": copy_gbs,
        "environment": info.collect(),
        "rows": rows,
    }
    path = args.json or Path(__file__).parent / "results" / f"roofline-{args.device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
