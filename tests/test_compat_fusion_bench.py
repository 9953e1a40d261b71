"""fusion_kernels.compat.fusion_bench: with install(), FusionBench's averaging, task-arithmetic,
TIES and DARE classes give its stored outputs (tests/fusion_bench_golden.py) within float32
rounding, on our kernels (DARE seeded as the stored run was: the same masks). Where fusion-bench
is installed its own classes run; elsewhere (CI) stand-ins with its class names, attributes and
BaseModelPool interface take their place in sys.modules, so the routing and every patched run()
are still exercised."""

import importlib
import sys
import types

import pytest
import torch
from fusion_bench_golden import CASES, DARE_CASES, DATA, TASKS, TEMPLATES, pool
from helpers import assert_peer_close
from safetensors.torch import load_file

from fusion_kernels.compat import fusion_bench as compat

ROUTED = {"simple_average", "weighted_average", "task_arithmetic", "ties_sum", "ties_mean", "ties_max"}


class _Pool:
    """FusionBench's BaseModelPool as the patched runs use it."""

    def __init__(self, models):
        self.models = dict(models)

    @property
    def model_names(self):
        return [k for k in self.models if not k.startswith("_")]

    def load_model(self, name):
        return self.models[name]


class _Algorithm:
    """FusionBench's algorithms keep their arguments as attributes and in ``config``."""

    def __init__(self, **kwargs):
        kwargs.setdefault("inplace", True)
        self.config = types.SimpleNamespace(**kwargs)
        self.config.get = lambda key, default=None: getattr(self.config, key, default)
        for key, value in kwargs.items():
            setattr(self, key, value)

    def run(self, modelpool, **kwargs):
        raise NotImplementedError("FusionBench's own run (the stand-in has none)")


@pytest.fixture
def fusion_bench(monkeypatch):
    """FusionBench's modules: the real ones when installed, else stand-ins."""
    try:
        importlib.import_module("fusion_bench.method")
        real = True
    except ImportError:
        real = False
        classes = {name: type(name, (_Algorithm,), {}) for _, name, _ in compat.ROUTES}
        monkeypatch.setitem(sys.modules, "fusion_bench", types.ModuleType("fusion_bench"))
        monkeypatch.setitem(sys.modules, "fusion_bench.modelpool", types.SimpleNamespace(BaseModelPool=_Pool))
        for module, name, _ in compat.ROUTES:
            monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(**{name: classes[name]}))
    yield real
    compat.uninstall()


def _algorithm(name, kwargs):
    module = next(m for m, n, _ in compat.ROUTES if n == name)
    return getattr(importlib.import_module(module), name)(**kwargs)


@pytest.mark.parametrize("kind", TEMPLATES)
@pytest.mark.parametrize("case, module, name, kwargs", [c for c in CASES if c[0] in ROUTED], ids=lambda c: str(c))
def test_installed_classes_give_fusion_bench_outputs(fusion_bench, kind, case, module, name, kwargs):
    if kind == "clip":
        pytest.importorskip("transformers")
    assert set(compat.install()) == {n for _, n, _ in compat.ROUTES} and compat.installed()
    models = pool(kind, TASKS)
    merged = _algorithm(name, kwargs).run(models if fusion_bench else _Pool(models)).state_dict()
    expected = load_file(DATA / f"{kind}-{case}.safetensors")
    assert merged.keys() == expected.keys()
    for key, want in expected.items():
        assert_peer_close(merged[key], want, "fusion_bench", msg=f"{kind} {case} {key}")


@pytest.mark.parametrize("kind", TEMPLATES)
@pytest.mark.parametrize("case, name, kwargs", DARE_CASES, ids=lambda c: str(c))
def test_installed_dare_gives_fusion_bench_outputs(fusion_bench, kind, case, name, kwargs):
    """Seeded as the stored run: the routed run draws FusionBench's masks (torch.rand_like in its
    order) and merges them on the engine."""
    if kind == "clip":
        pytest.importorskip("transformers")
    compat.install()
    torch.manual_seed(0)
    algorithm = _algorithm(name, kwargs)
    models = pool(kind, TASKS)
    merged = algorithm.run(models if fusion_bench else _Pool(models)).state_dict()
    expected = load_file(DATA / f"{kind}-{case}.safetensors")
    assert merged.keys() == expected.keys()
    for key, want in expected.items():
        assert_peer_close(merged[key], want, "fusion_bench", msg=f"{kind} {case} {key}")


def test_dare_with_frozen_parameters_goes_to_fusion_bench(fusion_bench):
    """FusionBench's DARE draws masks for frozen parameters but neither subtracts nor merges them:
    such pools take its own run (before any draw, so the seeded stream is untouched)."""
    kwargs = {"scaling_factor": 0.3, "sparsity_ratio": 0.4, "only_on_linear_weights": False, "rescale": True}

    def frozen_pool():
        models = pool("mlp", 2)
        for m in models.values():
            m[0].bias.requires_grad_(False)
        return models

    compat.install()
    if not fusion_bench:
        with pytest.raises(NotImplementedError):
            _algorithm("DareTaskArithmetic", kwargs).run(_Pool(frozen_pool()))
        return
    from fusion_bench.modelpool import BaseModelPool  # its own DARE takes no plain dict

    torch.manual_seed(0)
    routed = _algorithm("DareTaskArithmetic", kwargs).run(BaseModelPool(frozen_pool())).state_dict()
    compat.uninstall()
    torch.manual_seed(0)
    own = _algorithm("DareTaskArithmetic", kwargs).run(BaseModelPool(frozen_pool())).state_dict()
    assert all(torch.equal(routed[k], own[k]) for k in own)


def test_uninstall_restores_their_own_run(fusion_bench):
    name = compat.ROUTES[0][1]
    own = _algorithm(name, {}).run.__func__
    compat.install()
    compat.install()  # idempotent
    assert _algorithm(name, {}).run.__func__ is not own
    compat.uninstall()
    assert _algorithm(name, {}).run.__func__ is own and not compat.installed()


def test_unsupported_pools_go_to_fusion_bench(fusion_bench):
    """bfloat16 models are not routed: FusionBench's own run receives the call."""
    compat.install()
    models = {k: m.to(torch.bfloat16) for k, m in pool("mlp", 2).items()}
    algorithm = _algorithm("TaskArithmeticAlgorithm", {"scaling_factor": 0.3})
    if fusion_bench:
        merged = algorithm.run(models).state_dict()
        assert all(t.dtype == torch.bfloat16 for t in merged.values())
    else:
        with pytest.raises(NotImplementedError):
            algorithm.run(_Pool(models))
