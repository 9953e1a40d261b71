"""``modelfusion demo --suite average``: the weight-average family and ensembles on a real task.

scikit-learn's bundled handwritten digits (1,797 8×8 images, no download) are split 60/20/20 into
train, validation and test sets, and the ten classes into four tasks: {0,1,2}, {3,4,5}, {6,7},
{8,9}. A small MLP is pre-trained on 10 images per class (the base), then fine-tuned once per
task on that task's training images (the experts). Each merge combines the four experts into one
model; every model is scored per task as a task-specific head would score it: the argmax over
that task's classes, on that task's test images. Hyperparameters (λ, α) are chosen on the
validation set from small grids, the same way for every method.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from .. import average
from ..average import load_merged
from ..ensemble import Ensemble

TASKS = ((0, 1, 2), (3, 4, 5), (6, 7), (8, 9))
PRETRAIN_PER_CLASS, PRETRAIN_EPOCHS, FINETUNE_EPOCHS = 3, 20, 20
LAMBDAS = (0.3, 0.5, 0.7, 1.0, 1.5, 2.0)
GTA = {  # recipe parameters of each task-vector method; lambda comes from the grid
    "task_arithmetic": {},
    "ties": {"density": 0.3},
    "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "breadcrumbs_ties": {"density": 0.8, "gamma": 0.02},
    "della": {"density": 0.5, "epsilon": 0.1},
}


class MLP(nn.Module):
    def __init__(self, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def forward(self, x):
        return self.net(x)


def digits_splits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.5, stratify=y, random_state=seed)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.7, stratify=y_rest, random_state=seed)

    def tensors(a, b):
        return torch.tensor(a / 16.0, dtype=torch.float32), torch.tensor(b, dtype=torch.int64)

    return {"train": tensors(x_train, y_train), "val": tensors(x_val, y_val), "test": tensors(x_test, y_test)}


def of_classes(data: tuple[torch.Tensor, torch.Tensor], classes) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep], y[keep]


def batches(data, size: int = 64):
    x, y = data
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def train(model: nn.Module, data, epochs: int, seed: int, lr: float = 1e-3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = data
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 32):
            idx = order[i : i + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


@torch.no_grad()
def task_accuracies(model: nn.Module, data) -> list[float]:
    """Per task: accuracy of the argmax over the task's classes, on the task's images of ``data``."""
    model.eval()
    scores = model(data[0])
    accs = []
    for classes in TASKS:
        keep = torch.isin(data[1], torch.tensor(classes))
        predicted = torch.tensor(classes)[scores[keep][:, list(classes)].argmax(-1)]
        accs.append((predicted == data[1][keep]).float().mean().item())
    return accs


def mean(xs) -> float:
    return sum(xs) / len(xs)


def run_average_demo(seed: int = 0) -> dict:
    """Train base and experts, merge with every method, return the rows of the accuracy table."""
    torch.manual_seed(seed)
    splits = digits_splits(seed)
    start = time.perf_counter()
    per_class = [torch.nonzero(splits["train"][1] == c)[:PRETRAIN_PER_CLASS, 0] for c in range(10)]
    few = torch.cat(per_class)
    base = train(MLP(), (splits["train"][0][few], splits["train"][1][few]), epochs=PRETRAIN_EPOCHS, seed=seed)
    task_train = [of_classes(splits["train"], t) for t in TASKS]
    experts = [
        train(load_merged(base, base.state_dict()), d, epochs=FINETUNE_EPOCHS, seed=seed + 1 + i)
        for i, d in enumerate(task_train)
    ]
    train_s = time.perf_counter() - start

    rows = []

    def add(method: str, model: nn.Module, seconds: float, note: str = "", own: list[float] | None = None):
        accs = own if own is not None else task_accuracies(model, splits["test"])
        rows.append({"method": method, "tasks": accs, "average": mean(accs), "merge_s": seconds, "note": note})

    def val_score(state) -> float:
        return mean(task_accuracies(load_merged(base, state), splits["val"]))

    def timed(fn: Callable):
        t0 = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - t0

    def tuned(name: str, grid, make: Callable, label: str):
        """The grid value with the best validation score; the merge re-timed at that value."""
        best = max(grid, key=lambda v: val_score(make(v)))
        state, seconds = timed(lambda: make(best))
        add(name, load_merged(base, state), seconds, f"{label}={best}")

    add("pre-trained base", base, 0.0)
    own = [task_accuracies(e, splits["test"])[i] for i, e in enumerate(experts)]
    add("individual experts †", None, 0.0, "each task by its own expert", own=own)
    add("ensemble: mean logits", Ensemble(experts, mode="logits"), 0.0, "4 forwards")
    add("ensemble: majority vote", Ensemble(experts, mode="vote"), 0.0, "4 forwards")
    soup, s = timed(lambda: average.uniform_soup(experts))
    add("uniform soup", load_merged(base, soup), s)
    greedy, s = timed(lambda: average.greedy_soup(experts, val_score))
    add("greedy soup", load_merged(base, greedy.state), s, f"ingredients {sorted(greedy.ingredients)}")
    wise = [load_merged(base, average.wise_ft(base, e, 0.5)) for e in experts]
    add(
        "WiSE-FT α=0.5 †",
        None,
        0.0,
        "each task by its own",
        own=[task_accuracies(m, splits["test"])[i] for i, m in enumerate(wise)],
    )
    for method, params in GTA.items():
        tuned(
            method,
            LAMBDAS,
            lambda lam, m=method, p=params: average.merge(m, experts, base, weight=1.0, lam=lam, seed=seed, **p),
            "λ",
        )
    slerped, s = timed(lambda: iterated_slerp(experts))
    add("slerp (iterated)", load_merged(base, slerped), s, "t = 1/k for the k-th model")
    stock, s = timed(lambda: average.merge("model_stock", experts, base))
    add("model stock", load_merged(base, stock), s)
    # the merges FusionBench's tables lead with: magnitude selection, singular-vector subspaces, masks
    tuned(
        "TIES, one threshold per model", LAMBDAS, lambda lam: average.ties_global(base, experts, 0.2, "sum", lam), "λ"
    )
    tuned("MagMax", LAMBDAS, lambda lam: average.magmax(base, experts, lam), "λ")
    tuned("TSV-M", LAMBDAS, lambda lam: average.tsv_merge(base, experts, alpha=lam), "α")
    tuned("Iso-C", LAMBDAS, lambda lam: average.iso_c(base, experts, lam), "λ")
    tuned("Iso-CTS", LAMBDAS, lambda lam: average.iso_cts(base, experts, lam), "λ")
    emr, s = timed(lambda: average.emr_merge(base, experts))
    own = [task_accuracies(load_merged(base, emr.task(i)), splits["test"])[i] for i in range(len(experts))]
    add("EMR-merging †", None, s, "each task by its own modulated model", own=own)
    (_, tall), s = timed(lambda: average.tall_mask_models(base, experts, 0.4))
    own = [task_accuracies(load_merged(base, m), splits["test"])[i] for i, m in enumerate(tall)]
    add("TALL masks λ=0.4 †", None, s, "each task by its own masked model", own=own)
    fishers, fisher_s = timed(
        lambda: [average.estimate_fisher(e, batches(d)) for e, d in zip(experts, task_train, strict=True)]
    )
    merged, s = timed(lambda: average.fisher_merge(experts, fishers))
    add("Fisher merging", load_merged(base, merged), s, f"Fishers {fisher_s:.2f} s")
    grams, gram_s = timed(
        lambda: [average.collect_grams(e, batches(d)) for e, d in zip(experts, task_train, strict=True)]
    )
    tuned("RegMean", (0.5, 0.7, 0.9, 1.0), lambda a: average.regmean_merge(experts, grams, alpha=a), "α")
    rows[-1]["note"] += f", Grams {gram_s:.2f} s"
    pairs = [load_merged(base, average.uniform_soup(experts[:2])), load_merged(base, average.uniform_soup(experts[2:]))]
    add("ensemble of 2 soups", Ensemble(pairs), 0.0, "soups of experts {1,2} and {3,4}")
    return {"rows": rows, "train_s": train_s, "seconds": time.perf_counter() - start}


def iterated_slerp(models) -> dict:
    """SLERP generalised to N models: s₁ = θ₁, s_k = slerp(s_{k−1}, θ_k, 1/k)."""
    state = average.state_of(models[0])
    for k, m in enumerate(models[1:], start=2):
        state = average.merge("slerp", [state, m], t=1.0 / k)
    return state


def format_table(result: dict) -> str:
    header = (
        "| method | "
        + " | ".join(f"task {i + 1} {set(t)}" for i, t in enumerate(TASKS))
        + " | average | merge s | notes |"
    )
    lines = [header, "| --- |" + " ---: |" * (len(TASKS) + 2) + " --- |"]
    for r in result["rows"]:
        accs = " | ".join(f"{100 * a:.1f}" for a in r["tasks"])
        lines.append(f"| {r['method']} | {accs} | {100 * r['average']:.1f} | {r['merge_s']:.3f} | {r['note']} |")
    return "\n".join(lines)
