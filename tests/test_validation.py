"""Bad input: the right FusionError subclass, a message naming the argument, and `out` untouched."""

import pytest
import torch

import fusion_kernels as fk

SENTINEL = 7.0


def f32(*shape):
    return torch.randn(*shape)


X = [f32(4, 8), f32(4, 8), f32(4, 8)]
F = [x.abs() for x in X]

# (id, call(out) -> None, error type, argument named in the message)
CASES = [
    ("ws-shape", lambda o: fk.weighted_sum([X[0], f32(4, 9)], out=o), fk.ShapeError, "'xs[1]'"),
    ("ws-dtype-mismatch", lambda o: fk.weighted_sum([X[0], X[1].half()], out=o), fk.DTypeError, "'xs[1]'"),
    ("ws-int-dtype", lambda o: fk.weighted_sum([torch.ones(4, 8, dtype=torch.int32)], out=o), fk.DTypeError, "'xs[0]'"),
    (
        "ws-device",
        lambda o: fk.weighted_sum([X[0], torch.empty(4, 8, device="meta")], out=o),
        fk.DeviceError,
        "'xs[1]'",
    ),
    ("ws-no-inputs", lambda o: fk.weighted_sum([], out=o), fk.ShapeError, "'xs'"),
    ("ws-not-tensor", lambda o: fk.weighted_sum([X[0], [1.0]], out=o), fk.ArgumentTypeError, "'xs[1]'"),
    ("ws-not-sequence", lambda o: fk.weighted_sum(3.0, out=o), fk.ArgumentTypeError, "'xs'"),
    ("ws-0d-stack", lambda o: fk.weighted_sum(torch.tensor(1.0), out=o), fk.ShapeError, "'xs'"),
    ("ws-too-few-weights", lambda o: fk.weighted_sum(X, [1.0, 2.0], out=o), fk.WeightError, "'weights'"),
    ("ws-too-many-weights", lambda o: fk.weighted_sum(X, torch.ones(4), out=o), fk.WeightError, "'weights'"),
    ("ws-2d-weights", lambda o: fk.weighted_sum(X, torch.ones(3, 1), out=o), fk.ShapeError, "'weights'"),
    ("ws-nan-weight", lambda o: fk.weighted_sum(X, [1.0, float("nan"), 1.0], out=o), fk.WeightError, "'weights[1]'"),
    ("ws-inf-weight", lambda o: fk.weighted_sum(X, [1.0, 1.0, float("inf")], out=o), fk.WeightError, "'weights[2]'"),
    ("ws-str-weight", lambda o: fk.weighted_sum(X, [1.0, "a", 1.0], out=o), fk.ArgumentTypeError, "'weights[1]'"),
    ("ws-bool-weights", lambda o: fk.weighted_sum(X, True, out=o), fk.ArgumentTypeError, "'weights'"),
    ("wa-zero-sum", lambda o: fk.weighted_average(X, [1.0, -1.0, 0.0], out=o), fk.WeightError, "'weights'"),
    ("ta-base-not-tensor", lambda o: fk.task_arithmetic([X[0]], X, out=o), fk.ArgumentTypeError, "'base'"),
    ("ta-shape", lambda o: fk.task_arithmetic(X[0], [X[1], f32(8, 4)], out=o), fk.ShapeError, "'xs[1]'"),
    ("ta-dtype", lambda o: fk.task_arithmetic(X[0], [X[1].bfloat16()], out=o), fk.DTypeError, "'xs[0]'"),
    (
        "ta-int-base",
        lambda o: fk.task_arithmetic(torch.ones(4, 8, dtype=torch.int64), X, out=o),
        fk.DTypeError,
        "'base'",
    ),
    (
        "ta-nan-weight",
        lambda o: fk.task_arithmetic(X[0], X[1:], [float("nan"), 1.0], out=o),
        fk.WeightError,
        "'weights[0]'",
    ),
    ("fm-fisher-count", lambda o: fk.fisher_merge(X, F[:2], out=o), fk.ShapeError, "'fisher'"),
    ("fm-fisher-shape", lambda o: fk.fisher_merge(X, [F[0], F[1], f32(4, 7)], out=o), fk.ShapeError, "'fisher[2]'"),
    ("fm-fisher-dtype", lambda o: fk.fisher_merge(X, [F[0], F[1], F[2].double()], out=o), fk.DTypeError, "'fisher[2]'"),
    ("fm-negative-weight", lambda o: fk.fisher_merge(X, F, [1.0, -1.0, 1.0], out=o), fk.WeightError, "'weights[1]'"),
    ("fm-zero-weights", lambda o: fk.fisher_merge(X, F, [0.0, 0.0, 0.0], out=o), fk.WeightError, "'weights'"),
    ("fm-negative-eps", lambda o: fk.fisher_merge(X, F, eps=-1e-3, out=o), fk.WeightError, "'eps'"),
    ("fm-nan-eps", lambda o: fk.fisher_merge(X, F, eps=float("nan"), out=o), fk.WeightError, "'eps'"),
]


