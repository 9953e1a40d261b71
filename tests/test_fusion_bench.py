"""modelfusion.integrations.fusion_bench against FusionBench 0.2.33's own classes: the stored
outputs of its algorithms on two seeded pools (an MLP and a small CLIP vision model; made by
tests/fusion_bench_golden.py) must equal ours on the same pools within float32 rounding."""

import copy

import pytest
import torch
from fusion_bench_golden import CASES, DARE_CASES, DATA, POOL_TASKS, TASKS, TEMPLATES, pool
from helpers import assert_peer_close
from modelfusion import average
from modelfusion.errors import ParameterError
from modelfusion.integrations import fusion_bench as ours
from safetensors.torch import load_file

TOLERANCE = {"tsv": "fusion_bench_svd", "tsv_per_task": "fusion_bench_svd", "iso_c": "fusion_bench_svd"}
TOLERANCE["iso_cts"] = "fusion_bench_iso_cts"


@pytest.mark.parametrize("kind", TEMPLATES)
@pytest.mark.parametrize("case, module, name, kwargs", CASES, ids=[c[0] for c in CASES])
def test_each_algorithm_equals_fusion_bench(kind, case, module, name, kwargs):
    if kind == "clip":
        pytest.importorskip("transformers")
    expected = load_file(DATA / f"{kind}-{case}.safetensors")
    merged = getattr(ours, name)(**kwargs).run(pool(kind, POOL_TASKS.get(case, TASKS)))
    got = merged.state_dict()
    assert got.keys() == expected.keys()
    tol = TOLERANCE.get(case, "fusion_bench")
    for key, want in expected.items():
        assert_peer_close(got[key], want, tol, msg=f"{kind} {case} {key}")


def test_a_pool_is_a_dict_or_anything_with_model_names_and_load_model():
    models = pool("mlp")

    class Pool:  # FusionBench's BaseModelPool, as far as the algorithms use it
        model_names = [k for k in models if k != "_pretrained_"]

        def load_model(self, name):
            return models[name]

    by_dict = ours.MagMaxAlgorithm(scaling_factor=0.5, inplace=False).run(pool("mlp")).state_dict()
    by_pool = ours.MagMaxAlgorithm(scaling_factor=0.5, inplace=False).run(Pool()).state_dict()
    assert all(torch.equal(by_dict[k], by_pool[k]) for k in by_dict)


IN_PLACE = [
    ("SimpleAverageAlgorithm", {}, lambda base, ms: average.uniform_soup(ms)),
    (
        "WeightedAverageAlgorithm",
        {"normalize": True, "weights": [0.1, 0.2, 0.3, 0.4]},
        lambda base, ms: average.weighted_soup(ms, [0.1, 0.2, 0.3, 0.4]),
    ),
    (
        "TaskArithmeticAlgorithm",
        {"scaling_factor": 0.3},
        lambda base, ms: average.merge("task_arithmetic", ms, base, weight=[1.0] * 4, **{"lambda": 0.3}),
    ),
]


@pytest.mark.parametrize("name, kwargs, expected", IN_PLACE, ids=[c[0] for c in IN_PLACE])
def test_merges_written_into_the_model_equal_the_state_dict_merges(name, kwargs, expected):
    """The averages write straight into the returned model's parameters (the first model, or the
    pretrained one; a copy without ``inplace``): the same values as merging into a new state dict,
    with a tied pair merged once, a float64 model converted on the way and an int buffer kept."""
    models = pool("mlp")
    for m in models.values():
        m.register_buffer("steps", torch.tensor([3, 4]))
        m.tied = m[0]  # the same Linear under a second name: its tensors appear twice in the state dict
    models["task2"] = models["task2"].double()
    names = [k for k in models if k != "_pretrained_"]
    before = {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in models.items()}
    want = expected(models["_pretrained_"], [models[n] for n in names])
    target = models["_pretrained_"] if name == "TaskArithmeticAlgorithm" else models[names[0]]
    if name != "WeightedAverageAlgorithm":  # the others take inplace=False: a merged copy
        copy = getattr(ours, name)(**kwargs, inplace=False).run(models)
        assert copy is not target
        assert all(torch.equal(t, before[k][n]) for k, m in models.items() for n, t in m.state_dict().items())
        assert all(torch.equal(copy.state_dict()[n], want[n].to(t.dtype)) for n, t in target.state_dict().items())
    merged = getattr(ours, name)(**kwargs).run(models)
    assert merged is target
    got = merged.state_dict()
    assert got["tied.weight"].data_ptr() == got["0.weight"].data_ptr()
    for n, t in got.items():
        assert torch.equal(t, want[n].to(t.dtype)), n
    assert torch.equal(got["steps"], torch.tensor([3, 4]))


