"""Mode connectivity: models along a path between two endpoints, loss and accuracy barriers, and
low-loss curves (Garipov et al., 2018).

    linear:  θ(t) = (1 − t)·θ_A + t·θ_B
    bezier:  θ(t) = (1 − t)²·θ_A + 2t(1 − t)·θ_C + t²·θ_B
    chain:   θ(t) = lerp(θ_A, θ_C, 2t) for t ≤ ½, lerp(θ_C, θ_B, 2t − 1) after
    barrier: B = max_t [ v(θ(t)) − ((1 − t)·v(θ_A) + t·v(θ_B)) ]     (v: loss; for accuracy, −v)

The control point θ_C is trained by sampling t ~ U(0, 1) per batch and descending the loss at θ(t).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

import fusion_kernels as fk

from ..align.repair import reset_bn
from ..average import load_merged, state_of
from ..errors import ParameterError

State = dict[str, torch.Tensor]
KINDS = ("linear", "bezier", "chain")


def _coefficients(kind: str, t: float) -> list[float]:
    """Weights of (θ_A, θ_C, θ_B) at t."""
    if kind == "linear":
        return [1 - t, 0.0, t]
    if kind == "bezier":
        return [(1 - t) ** 2, 2 * t * (1 - t), t * t]
    return [1 - 2 * t, 2 * t, 0.0] if t <= 0.5 else [0.0, 2 - 2 * t, 2 * t - 1]


@dataclass
class Path:
    """θ(t) between two endpoints; ``control`` is θ_C for the curves (None for ``linear``)."""

    kind: str
    a: State
    b: State
    control: State | None = None

    def __call__(self, t: float) -> State:
        if not 0.0 <= t <= 1.0:
            raise ParameterError(f"t: expected a number in [0, 1], got {t!r}")
        ca, cc, cb = _coefficients(self.kind, t)
        out = {}
        for key, va in self.a.items():
            if not va.is_floating_point():
                out[key] = va.clone()
                continue
            xs, ws = [va, self.b[key]], [ca, cb]
            if self.control is not None:
                xs.append(self.control[key].to(va.dtype))
                ws.append(cc)
            out[key] = fk.weighted_sum(xs, ws)
        return out


def linear_path(a, b) -> Path:
    return Path("linear", state_of(a, "a"), state_of(b, "b"))


@dataclass
class PathEvaluation:
    ts: list[float]
    losses: list[float]
    accuracies: list[float]

    @property
    def loss_barrier(self) -> float:
        return barrier(self.ts, self.losses)

    @property
    def accuracy_barrier(self) -> float:
        return barrier(self.ts, [-a for a in self.accuracies])


def barrier(ts: Sequence[float], values: Sequence[float]) -> float:
    """max_t [v(t) − ((1 − t)·v(0) + t·v(1))]; ``ts`` must start at 0 and end at 1."""
    if len(ts) != len(values) or len(ts) < 2 or ts[0] != 0 or ts[-1] != 1:
        raise ParameterError(f"ts: expected values from 0 to 1, one per value, got {list(ts)}")
    return max(v - ((1 - t) * values[0] + t * values[-1]) for t, v in zip(ts, values, strict=True))


def evaluate(model: nn.Module, data: Iterable) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of a classifier over ``(inputs, labels)`` batches."""
    model.eval()
    loss = correct = count = 0.0
    with torch.no_grad():
        for x, y in data:
            out = model(x)
            loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += float((out.argmax(-1) == y).sum())
            count += len(y)
    return loss / count, correct / count


def evaluate_path(
    template: nn.Module,
    path: Callable[[float], Mapping[str, torch.Tensor]],
    data: Iterable,
    ts: Sequence[float] = tuple(i / 10 for i in range(11)),
    *,
    bn_data: Iterable | None = None,
    adjust: Callable[[nn.Module, float], nn.Module] | None = None,
) -> PathEvaluation:
    """Loss and accuracy of ``template`` holding ``path(t)`` for each t; BatchNorm statistics
    recomputed from ``bn_data`` when given; ``adjust(model, t)`` (e.g. REPAIR) runs before scoring."""
    data = list(data)
    losses, accs = [], []
    for t in ts:
        model = load_merged(template, path(t))
        if bn_data is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            reset_bn(model, bn_data)
        if adjust is not None:
            model = adjust(model, t)
        loss, acc = evaluate(model, data)
        losses.append(loss)
        accs.append(acc)
    return PathEvaluation(list(ts), losses, accs)


def fit_curve(
    template: nn.Module,
    a,
    b,
    data: Iterable,
    *,
    kind: str = "bezier",
    epochs: int = 20,
    lr: float = 1e-2,
    seed: int = 0,
) -> Path:
    """Train the control point of a ``bezier`` or ``chain`` curve from A to B on ``(inputs, labels)``
    batches (cross-entropy at a random t per batch, Adam), starting from the midpoint."""
    if kind not in ("bezier", "chain"):
        raise ParameterError(f"kind: expected 'bezier' or 'chain', got {kind!r}")
    sa, sb = state_of(a, "a"), state_of(b, "b")
    names = [k for k, v in sa.items() if v.is_floating_point()]
    control = {k: ((sa[k] + sb[k]) / 2).detach().clone().requires_grad_(True) for k in names}
    buffers = {k: v for k, v in sa.items() if k not in control}
    opt = torch.optim.Adam(control.values(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    data = list(data)
    model = load_merged(template, sa)
    model.train()
    for _ in range(epochs):
        for x, y in data:
            t = float(torch.rand((), generator=g))
            ca, cc, cb = _coefficients(kind, t)
            params = {k: ca * sa[k] + cc * control[k] + cb * sb[k] for k in names}
            loss = nn.functional.cross_entropy(functional_call(model, {**params, **buffers}, (x,)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return Path(kind, sa, sb, {k: v.detach() for k, v in control.items()})


def plot_paths(results: Mapping[str, PathEvaluation], path: str, title: str = "") -> str:
    """Loss and accuracy along each path, side by side, saved as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, r in results.items():
        left.plot(r.ts, r.losses, marker="o", label=label)
        right.plot(r.ts, [100 * a for a in r.accuracies], marker="o", label=label)
    left.set(xlabel="t", ylabel="test loss (nats)", title="loss along the path")
    right.set(xlabel="t", ylabel="test accuracy (%)", title="accuracy along the path")
    left.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["Path", "PathEvaluation", "barrier", "evaluate", "evaluate_path", "fit_curve", "linear_path", "plot_paths"]