@pytest.mark.parametrize("call, error, argument", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_before_writing(call, error, argument):
    out = torch.full((4, 8), SENTINEL)
    with pytest.raises(error) as info:
        call(out)
    assert isinstance(info.value, fk.FusionError) and isinstance(info.value, ValueError)
    assert argument in str(info.value), str(info.value)
    assert torch.all(out == SENTINEL), "out was written before the error"


def _bad_out_cases():
    buf = torch.full((5, 8), SENTINEL)
    return [
        ("shape", torch.full((4, 9), SENTINEL), fk.ShapeError, "expected shape (4, 8)"),
        ("dtype", torch.full((4, 8), SENTINEL, dtype=torch.float64), fk.DTypeError, "expected dtype torch.float32"),
        ("device", torch.empty((4, 8), device="meta"), fk.DeviceError, "expected device cpu"),
        ("not-tensor", [[0.0] * 8] * 4, fk.ArgumentTypeError, "torch.Tensor"),
        ("self-overlap", torch.full((1, 8), SENTINEL).expand(4, 8), fk.AliasError, "share memory"),
        ("partial-overlap", (buf, buf[1:]), fk.AliasError, "partially overlaps"),
    ]


@pytest.mark.parametrize("name, out, error, fragment", _bad_out_cases(), ids=[c[0] for c in _bad_out_cases()])
@pytest.mark.parametrize("op", ["weighted_sum", "task_arithmetic", "fisher_merge"])
def test_bad_out(op, name, out, error, fragment):
    xs = [f32(4, 8), f32(4, 8)]
    if isinstance(out, tuple):  # out overlaps xs[0] by one row
        storage, out = out
        xs[0] = storage[:4]
    before = out.clone() if isinstance(out, torch.Tensor) and out.device.type == "cpu" else None
    calls = {
        "weighted_sum": lambda: fk.weighted_sum(xs, out=out),
        "task_arithmetic": lambda: fk.task_arithmetic(xs[0], xs[1:], out=out),
        "fisher_merge": lambda: fk.fisher_merge(xs, [x.abs() for x in xs], out=out),
    }
    with pytest.raises(error) as info:
        calls[op]()
    assert "'out'" in str(info.value) and fragment in str(info.value), str(info.value)
    if before is not None:
        assert torch.equal(out, before), "out was written before the error"


def test_inputs_are_never_modified():
    xs = [f32(64), f32(64), f32(64)]
    fs = [x.abs() for x in xs]
    copies = [t.clone() for t in xs + fs]
    fk.weighted_sum(xs, [1.0, 2.0, 3.0])
    fk.weighted_average(xs)
    fk.task_arithmetic(xs[0], xs[1:], 0.5)
    fk.fisher_merge(xs, fs, eps=1e-3)
    for before, after in zip(copies, xs + fs, strict=True):
        assert torch.equal(before, after)


@pytest.mark.parametrize("op", ["weighted_sum", "weighted_average"])
def test_weights_beyond_float32_range_are_a_named_error(op):
    xs = [torch.ones(3), torch.ones(3)]
    with pytest.raises(fk.WeightError, match=r"argument 'weights\[0\]' expected \|weight\| <= 3.403e\+38"):
        getattr(fk, op)(xs, [1e308, 1e308])


def test_della_refuses_density_plus_epsilon_above_one():
    base, xs = torch.zeros(8), [torch.ones(8)]
    with pytest.raises(fk.WeightError, match=r"epsilon\[0\]' expected density ± epsilon within \[0, 1\]"):
        fk.della_merge(base, xs, density=0.9, epsilon=0.2)
    with pytest.raises(fk.WeightError, match="within"):
        fk.della_merge(base, xs, density=0.1, epsilon=0.2)


def test_an_absurd_warm_start_is_refused_and_a_shifted_one_changes_nothing():
    from scipy.optimize import linear_sum_assignment

    cost = torch.rand(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rows, cols = linear_sum_assignment(cost.numpy())
    best = cost.numpy()[rows, cols].sum()
    for shift in (1e300, -1e17):  # potentials are defined up to a constant
        perm = fk.linear_assignment(cost, warm_start=torch.full((40,), shift, dtype=torch.float64))
        assert abs(float(cost[torch.arange(40), perm].sum()) - best) < 1e-12
    with pytest.raises(fk.WeightError, match="argument 'warm_start' expected potentials of a similar cost"):
        fk.linear_assignment(cost, warm_start=torch.linspace(0, 1e300, 40, dtype=torch.float64))