def test_bad_arguments_are_named():
    with pytest.raises(ParameterError, match="merge_func"):
        ours.TiesMergingAlgorithm(scaling_factor=1, threshold=0.2, remove_keys=[], merge_func="median").run(pool("mlp"))
    with pytest.raises(ParameterError, match="weights: expected 4"):
        ours.WeightedAverageAlgorithm(normalize=True, weights=[1.0]).run(pool("mlp"))
    with pytest.raises(ParameterError, match="_pretrained_"):
        ours.TaskArithmeticAlgorithm(scaling_factor=0.3).run({"a": pool("mlp")["task0"]})


def _fusion_bench_masks(kind: str, case: str) -> dict:
    return {
        (int(k.split("|")[0]), k.split("|")[1]): m.bool()
        for k, m in load_file(DATA / f"{kind}-{case}-masks.safetensors").items()
    }


@pytest.mark.parametrize("kind", TEMPLATES)
@pytest.mark.parametrize("case, name, kwargs", DARE_CASES, ids=[c[0] for c in DARE_CASES])
def test_dare_given_fusion_bench_masks_equals_fusion_bench(kind, case, name, kwargs):
    """Ours with FusionBench's own masks (its torch.rand_like draws, stored) gives its output."""
    if kind == "clip":
        pytest.importorskip("transformers")
    models = pool(kind)
    base, tuned = models["_pretrained_"], [m for k, m in models.items() if k != "_pretrained_"]
    masks = _fusion_bench_masks(kind, case)
    names = ours._dropped_names(base, kwargs["only_on_linear_weights"])
    sparsity, rescale = kwargs["sparsity_ratio"], kwargs.get("rescale", True)
    if name == "DareTiesMerging":
        drop = average.dare_drop(sparsity, rescale=rescale, names=names, masks=masks)
        got = average.ties_global(
            base, tuned, kwargs["threshold"], kwargs["merge_func"], kwargs["scaling_factor"], drop=drop
        )
    else:
        scale = kwargs.get("scaling_factor", 1 / len(tuned))
        got = average.dare_task_arithmetic(base, tuned, scale, sparsity, rescale=rescale, names=names, masks=masks)
    expected = load_file(DATA / f"{kind}-{case}.safetensors")
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        assert_peer_close(got[key], want, "fusion_bench", msg=f"{kind} {case} {key}")


@pytest.mark.parametrize("case, name, kwargs", DARE_CASES, ids=[c[0] for c in DARE_CASES])
def test_dare_classes_draw_the_engine_masks(case, name, kwargs):
    """The classes: the engine's counter-hash masks (a seed gives the same model every time), each
    tensor keeping a 1 − s fraction, other seeds other masks."""
    models = pool("mlp")
    run = lambda seed: getattr(ours, name)(**kwargs, seed=seed).run(pool("mlp")).state_dict()  # noqa: E731
    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    drop = average.dare_drop(kwargs["sparsity_ratio"], rescale=kwargs.get("rescale", True))
    tau = models["task0"].state_dict()["2.weight"] - models["_pretrained_"].state_dict()["2.weight"]
    kept = drop(0, "2.weight", tau) != 0
    assert abs(kept.float().mean().item() - (1 - kwargs["sparsity_ratio"])) < 5 * (0.25 / kept.numel()) ** 0.5


def test_dare_refuses_a_sparsity_that_cannot_rescale():
    with pytest.raises(ParameterError, match="sparsity_ratio"):
        ours.DareTaskArithmetic(scaling_factor=1.0, sparsity_ratio=1.0, only_on_linear_weights=False).run(pool("mlp"))


@pytest.mark.parametrize("kind", TEMPLATES)
def test_emr_equals_fusion_bench(kind):
    """The unified vector, every task's mask and rescaler, and every task's model after set_task."""
    if kind == "clip":
        pytest.importorskip("transformers")
    stored = load_file(DATA / f"{kind}-emr.safetensors")
    part = lambda prefix: {k.split("|", 1)[1]: v for k, v in stored.items() if k.startswith(prefix + "|")}  # noqa: E731
    model = ours.EMRMerging().run(pool(kind))
    emr = model.emr
    want = part("unified")
    assert emr.unified.keys() == want.keys()
    for key, tensor in want.items():
        assert torch.equal(emr.unified[key], tensor), key
    for i in range(TASKS):
        assert all(torch.equal(emr.masks[i][k], m.bool()) for k, m in part(f"mask{i}").items())
        assert_peer_close(torch.tensor(emr.rescalers[i]), part("rescaler")[str(i)][0], "fusion_bench")
        model.set_task(f"task{i}")
        assert model.current_task == f"task{i}"
        got = model.backbone.state_dict()
        for key, tensor in part(f"task{i}").items():
            assert_peer_close(got[key], tensor, "fusion_bench", msg=f"task{i} {key}")
    with pytest.raises(ParameterError, match="task_name"):
        model.set_task("nope")


