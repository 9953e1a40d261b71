"""The mergekit 0.1.5 methods beyond task arithmetic (passthrough, nearswap, nuslerp, multislerp,
karcher, sce, arcee_fusion, ram, ramplus_tl; model_stock) on our method table, against mergekit's own
implementations on the same tensors, and through the pipeline from a recipe."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_peer_close
from modelfusion.demos.streaming import make_llama_family
from modelfusion.io import Checkpoint
from modelfusion.pipeline import merge

import fusion_kernels.methods as methods_module
from fusion_kernels.methods import METHODS, merge_tensor
from fusion_kernels.reference import composite

registry = pytest.importorskip("mergekit.merge_methods.registry")
base_module = pytest.importorskip("mergekit.merge_methods.base")

SMALL = dict(hidden=64, layers=3, intermediate=96, vocab=128, kv_heads=2, heads=4)


def _tensors(n: int, shape=(37, 23), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base.to(dtype)] + [(base + 0.3 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]


def _theirs(name: str, tensors: list, base_index: int | None, **params):
    group = base_module.TensorGroup.from_tensors(tensors, base_index=base_index)
    for key, value in list(params.items()):
        if isinstance(value, list):  # per input: by the entries' ids
            ids = [e.id for e in (group.entries if key == "scale" else group.non_base)]
            params[key] = base_module.PerInputValues(list(zip(ids, value, strict=True)))
    with torch.no_grad():
        return registry.get(name).merge_group(group, **params)


def _ours(name: str, base, others, **params):
    spec = METHODS[name]
    full = {k: p.default for k, p in spec.params.items()}
    full.update(params)
    for key in spec.model_params:
        if not isinstance(full[key], list):
            full[key] = [full[key]] * len(others)
    return merge_tensor(name, base, others, full, seed=0)


CASES = [
    ("nearswap", True, 1, {"t": 0.05}),
    ("nuslerp", True, 2, {"weight": [0.3, 0.7]}),
    ("nuslerp", False, 2, {"weight": [0.3, 0.7], "nuslerp_flatten": False}),
    ("nuslerp", False, 2, {"weight": [1.0, 2.0], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", True, 3, {"weight": [0.2, 0.3, 0.5]}),
    ("multislerp", False, 3, {"weight": [1.0, 1.0, 2.0], "normalize_weights": True}),
    ("karcher", False, 3, {"max_iter": 20, "tol": 1e-6}),
    ("sce", True, 3, {"select_topk": 0.5}),
    ("sce", True, 2, {"select_topk": 1.0}),
    ("arcee_fusion", True, 1, {}),
    ("ram", True, 3, {"epsilon": 0.2}),
    ("ram", True, 1, {}),
    ("ramplus_tl", True, 3, {"r": 0.5, "alpha": 0.3, "epsilon": 0.2}),
    ("ramplus_tl", True, 2, {}),
]


@pytest.mark.parametrize("name, with_base, n, params", CASES, ids=lambda v: str(v)[:40])
def test_each_method_equals_mergekits_own(name, with_base, n, params):
    tensors = _tensors(n)
    base, others = (tensors[0], tensors[1:]) if with_base else (None, tensors[1:])
    theirs = _theirs(name, tensors if with_base else tensors[1:], 0 if with_base else None, **params)
    ours = _ours(name, base, others, **params)
    assert_peer_close(ours, theirs.to(ours.dtype), "peer_iterative")


@pytest.mark.parametrize(
    "name, with_base, n, params",
    [c for c in CASES if METHODS[c[0]].writes_out]
    + [("model_stock", True, 2, {}), ("model_stock", True, 3, {"filter_wise": True})],
    ids=lambda v: str(v)[:40],
)
def test_methods_that_write_out_give_the_same_tensor_in_the_callers_buffer(name, with_base, n, params):
    """The pipeline hands writes_out methods a pooled buffer: the result lands there (nuslerp along a
    dimension excepted: it returns a new tensor, which the pipeline takes as well)."""
    tensors = _tensors(n)
    base, others = (tensors[0], tensors[1:]) if with_base else (None, tensors[1:])
    full = {k: p.default for k, p in METHODS[name].params.items()} | params
    for key in METHODS[name].model_params:
        full[key] = full[key] if isinstance(full[key], list) else [full[key]] * n
    expected = merge_tensor(name, base, others, full, seed=0)
    out = torch.full_like(tensors[1], float("nan"))
    got = merge_tensor(name, base, others, full, seed=0, out=out)
    assert torch.equal(got, expected)
    if name != "nuslerp" or full["nuslerp_flatten"]:
        assert got.data_ptr() == out.data_ptr() and torch.equal(out, expected)


@pytest.mark.parametrize("shape", [(37, 23), (8, 3, 4, 4), (23,)])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_equals_mergekits_own_on_every_rank(shape, filter_wise):
    """filter_wise takes the cosine per vector along the last dimension, also of a conv weight."""
    tensors = _tensors(3, shape=shape, seed=5)
    theirs = _theirs("model_stock", tensors, 0, filter_wise=filter_wise)
    ours = _ours("model_stock", tensors[0], tensors[1:], filter_wise=filter_wise)
    assert_peer_close(ours, theirs, "peer_float32")


def test_passthrough_scales_or_copies():
    (x,) = _tensors(0)
    assert torch.equal(_ours("passthrough", None, [x], scale=[None]), x)
    theirs = _theirs("passthrough", [x], None, scale=[0.5])
    torch.testing.assert_close(_ours("passthrough", None, [x], scale=[0.5]), theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_no_farther_from_float64_than_mergekit(dtype):
    tensors = _tensors(3, shape=(64, 48), seed=3, dtype=dtype)
    oracle = _ours("multislerp", tensors[0].double(), [t.double() for t in tensors[1:]], weight=[0.2, 0.3, 0.5])
    ours = _ours("multislerp", tensors[0], tensors[1:], weight=[0.2, 0.3, 0.5])
    theirs = _theirs("multislerp", tensors, 0, weight=[0.2, 0.3, 0.5])
    assert (ours.double() - oracle).abs().max() <= (theirs.double() - oracle).abs().max()


@pytest.mark.parametrize(
    "method, parameters, base",
    [
        ("nuslerp", "{weight: 0.4}", True),
        ("multislerp", "{weight: 1.0}", False),
        ("karcher", "", False),
        ("sce", "", True),
        ("nearswap", "", True),
        ("arcee_fusion", "", True),
        ("ramplus_tl", "", True),
    ],
)
def test_each_method_runs_from_a_recipe(tmp_path, method, parameters, base):
    family = make_llama_family(tmp_path / "f", 2, torch.float32, **SMALL)
    shared = {"nearswap": "parameters: {t: 0.01}\n", "sce": "parameters: {select_topk: 0.5}\n"}.get(method, "")
    lines = [f"merge_method: {method}"] + ([f"base_model: {family[0]}"] if base else []) + ["models:"]
    merged = family[1:2] if method in ("nearswap", "arcee_fusion") else family[1:]
    for p in merged:
        lines.append(f"  - model: {p}" + (f"\n    parameters: {parameters}" if parameters else ""))
    merge("\n".join(lines) + "\n" + shared, tmp_path / "out", progress=False)
    out = Checkpoint(tmp_path / "out")
    name = "model.layers.1.mlp.up_proj.weight"
    xs = [Checkpoint(p).read(name) for p in family]
    params = {"weight": 0.4} if method == "nuslerp" else {"weight": 1.0} if method == "multislerp" else {}
    params |= {"t": 0.01} if method == "nearswap" else {"select_topk": 0.5} if method == "sce" else {}
    expected = _ours(method, xs[0] if base else None, xs[1 : 1 + len(merged)], **params)
    torch.testing.assert_close(out.read(name), expected)


def test_passthrough_recipe_copies_the_model(tmp_path):
    family = make_llama_family(tmp_path / "f", 1, torch.float32, **SMALL)
    merge(f"merge_method: passthrough\nmodels:\n  - model: {family[1]}\n", tmp_path / "out", progress=False)
    src, out = Checkpoint(family[1]), Checkpoint(tmp_path / "out")
    assert all(torch.equal(out.read(n), src.read(n)) for n in src.tensors)


def test_ties_keeps_at_least_one_element_like_mergekit():
    """mergekit's magnitude sparsification keeps max(1, ⌊density·n⌋): a small norm tensor at density
    0.01 is not left at the base."""
    from peers import mergekit_gta

    gta, group_class, sparsification = mergekit_gta()
    base, a, b = _tensors(2, shape=(40,), seed=5)
    theirs = gta.GeneralizedTaskArithmeticMerge(
        consensus_method=gta.ConsensusMethod.sum,
        sparsification_method=sparsification.magnitude,
        default_normalize=True,
        default_rescale=False,
        method_name="ties",
        method_pretty_name=None,
        method_reference_url=None,
    ).merge_group(
        group_class.from_tensors([base, a, b], base_index=0),
        int8_mask=False,
        normalize=True,
        rescale=False,
        **{"lambda": 1.0},
        weight={1: 1.0, 2: 1.0},
        density={1: 0.01, 2: 0.01},
    )
    ours = _ours("ties", base, [a, b], weight=[1.0, 1.0], density=[0.01, 0.01])
    assert not torch.equal(ours, base)
    assert_peer_close(ours, theirs, "peer_same_order")


def test_a_weight_on_slerp_is_ignored_with_a_warning_as_mergekit_does(tmp_path):
    from modelfusion.pipeline import load_recipe

    text = (
        "merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n"
        "    parameters: {weight: 0.5}\nparameters: {t: 0.5}\n"
    )
    with pytest.warns(UserWarning, match=r"models\[1\].parameters.weight: slerp takes no 'weight'; ignored"):
        recipe = load_recipe(text)
    assert recipe.models[1].parameters == {}


def test_mixed_precision_inputs_merge_in_float32_like_mergekit(tmp_path):
    from modelfusion.pipeline import plan_merge

    a = make_llama_family(tmp_path / "a", 1, torch.bfloat16, **SMALL)
    b = make_llama_family(tmp_path / "b", 1, torch.float32, **SMALL)
    plan = plan_merge(
        f"merge_method: linear\nmodels:\n  - model: {a[1]}\n    parameters: {{weight: 1}}\n"
        f"  - model: {b[1]}\n    parameters: {{weight: 1}}\n"
    )
    assert {t.compute_dtype for t in plan.tasks} == {torch.float32}
    assert {t.out.dtype for t in plan.tasks} == {torch.float32}


def test_the_output_carries_the_recipe_and_a_model_card_unless_asked_not_to(tmp_path):
    import subprocess
    import sys

    family = make_llama_family(tmp_path / "f", 2, torch.float32, **SMALL)
    recipe = tmp_path / "r.yaml"
    text = f"merge_method: ties\nbase_model: {family[0]}\nmodels:\n" + "".join(
        f"  - model: {p}\n    parameters: {{weight: 1, density: 0.5}}\n" for p in family[1:]
    )
    recipe.write_text(text)
    run = [sys.executable, "-m", "modelfusion", "merge", str(recipe)]
    assert subprocess.run([*run, str(tmp_path / "out"), "--quiet"]).returncode == 0
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == text
    card = (tmp_path / "out" / "README.md").read_text()
    assert "method `ties`" in card and str(family[1]) in card and text.strip() in card
    assert subprocess.run([*run, str(tmp_path / "bare"), "--quiet", "--no-model-card"]).returncode == 0
    assert not (tmp_path / "bare" / "README.md").exists() and not (tmp_path / "bare" / "mergekit_config.yml").exists()


PIECEWISE = [
    ("nearswap", 1, {"t": 0.05}, lambda b, xs: composite.nearswap(b, xs[0], 0.05)),
    ("ram", 3, {"epsilon": 0.2}, lambda b, xs: composite.ram(b, xs, 0.2)),
    ("ramplus_tl", 3, {"r": 0.5, "alpha": 0.3, "epsilon": 0.2}, lambda b, xs: composite.ram(b, xs, 0.2, 0.5, 0.3)),
    ("sce", 3, {"select_topk": 0.5}, lambda b, xs: composite.sce(b, xs, 0.5)),
    ("sce", 2, {"select_topk": 1.0}, lambda b, xs: composite.sce(b, xs, 1.0)),
    ("arcee_fusion", 1, {}, lambda b, xs: composite.arcee_fusion(b, xs[0])),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name, n, params, reference", PIECEWISE, ids=lambda v: str(v)[:20])
def test_methods_run_piece_by_piece_as_their_references(monkeypatch, dtype, name, n, params, reference):
    """The engine evaluates these in pieces (statistics over the whole tensor first); with pieces of
    64 elements a 37 × 23 tensor spans 14 of them, one partial: the same result as the reference."""
    monkeypatch.setattr(methods_module, "ELEMENTWISE_CHUNK", 64)
    tensors = _tensors(n, seed=11, dtype=dtype)
    got = _ours(name, tensors[0], tensors[1:], **params)
    expected = reference(tensors[0], tensors[1:])
    assert got.dtype == expected.dtype == dtype
    assert_peer_close(got.float(), expected.float(), "float32_formula")


def test_sce_with_a_nearly_silent_model_keeps_the_references_floor():
    """A model whose weight (share of the energy) is below 1e-6 takes the reference's path, where the
    weighted mean divides by at least 1e-6: where it alone moves an element, the fused path would
    divide by its tiny weight alone and keep its whole τ."""
    base = torch.zeros(64, 32)
    loud = base.clone()
    loud[32:] = 1e4  # moves only the second half, with all the energy
    quiet = base + torch.where(torch.arange(64 * 32).reshape(64, 32) % 2 == 0, 1.0, -1.0)
    got = _ours("sce", base, [loud, quiet], select_topk=1.0)
    expected = composite.sce(base, [loud, quiet], 1.0)
    assert expected[:32].abs().max() < 0.1  # the floor: 2e-8 / 1e-6 of quiet's τ
    assert_peer_close(got, expected, "float32_formula")
