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
import contextlib
import ctypes
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


def pin_mmap_threshold() -> None:
    """From now on, serve every buffer of 1 MiB or more by a fresh mmap (glibc ``mallopt``), so the
    RSS high-water mark sees every large allocation; the sparse suite sets it at start-up instead."""
    with contextlib.suppress(OSError):  # not glibc: readings may then miss reused heap memory
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


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
                    repeat = args.repeat if impl.startswith("fusion_kernels") else 1
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
                    if impl.startswith("fusion_kernels"):
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


def align_suite(args, copy_gbs: float) -> list[dict]:
    """permute_many, sinkhorn and linear_assignment beside the tools users would reach for."""
    import align_workloads as aw

    print("| op | workload | impl | seconds | GB/s | % of copy | our speedup | check |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    rows = []
    parts = {
        "permute": _align_permute,
        "sinkhorn": _align_sinkhorn,
        "sinkhorn_grad": _align_sinkhorn_grad,
        "assignment": _align_assignment,
    }
    for part in args.align_parts:
        for row, check in parts[part](aw, args, copy_gbs):
            row["suite"] = "align"
            rows.append(row)
            gbps = f"{row['gbps']:.1f}" if "gbps" in row else ""
            frac = f"{100 * row['fraction_of_copy']:.0f}%" if "fraction_of_copy" in row else ""
            print(
                f"| {row['op']} | {row['workload']} | {row['impl']} | {row['seconds']:.3f} | {gbps} | {frac} "
                f"| {row['our_speedup']:.1f}x | {check} |",
                flush=True,
            )
    return rows


def _align_permute(aw, args, copy_gbs):
    for dname in args.align_dtypes:
        tensors, specs = aw.llama_layer(DTYPES[dname], args.align_scale)
        nbytes = 2 * sum(t.nbytes for t in tensors)  # each element read once and written once
        impls = aw.permute_impls([torch.empty_like(t) for t in tensors])
        times = {k: timeit(lambda f=f, t=tensors, s=specs: f(t, s), args.repeat, args.device) for k, f in impls.items()}
        theirs = impls["index_select"](tensors, specs)
        same = all(
            torch.equal(a, b) and torch.equal(c, b)
            for a, b, c in zip(
                impls["fusion_kernels"](tensors, specs),
                theirs,
                impls["fusion_kernels out="](tensors, specs),
                strict=True,
            )
        )
        del theirs, tensors, impls
        for impl, sec in times.items():
            gbps = nbytes / sec / 1e9
            row = {
                "op": "permute_many",
                "workload": f"Llama-7B layer x{args.align_scale:g}, {dname}",
                "dtype": dname,
                "impl": impl,
                "seconds": sec,
                "gbps": gbps,
                "fraction_of_copy": gbps / copy_gbs,
                "our_speedup": sec / times["fusion_kernels"],
            }
            yield row, f"equal: {same}"


def _align_sinkhorn(aw, args, copy_gbs):
    for name in args.sinkhorn_shapes:
        cost = aw.sinkhorn_cost(aw.SINKHORN_SHAPES[name])
        impls = {k: f for k, f in aw.sinkhorn_impls().items() if f is not None}
        plans, times = {}, {}
        for impl, fn in impls.items():
            repeat = args.repeat if impl.startswith("fusion_kernels") else 1
            times[impl] = timeit(lambda fn=fn, c=cost: fn(c), repeat, args.device)
            plans[impl] = fn(cost).double()
        for impl, sec in times.items():
            diff = (plans[impl] - plans["fusion_kernels"]).abs().max().item()
            row = {
                "op": "sinkhorn",
                "workload": f"{name}, {aw.SINKHORN_ITERS} it, reg {aw.SINKHORN_REG}, fp32",
                "impl": impl,
                "seconds": sec,
                "our_speedup": sec / times["fusion_kernels"],
                "max_abs_diff_vs_ours": diff,
                "plan_max": plans["fusion_kernels"].max().item(),
            }
            yield row, f"max abs diff to ours {diff:.1e} (max entry {row['plan_max']:.1e})"


def _align_sinkhorn_grad(aw, args, copy_gbs):
    """Forward + backward of a loss on the plan: implicit (a solve at the plan) vs unrolled
    (autograd through the loop), time and peak extra memory."""
    pin_mmap_threshold()
    shape = aw.SINKHORN_SHAPES[args.sinkhorn_grad_shape]
    cost = aw.sinkhorn_cost(shape)
    target = torch.rand(shape)
    grads, times = {}, {}
    for mode in ("implicit", "unrolled"):

        def step(mode=mode):
            c = cost.clone().requires_grad_(True)
            plan = fk.sinkhorn(c, reg=aw.SINKHORN_REG, tol=None, max_iter=aw.SINKHORN_ITERS, backward=mode).plan
            ((plan - target) ** 2).sum().backward()
            return c.grad

        times[mode] = timeit(step, 1, args.device)
        peak = peak_extra_bytes(step)
        grads[mode] = step()
        diff = (grads[mode] - grads["implicit"]).abs().max().item() / grads["implicit"].abs().max().item()
        row = {
            "op": "sinkhorn backward",
            "workload": f"{'x'.join(map(str, shape))}, {aw.SINKHORN_ITERS} it, fp32",
            "impl": mode,
            "seconds": times[mode],
            "our_speedup": times[mode] / times["implicit"],
            "peak_extra_bytes": peak,
            "peak_extra_costs": None if peak is None else peak / cost.nbytes,
            "grad_rel_diff_vs_implicit": diff,
        }
        peak_text = "" if peak is None else f"peak extra {row['peak_extra_costs']:.1f}x the cost tensor, "
        yield row, f"{peak_text}grad rel. diff to implicit {diff:.1e}"


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _align_assignment(aw, args, copy_gbs):
    warm_up = aw.assignment_cost(8, "randn")  # first calls load code: not the solvers' time
    aw.scipy_assignment(warm_up)
    fk.linear_assignment(warm_up)
    for n in args.assignment_sizes:
        for kind in ("randn", "matching", "matching float32"):
            cost = aw.assignment_cost(n, kind)
            nxt = aw.nudged(cost)
            ref, t_scipy = _timed(lambda c=cost: aw.scipy_assignment(c))
            (ours, v), t_ours = _timed(lambda c=cost: fk.linear_assignment(c, return_potentials=True))
            ref_next, t_scipy_next = _timed(lambda c=nxt: aw.scipy_assignment(c))
            cold_next, t_cold_next = _timed(lambda c=nxt: fk.linear_assignment(c))
            warm_next, t_warm = _timed(lambda c=nxt, v=v: fk.linear_assignment(c, warm_start=v))
            rows = torch.arange(n)
            totals = [c[rows, p].sum().item() for c, p in ((cost, ours), (cost, ref))]
            totals_next = [nxt[rows, p].sum().item() for p in (ref_next, cold_next, warm_next)]
            ok = totals[0] == totals[1] and len(set(totals_next)) == 1
            for impl, workload, sec, ours_sec in (
                ("scipy", "cold", t_scipy, t_ours),
                ("fusion_kernels", "cold", t_ours, t_ours),
                ("scipy", "next sweep", t_scipy_next, t_warm),
                ("fusion_kernels", "next sweep, cold", t_cold_next, t_warm),
                ("fusion_kernels", "next sweep, warm", t_warm, t_warm),
            ):
                row = {
                    "op": "linear_assignment",
                    "workload": f"{kind} n={n}, {workload}",
                    "impl": impl,
                    "seconds": sec,
                    "our_speedup": sec / ours_sec,
                }
                yield row, f"optimal totals equal: {ok}"


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


def header(benchmark: str, device: str = "cpu") -> dict:
    """The fields every results JSON starts with: what ran, when, where, on which commit and torch."""
    return {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device),
        "git_sha": git_sha(),
        "torch": torch.__version__,
    }


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
        choices=("dense", "sparse", "align"),
        default="dense",
        help="dense: the averaging ops (default); sparse: TIES/DARE/prune beside PEFT and mergekit; "
        "align: permute_many, sinkhorn, linear_assignment",
    )
    # sinkhorn_grad last: it pins glibc's mmap threshold for its memory readings
    p.add_argument("--align-parts", nargs="+", default=["permute", "sinkhorn", "assignment", "sinkhorn_grad"])
    p.add_argument("--align-dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--align-scale", type=float, default=1.0, help="scale of the Llama layer's dims")
    p.add_argument(
        "--sinkhorn-shapes", nargs="+", default=["32x512x512", "4x4096x4096"], help="also 2x64x64 (a smoke test)"
    )
    p.add_argument("--sinkhorn-grad-shape", default="8x512x512")
    p.add_argument("--assignment-sizes", nargs="+", type=int, default=[1024, 4096, 11008])
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
    suites = {"dense": dense_suite, "sparse": sparse_suite, "align": align_suite}
    rows = suites[args.suite](args, copy_gbs)

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
    suffix = "" if args.suite == "dense" else f"-{args.suite}"
    path = args.json or Path(__file__).parent / "results" / f"roofline-{args.device}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