@pytest.mark.parametrize("kind", TEMPLATES)
@pytest.mark.parametrize("lam", [0.4, 1.0])
def test_tall_masks_equal_fusion_bench_steps(kind, lam):
    """FusionBench's TALL-mask steps (its class raises on module pools; the golden script runs its
    functions on plain state dicts): each task's retrieved model."""
    if kind == "clip":
        pytest.importorskip("transformers")
    stored = load_file(DATA / f"{kind}-tall_{lam}.safetensors")
    result = ours.TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=lam).run(pool(kind))
    assert result["metadata"] is None and list(result["models"]) == [f"task{i}" for i in range(TASKS)]
    for name, model in result["models"].items():
        for key, tensor in model.state_dict().items():
            assert_peer_close(tensor, stored[f"{name}|{key}"], "fusion_bench", msg=f"{name} {key}")


def test_tall_masks_as_in_the_paper_keep_what_a_task_adds():
    """mₜ = |τₜ| > λ·|Σ τ − τₜ|: with one task, every nonzero element of it; on the pool, the
    masked elements are exactly those, and each model is θ₀ + mₜ ⊙ Σ τ."""
    models = pool("mlp")
    base, tuned = models["_pretrained_"], [m for k, m in models.items() if k != "_pretrained_"]
    masks, states = average.tall_mask_models(base, tuned, 0.5)
    b, t = base.state_dict(), [m.state_dict() for m in tuned]
    for key in b:
        taus = [s[key] - b[key] for s in t]
        multi = sum(taus)
        for i, tau in enumerate(taus):
            assert torch.equal(masks[i][key], tau.abs() > 0.5 * (multi - tau).abs())
            assert torch.equal(states[i][key], b[key] + masks[i][key] * multi)
    (only,), _ = average.tall_mask_models(base, tuned[:1], 1.0)
    assert all(torch.equal(only[k], (t[0][k] - b[k]) != 0) for k in b)


def test_tall_masks_written_into_targets_equal_the_returned_models():
    """tall_mask_into writes into the given state dicts (here the models' own tensors) exactly the
    models tall_mask_models returns, both mask formulas; one target per model, else named."""
    models = pool("mlp")
    base, tuned = models["_pretrained_"], [m for k, m in models.items() if k != "_pretrained_"]
    for as_fusion_bench in (False, True):
        _, states = average.tall_mask_models(base, tuned, 0.4, as_fusion_bench=as_fusion_bench)
        copies = [copy.deepcopy(base) for _ in tuned]
        average.tall_mask_into(base, tuned, [c.state_dict() for c in copies], 0.4, as_fusion_bench=as_fusion_bench)
        for state, model in zip(states, copies, strict=True):
            assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ParameterError, match="targets"):
        average.tall_mask_into(base, tuned, [base.state_dict()], 0.4)


@pytest.mark.parametrize("merge", ["tsv_merge", "iso_c", "iso_cts"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_subspace_merges_in_small_batches_equal_one_batch(monkeypatch, merge, threads):
    """Batches of a few tensors (a multiple of the thread count, sharing one buffer of task
    matrices across shapes) give the model one batch of every same-shape group gives."""
    from modelfusion.average import subspace

    torch.manual_seed(0)
    shapes = {f"w{i}": s for i, s in enumerate([(12, 8)] * 5 + [(8, 20)] * 3 + [(6, 6)] * 4)} | {"b": (7,)}
    base = {k: torch.randn(s) for k, s in shapes.items()}
    models = [{k: t + 0.1 * torch.randn_like(t) for k, t in base.items()} for _ in range(4)]
    want = getattr(subspace, merge)(base, models)
    before = [{k: t.clone() for k, t in m.items()} for m in [base, *models]]
    budget, sizes, real = 4 * 12 * 8 * 4 * 3, [], subspace._batch_size  # three (12, 8) tensors' task matrices

    def recorded(keys, key_bytes):
        sizes.append((real(keys, key_bytes), keys, key_bytes))
        return sizes[-1][0]

    monkeypatch.setattr(subspace, "DECOMPOSE_BYTES", budget)
    monkeypatch.setattr(subspace, "_batch_size", recorded)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = getattr(subspace, merge)(base, models)
    finally:
        torch.set_num_threads(torch_threads)
    assert len(sizes) == 3 and sizes[0][0] == 3 // threads * threads
    assert all(s == 1 or (s * key_bytes <= budget and (s % threads == 0 or s == keys)) for s, keys, key_bytes in sizes)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
        assert got[k].is_contiguous() and want[k].is_contiguous(), k
    assert all(torch.equal(t, b[k]) for m, b in zip([base, *models], before, strict=True) for k, t in m.items())


def test_batch_sizes_are_even_multiples_of_the_threads(monkeypatch):
    from modelfusion.average import subspace

    monkeypatch.setattr(subspace, "DECOMPOSE_BYTES", 100)
    torch_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert [subspace._batch_size(n, b) for n, b in [(12, 33), (48, 7), (5, 25), (5, 200), (1, 10)]] == [
            2,
            12,
            4,
            1,
            1,
        ]
        torch.set_num_threads(1)
        assert [subspace._batch_size(n, b) for n, b in [(12, 33), (5, 25)]] == [3, 3]
    finally:
        torch.set_num_threads(torch_threads)
