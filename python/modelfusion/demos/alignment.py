"""``modelfusion demo --suite align``: two independently trained digit MLPs, the paths between them.

Two MLPs (64-128-128-10) are trained on scikit-learn's digits from different random
initialisations. Their straight-line midpoint is poor; the demo measures loss and accuracy along
the naive path; after weight matching, activation matching, Sinkhorn re-basin (midpoint
objective), the straight-through estimator and exact OT transport (specs traced with ``torch.fx``);
after weight matching with REPAIR at every point; and along a Bezier curve trained between the
unaligned endpoints. Prints the barrier table and saves the plot.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from .. import align, connect
from ..average import load_merged, state_of
from .weight_average import MLP, batches, digits_splits, train

TS = tuple(i / 10 for i in range(11))


def trained_pair(seed_a: int, seed_b: int, splits, epochs: int = 30):
    models = []
    for seed in (seed_a, seed_b):
        torch.manual_seed(seed)
        models.append(train(MLP(), splits["train"], epochs=epochs, seed=seed))
    return models


def run_align_demo(seeds: tuple[int, int] = (1, 2), plot: str | Path | None = None, curve_epochs: int = 20) -> dict:
    start = time.perf_counter()
    splits = digits_splits(0)
    a, b = trained_pair(*seeds, splits)
    test, train_batches = batches(splits["test"], 256), batches(splits["train"], 64)
    spec = align.spec_from_fx(a, splits["train"][0][:2])
    results, seconds = {}, {}

    def timed(label, fn):
        t0 = time.perf_counter()
        out = fn()
        seconds[label] = time.perf_counter() - t0
        return out

    results["naive"] = connect.evaluate_path(a, connect.linear_path(a, b), test, TS)
    wm = timed("weight matching", lambda: align.weight_matching(spec, state_of(a), state_of(b)))
    b_wm = align.apply_perms(spec, wm.perms, state_of(b))
    results["weight matching"] = connect.evaluate_path(a, connect.linear_path(a, b_wm), test, TS)
    am = timed("activation matching", lambda: align.activation_matching(spec, a, b, train_batches))
    b_am = align.apply_perms(spec, am, state_of(b))
    results["activation matching"] = connect.evaluate_path(a, connect.linear_path(a, b_am), test, TS)
    sink = timed(
        "Sinkhorn re-basin (midpoint)",
        lambda: align.sinkhorn_rebasin(
            spec, state_of(a), state_of(b), objective="midpoint", template=a, data=train_batches, steps=40
        ),
    )
    b_sink = align.apply_perms(spec, sink, state_of(b))
    results["Sinkhorn re-basin (midpoint)"] = connect.evaluate_path(a, connect.linear_path(a, b_sink), test, TS)
    ste = timed(
        "straight-through estimator",
        lambda: align.ste_matching(spec, a, state_of(a), state_of(b), train_batches, steps=30),
    )
    b_ste = align.apply_perms(spec, ste, state_of(b))
    results["straight-through estimator"] = connect.evaluate_path(a, connect.linear_path(a, b_ste), test, TS)
    b_ot = timed("OT fusion (exact transport)", lambda: align.ot_transport(spec, state_of(a), state_of(b)))
    results["OT fusion (exact transport)"] = connect.evaluate_path(a, connect.linear_path(a, b_ot), test, TS)
    b_model = load_merged(a, b_wm)

    endpoints = align.endpoint_moments(a, b_model, spec, train_batches)

    def repaired(model, t):
        return align.repair(model, a, b_model, spec, train_batches, t, endpoints=endpoints) if 0 < t < 1 else model

    results["weight matching + REPAIR"] = timed(
        "weight matching + REPAIR",
        lambda: connect.evaluate_path(a, connect.linear_path(a, b_wm), test, TS, adjust=repaired),
    )
    curve = timed("Bezier curve (unaligned)", lambda: connect.fit_curve(a, a, b, train_batches, epochs=curve_epochs))
    results["Bezier curve (unaligned)"] = connect.evaluate_path(a, curve, test, TS)
    rows = []
    for label, r in results.items():
        mid = len(r.ts) // 2
        rows.append(
            {
                "path": label,
                "loss_barrier": r.loss_barrier,
                "accuracy_barrier": r.accuracy_barrier,
                "midpoint_loss": r.losses[mid],
                "midpoint_accuracy": r.accuracies[mid],
                "endpoint_accuracies": (r.accuracies[0], r.accuracies[-1]),
                "seconds": seconds.get(label, 0.0),
            }
        )
    plot_path = Path(plot) if plot else Path(tempfile.mkdtemp(prefix="modelfusion-align-")) / "paths.png"
    connect.plot_paths(results, str(plot_path), title=f"digits MLPs, seeds {seeds[0]} and {seeds[1]}")
    return {
        "rows": rows,
        "plot": str(plot_path),
        "sweeps": wm.sweeps,
        "permutations": len(spec.axes),
        "seconds": time.perf_counter() - start,
    }


def format_table(result: dict) -> str:
    lines = [
        "| path | loss barrier (nats) | accuracy barrier (points) | midpoint loss | midpoint accuracy | align/fit s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['path']} | {r['loss_barrier']:.3f} | {100 * r['accuracy_barrier']:.1f} | "
            f"{r['midpoint_loss']:.3f} | {100 * r['midpoint_accuracy']:.1f}% | {r['seconds']:.2f} |"
        )
    return "\n".join(lines)
