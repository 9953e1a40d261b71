"""One weight-matching sweep over a Llama-7B-shaped MLP stack, ours beside index_select + SciPy.

    python benchmarks/align_sweep.py                  # 4 of the 32 layers, bf16 weights
    python benchmarks/align_sweep.py --layers 1 --hidden 512 --intermediate 1376   # CI smoke

The stack: per layer gate and up [intermediate, hidden] and down [hidden, intermediate], random
weights; model B is A with a planted permutation of the residual stream and of every layer's
intermediate units, plus small noise. One sweep visits the residual permutation and each
layer's intermediate permutation once (``weight_matching(..., max_sweeps=1)``): per permutation,
gathers of B's other axes (``fusion_kernels.permute``), the cost-matrix GEMMs (float32 ``torch.matmul``)
and one assignment (``fusion_kernels.linear_assignment``). The baseline does the same with
``index_select`` and ``scipy.optimize.linear_sum_assignment``. Both are timed per phase; the
sweep's cost grows linearly with the layer count, and the script prints the 32-layer extrapolation
beside the measured figures (marked as such). Writes JSON (default results/align-sweep-cpu.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from modelfusion.align import PermutationSpec, apply_perms, random_perms, weight_matching
from roofline import git_sha, machine
from scipy.optimize import linear_sum_assignment


def stack(layers: int, hidden: int, intermediate: int, dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        for name, shape in (
            ("gate", (intermediate, hidden)),
            ("up", (intermediate, hidden)),
            ("down", (hidden, intermediate)),
        ):
            state[f"layers.{i}.{name}.weight"] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    return state


def stack_spec(layers: int) -> PermutationSpec:
    axes = {"R": []}
    for i in range(layers):
        p = f"layers.{i}."
        axes["R"] += [(p + "gate.weight", 1), (p + "up.weight", 1), (p + "down.weight", 0)]
        axes[f"F{i}"] = [(p + "gate.weight", 0), (p + "up.weight", 0), (p + "down.weight", 1)]
    return PermutationSpec(axes)


def baseline_sweep(spec: PermutationSpec, a, b, order: list[str]) -> tuple[dict, dict]:
    """The same sweep, written the usual way: index_select gathers, matmul, SciPy's assignment."""
    perms = {p: torch.arange(a[spec.axes[p][0][0]].shape[spec.axes[p][0][1]]) for p in spec.axes}
    table = spec.by_tensor()
    profile = {"gather": 0.0, "gemm": 0.0, "assignment": 0.0}
    for p in order:
        cost = None
        for key, axis in spec.axes[p]:
            t0 = time.perf_counter()
            wb = b[key]
            for ax, q in table[key].items():
                if ax != axis:
                    wb = wb.index_select(ax, perms[q])
            t1 = time.perf_counter()
            ra = a[key].float().movedim(axis, 0).reshape(a[key].shape[axis], -1)
            rb = wb.float().movedim(axis, 0).reshape(wb.shape[axis], -1)
            part = (ra @ rb.T).double()
            t2 = time.perf_counter()
            cost = part if cost is None else cost + part
            profile["gather"] += t1 - t0
            profile["gemm"] += t2 - t1
        t3 = time.perf_counter()
        _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
        profile["assignment"] += time.perf_counter() - t3
        perms[p] = torch.from_numpy(cols)
    return perms, profile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="layers measured (Llama-7B has 32)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--full-layers", type=int, default=32, help="layer count the extrapolation is for")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "align-sweep-cpu.json")
    args = p.parse_args()
    spec = stack_spec(args.layers)
    a = stack(args.layers, args.hidden, args.intermediate, torch.bfloat16, 0)
    planted = random_perms(spec, a, seed=1)
    g = torch.Generator().manual_seed(2)
    b = {
        k: (v.float() + 0.002 * torch.randn(v.shape, generator=g)).to(v.dtype)
        for k, v in apply_perms(spec, planted, a).items()
    }
    flops = sum(2 * a[k].numel() * a[k].shape[ax] for k, ax in (pair for pairs in spec.axes.values() for pair in pairs))
    shape = f"{args.intermediate}x{args.hidden}"
    print(f"# {args.layers} layers of gate/up/down ({shape}), bf16; {flops / 1e12:.2f} TFLOP of GEMMs per sweep")
    rows = []
    profile: dict = {}
    start = time.perf_counter()
    result = weight_matching(spec, a, b, max_sweeps=1, seed=0, profile=profile)
    ours_s = time.perf_counter() - start
    order_gen = torch.Generator().manual_seed(0)
    names = list(spec.axes)
    order = [names[i] for i in torch.randperm(len(names), generator=order_gen).tolist()]
    exact = sum(torch.equal(result.perms[q], torch.argsort(planted[q])) for q in planted)
    rows.append(
        {
            "impl": "ours (permute_many/permute + matmul + fk.linear_assignment)",
            "seconds": ours_s,
            **profile,
            "recovered": exact,
            "permutations": len(planted),
        }
    )
    if not args.skip_baseline:
        start = time.perf_counter()
        perms, base_profile = baseline_sweep(spec, a, b, order)
        base_s = time.perf_counter() - start
        exact_b = sum(torch.equal(perms[q], torch.argsort(planted[q])) for q in planted)
        rows.append(
            {
                "impl": "index_select + matmul + scipy linear_sum_assignment",
                "seconds": base_s,
                **base_profile,
                "recovered": exact_b,
                "permutations": len(planted),
            }
        )
    scale = args.full_layers / args.layers
    print(
        f"| sweep | measured s ({args.layers} layers) | gathers s | GEMMs s | assignments s | "
        f"planted perms recovered | {args.full_layers}-layer extrapolation s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['impl']} | {r['seconds']:.1f} | {r.get('gather', 0):.1f} | {r.get('gemm', 0):.1f} | "
            f"{r.get('assignment', 0):.1f} | {r['recovered']}/{r['permutations']} | {r['seconds'] * scale:.0f} |"
        )
    for r in rows:  # the bar: a sweep within 1.25x of its own GEMM time
        r["seconds_over_gemm"] = round(r["seconds"] / r["gemm"], 3) if r.get("gemm") else None
    out = {
        "machine": machine("cpu"),
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "layers": args.layers,
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "gemm_flop_per_sweep": flops,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
