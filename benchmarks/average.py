"""Data statistics and merges of modelfusion.average, beside the plain PyTorch loops users write.

    python benchmarks/average.py            # prints a markdown table, writes results/average-cpu.json

- Fisher: ``estimate_fisher`` (per-example gradients by torch.func.vmap) against the loop that
  runs one backward per example and squares the gradients, on the same batches; the results agree.
- Grams: ``collect_grams`` (forward pre-hooks, float32 products, float64 sums) against the loop
  that keeps every layer's inputs of a batch and adds xᵀx per batch in float32.
- Merges of four models: total seconds, and the share spent inside fusion_kernels ops.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from modelfusion import average
from torch import nn

import fusion_kernels as fk


def mlp(sizes, seed):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def batches(n, features, classes, size, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def loop_fisher(model, data):
    fisher = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    count = 0
    for x, y in data:
        for i in range(len(x)):
            model.zero_grad()
            torch.log_softmax(model(x[i : i + 1]), -1)[0, y[i]].backward()
            for k, p in model.named_parameters():
                fisher[k] += p.grad**2
        count += len(x)
    return {k: f / count for k, f in fisher.items()}


def loop_grams(model, data):
    grams, inputs = {}, {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0]))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        for x, _ in data:
            model(x)
            for name, a in inputs.items():
                grams[name] = grams.get(name, 0) + a.T @ a
    for h in hooks:
        h.remove()
    return grams


def best_of(fn, repeat):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


class EngineClock:
    """Seconds spent inside fusion_kernels ops while active (the ops' module attributes are wrapped)."""

    NAMES = ("weighted_sum", "weighted_average", "fisher_merge", "task_arithmetic", "sparse_merge", "slerp")

    def __enter__(self):
        import fusion_kernels.methods as table  # the method table holds its own references to the ops

        targets = [(fk, name) for name in self.NAMES] + [
            (table, n) for n in ("sparse_merge", "weighted_sum", "slerp", "task_arithmetic")
        ]
        self.seconds, self.saved = 0.0, []
        for module, name in targets:
            original = getattr(module, name)
            self.saved.append((module, name, original))
            setattr(module, name, self._timed(original))
        return self

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return wrapper

    def __exit__(self, *exc):
        for module, name, original in reversed(self.saved):
            setattr(module, name, original)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "average-cpu.json")
    p.add_argument("--small", action="store_true", help="tiny sizes (CI smoke)")
    args = p.parse_args()
    scale = 8 if args.small else 1
    workloads = {
        "MLP 64-128-128-10, 896 examples": ([64, 128, 128, 10], 896 // scale, 64),
        "MLP 784-1024-1024-10, 1024 examples": ([784, 1024 // scale, 1024 // scale, 10], 1024 // scale, 128),
    }
    rows = []
    print("| workload | statistic | ours s | plain loop s | speedup | max rel. difference |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for label, (sizes, n, size) in workloads.items():
        model, data = mlp(sizes, 0), batches(n, sizes[0], sizes[-1], size, 1)
        for stat, ours_fn, loop_fn in (
            ("Fisher (empirical)", lambda m=model, d=data: average.estimate_fisher(m, d), loop_fisher),
            ("RegMean Grams", lambda m=model, d=data: average.collect_grams(m, d), loop_grams),
        ):
            ours_s, ours = best_of(ours_fn, args.repeat)
            loop_s, theirs = best_of(lambda f=loop_fn, m=model, d=data: f(m, d), args.repeat)
            diff = max(
                (
                    (ours[k].double() - theirs[k].double()).abs().max()
                    / theirs[k].double().abs().max().clamp(min=1e-30)
                ).item()
                for k in theirs
            )
            row = {
                "workload": label,
                "statistic": stat,
                "ours_s": ours_s,
                "loop_s": loop_s,
                "speedup": loop_s / ours_s,
                "max_rel_difference": diff,
            }
            rows.append(row)
            print(
                f"| {label} | {stat} | {ours_s:.3f} | {loop_s:.3f} | {loop_s / ours_s:.1f}x | {diff:.1e} |", flush=True
            )

    sizes = [1024, 2048 // scale, 2048 // scale, 2048 // scale, 1024]
    models = [mlp(sizes, s) for s in range(5)]
    base, experts = models[0], models[1:]
    data = batches(256, sizes[0], sizes[-1], 64, 2)
    fishers = [average.estimate_fisher(m, data) for m in experts]
    grams = [average.collect_grams(m, data) for m in experts]
    params = sum(p.numel() for p in base.parameters())
    merges = {
        "uniform soup": lambda: average.uniform_soup(experts),
        "task_arithmetic": lambda: average.merge("task_arithmetic", experts, base, weight=0.5),
        "ties": lambda: average.merge("ties", experts, base, weight=1.0, density=0.2),
        "dare_ties": lambda: average.merge("dare_ties", experts, base, weight=1.0, density=0.5),
        "Fisher merging": lambda: average.fisher_merge(experts, fishers),
        "RegMean": lambda: average.regmean_merge(experts, grams, alpha=0.9),
    }
    print(f"\n| merge of 4 models × {params / 1e6:.1f}M params fp32 | seconds | inside fusion_kernels ops |")
    print("| --- | ---: | ---: |")
    for name, fn in merges.items():
        fn()
        with EngineClock() as clock:
            seconds, _ = best_of(fn, 1)
        rows.append({"merge": name, "params": params, "seconds": seconds, "engine_fraction": clock.seconds / seconds})
        print(f"| {name} | {seconds:.3f} | {100 * clock.seconds / seconds:.0f}% |", flush=True)
    result = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
