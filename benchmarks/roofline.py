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
from sparse_workloads import OPS as SPARSE_OPS  # noqa: E402
from sparse_workloads import SHAPES as SPARSE_SHAPES  # noqa: E402
from sparse_workloads import implementations, make_inputs, streamed_bytes  # noqa: E402
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


def peak_extra_bytes(fn) -> int | None:
    """Resident-memory high-water mark above the starting RSS while fn runs (Linux), or None."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        start = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - start) * 1024
    except OSError:
        return None


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(field)


def sparse_suite(args, copy_gbs: float) -> list[dict]:
    """Our sparse ops beside PEFT and mergekit: seconds, GB/s, peak extra memory, speedup."""
    print(
        "| op | shape | dtype | impl | seconds | GB/s (min traffic) | GB/s (our passes) | % of copy "
        "| peak extra / one input | our speedup |"
    )
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for shape_name in args.shapes:
        shape = SPARSE_SHAPES[shape_name]
        numel = shape[0] * shape[1]
        for dname in args.sparse_dtypes:
            dtype = DTYPES[dname]
            inputs = make_inputs(args.models, shape, dtype)
            one_input = numel * dtype.itemsize
            for op in args.sparse_ops:
                minimum, ours_bytes = streamed_bytes(op, args.models, numel, dtype)
                times = {}
                for impl, fn in implementations(op).items():
                    if fn is None:
                        continue
                    repeat = args.repeat if impl == "fusion_kernels" else 1
                    seconds = timeit(lambda fn=fn, a=inputs: fn(a), repeat, args.device)
                    peak = peak_extra_bytes(lambda fn=fn, a=inputs: fn(a))
                    times[impl] = seconds
                    row = {
                        "suite": "sparse",
                        "op": op,
                        "shape": shape_name,
                        "dtype": dname,
                        "impl": impl,
                        "models": args.models,
                        "seconds": seconds,
                        "min_gbps": minimum / seconds / 1e9,
                        "peak_extra_bytes": peak,
                        "peak_extra_inputs": None if peak is None else peak / one_input,
                    }
                    if impl == "fusion_kernels":
                        row["passes_gbps"] = ours_bytes / seconds / 1e9
                        row["fraction_of_copy"] = row["passes_gbps"] / copy_gbs
                    rows.append(row)
                for row in rows[-len(times) :]:
                    row["our_speedup"] = row["seconds"] / times["fusion_kernels"]
                    passes = f"{row['passes_gbps']:.2f}" if "passes_gbps" in row else ""
                    frac = f"{100 * row['fraction_of_copy']:.0f}%" if "fraction_of_copy" in row else ""
                    peak = "" if row["peak_extra_inputs"] is None else f"{row['peak_extra_inputs']:.2f}x"
                    print(
                        f"| {op} | {shape_name} | {dname} | {row['impl']} | {row['seconds']:.3f} "
                        f"| {row['min_gbps']:.2f} | {passes} | {frac} | {peak} | {row['our_speedup']:.1f}x |",
                        flush=True,
                    )
            del inputs
    return rows


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


def dense_suite(args, copy_gbs: float) -> list[dict]:
    """The averaging ops beside the two eager formulations."""
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
    return rows


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
    p.add_argument(
        "--suite",
        choices=("dense", "sparse"),
        default="dense",
        help="dense: the averaging ops (default); sparse: TIES/DARE/prune beside PEFT and mergekit",
    )
    p.add_argument("--shapes", nargs="+", default=list(SPARSE_SHAPES), choices=list(SPARSE_SHAPES))
    p.add_argument("--sparse-ops", nargs="+", default=list(SPARSE_OPS), choices=list(SPARSE_OPS))
    p.add_argument("--sparse-dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    args = p.parse_args(argv)
    if args.suite == "sparse" and argv is None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # Peak memory is read from the RSS high-water mark. glibc would serve large buffers from
        # freed heap chunks (its mmap threshold adapts upward), hiding new allocations; a fixed
        # threshold maps every large buffer afresh, for every implementation alike.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"})

    copy_gbs = copy_bandwidth(max(args.numel * 4, 256 * 2**20), args.device, 10)
    print(f"# fusion_kernels roofline on {machine(args.device)}")
    print(f"# torch {torch.__version__}, backend chosen automatically from {fk.available_backends(args.device)}")
    print(
        f"# measured copy bandwidth (read + write): {copy_gbs:.1f} GB/s; N = {args.models}"
        + (f", {args.numel:,} elements per tensor" if args.suite == "dense" else "")
        + "\n"
    )
    rows = sparse_suite(args, copy_gbs) if args.suite == "sparse" else dense_suite(args, copy_gbs)

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
    suffix = "-sparse" if args.suite == "sparse" else ""
    path = args.json or Path(__file__).parent / "results" / f"roofline-{args.device}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
