"""fusion_kernels.compat.mergekit against mergekit 0.1.5 itself: its registry's methods one tensor
at a time, and its own ``run_merge`` on a tiny generated Llama with our methods installed."""

import math

import pytest
import torch
from helpers import assert_peer_close, randn
from peers import mergekit_gta

import fusion_kernels.compat.mergekit as fkm

DETERMINISTIC = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"]


def builtin(name):
    mergekit_gta()
    from mergekit.merge_methods import registry

    fkm.uninstall()
    return registry.get(name)


def distinct_inputs(n=3, shape=(61, 37)):
    # distinct magnitudes: every top-k is unambiguous, so libraries must agree exactly
    base = randn(shape, torch.float32, seed=1)
    steps = torch.randperm(n * base.numel(), generator=torch.Generator().manual_seed(2)).float()
    signs = torch.where(randn((n * base.numel(),), torch.float32, seed=3) > 0, 1.0, -1.0)
    taus = (signs * (steps + 1) / steps.numel()).view(n, *shape)
    return base, [base + t for t in taus]


def mergekit_group(method, base, xs, **params):
    _, TensorGroup, _ = mergekit_gta()
    group = TensorGroup.from_tensors([base, *xs], base_index=0)
    ids = range(1, len(xs) + 1)
    spec = {p.name: p for p in method.spec.parameters}
    full = {name: p.default for name, p in spec.items() if p.scope.name == "SHARED"}
    for name in ("weight", "density", "gamma", "epsilon"):
        if name in spec:
            full[name] = {i: params[name][i - 1] if name in params else spec[name].default for i in ids}
    full.update({k: v for k, v in params.items() if k not in ("weight", "density", "gamma", "epsilon")})
    return method.merge_group(group, **full)


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("normalize", [None, True, False])
def test_one_tensor_matches_mergekit(name, normalize):
    base, xs = distinct_inputs()
    w, d, g = [0.7, -0.4, 1.1], [0.3, 0.5, 0.2], [0.05, 0.1, 0.0]
    extra = {} if normalize is None else {"normalize": normalize}
    expected = mergekit_group(builtin(name), base, xs, weight=w, density=d, gamma=g, **{"lambda": 0.8}, **extra)
    options = {"gamma": g} if "breadcrumbs" in name else {}
    got = getattr(fkm, name)(base, xs, w, density=d, lam=0.8, normalize=normalize, **options)
    assert_peer_close(got, expected, "peer_same_order")


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
def test_dare_keeps_at_the_density_and_rescales_by_l1(name):
    base, xs = distinct_inputs(n=2, shape=(300, 301))
    got_full = getattr(fkm, name)(base, xs, [0.5, 0.5], density=1.0)
    expected_full = mergekit_group(builtin(name), base, xs, weight=[0.5, 0.5], density=[1.0, 1.0])
    assert_peer_close(got_full, expected_full, "peer_same_order")
    # one model, density 0.3: keep rate in a binomial interval, kept values scaled by ‖τ‖₁/‖kept‖₁
    tau = xs[0] - base
    got = getattr(fkm, name)(base, xs[:1], [1.0], density=0.3, seed=9) - base
    kept = got != 0
    rate, n = float(kept.double().mean()), tau.numel()
    assert abs(rate - 0.3) < 5 * math.sqrt(0.21 / n)
    scale = float(tau.abs().sum() / tau[kept].abs().sum())
    assert_peer_close(got[kept], tau[kept] * scale, "peer_float32")


def test_linear_and_slerp_match_mergekit():
    mergekit_gta()
    from mergekit.merge_methods.slerp import slerp as mk_slerp

    a, b = randn((16, 33), torch.float32, seed=5), randn((16, 33), torch.float32, seed=6)
    torch.testing.assert_close(fkm.slerp(0.3, a, b), mk_slerp(torch.tensor([0.3]), a, b))
    torch.testing.assert_close(fkm.linear([a, b], [2.0, 1.0]), (2 * a + b) / 3)
    torch.testing.assert_close(fkm.linear([a, b], [2.0, 1.0], normalize=False), 2 * a + b)


def test_install_swaps_and_uninstall_restores():
    mergekit_gta()
    from mergekit.merge_methods import registry

    original = builtin("ties")
    try:
        assert fkm.install(["ties"]) == ["ties"]
        fused = registry.get("ties")
        assert fused is not original and fused.spec == original.spec
        assert fkm.install(["dare_ties"], prefix="fk_") == ["fk_dare_ties"]
        assert registry.get("fk_dare_ties").spec.name == "fk_dare_ties"
        base, xs = distinct_inputs()
        params = {"weight": [1.0, 0.5, 0.25], "density": [0.4, 0.4, 0.4]}
        expected = mergekit_group(original, base, xs, **params)
        torch.testing.assert_close(mergekit_group(fused, base, xs, **params), expected)
    finally:
        fkm.uninstall()
    assert registry.get("ties") is original
    with pytest.raises(ValueError, match="methods"):
        fkm.install(["slerpy"])


@pytest.fixture(scope="module")
def tiny_llamas(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("mergekit.merge")
    root = tmp_path_factory.mktemp("llamas")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    for i in range(2):
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.01 * torch.randn_like(p))
        base.save_pretrained(root / f"ft{i}")
    return root


def run_mergekit(root, out, method):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    params = [{"weight": 0.6, "density": 0.4, "gamma": 0.05}, {"weight": 0.5, "density": 0.3, "gamma": 0.0}]
    if method.startswith("dare"):
        params = [{**p, "density": 1.0} for p in params]
    for p in params:
        if "breadcrumbs" not in method:
            p.pop("gamma")
    config = MergeConfiguration.model_validate(
        {
            "merge_method": method,
            "base_model": str(root / "base"),
            "models": [{"model": str(root / f"ft{i}"), "parameters": p} for i, p in enumerate(params)],
            "dtype": "float32",
        }
    )
    run_merge(config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("method", [*DETERMINISTIC, "dare_ties", "dare_linear"])
def test_run_merge_with_installed_methods_matches_builtins(tiny_llamas, tmp_path, monkeypatch, method):
    builtin(method)
    expected = run_mergekit(tiny_llamas, tmp_path / "builtin", method)
    calls = []
    real = fkm.generalized_task_arithmetic
    monkeypatch.setattr(fkm, "generalized_task_arithmetic", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    try:
        fkm.install()
        got = run_mergekit(tiny_llamas, tmp_path / "fused", method)
    finally:
        fkm.uninstall()
    assert calls and set(calls) == {method}, "run_merge must call our kernels"
    assert got.keys() == expected.keys()
    for name in expected:
        assert_peer_close(got[name], expected[name], "peer_same_order", msg=name)


def test_installed_methods_keep_gradients_flowing_like_mergekit():
    """Inputs that require grad go through mergekit's own (differentiable) code; without grad the
    kernels run and give the same values."""
    mergekit_gta()
    from mergekit.merge_methods import registry

    base, xs = distinct_inputs(n=2, shape=(5, 4))
    leaves = [x.clone().requires_grad_() for x in xs]
    fkm.install()
    try:
        method = registry.get("ties")
        merged = mergekit_group(method, base, leaves, weight=[0.5, 1.5], density=[1.0, 1.0])
        merged.sum().backward()
        assert all(leaf.grad is not None for leaf in leaves)
        with torch.no_grad():
            fused = mergekit_group(method, base, leaves, weight=[0.5, 1.5], density=[1.0, 1.0])
        assert_peer_close(fused, merged.detach(), "peer_same_order")
    finally:
        fkm.uninstall()
