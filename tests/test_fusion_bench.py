"""modelfusion.integrations.fusion_bench against FusionBench 0.2.33's own classes: the stored
outputs of its algorithms on two seeded pools (an MLP and a small CLIP vision model; made by
tests/fusion_bench_golden.py) must equal ours on the same pools within float32 rounding."""

import pytest
import torch
from fusion_bench_golden import CASES, DATA, POOL_TASKS, TASKS, TEMPLATES, pool
from modelfusion.errors import ParameterError
from modelfusion.integrations import fusion_bench as ours
from safetensors.torch import load_file

# the SVD-based merges agree to the rounding of two LAPACK paths (batched here, one matrix there)
TOLERANCE = {"tsv": 1e-5, "tsv_per_task": 1e-5, "iso_c": 1e-5, "iso_cts": 1e-4}


@pytest.mark.parametrize("kind", TEMPLATES)
@pytest.mark.parametrize("case, module, name, kwargs", CASES, ids=[c[0] for c in CASES])
def test_each_algorithm_equals_fusion_bench(kind, case, module, name, kwargs):
    if kind == "clip":
        pytest.importorskip("transformers")
    expected = load_file(DATA / f"{kind}-{case}.safetensors")
    merged = getattr(ours, name)(**kwargs).run(pool(kind, POOL_TASKS.get(case, TASKS)))
    got = merged.state_dict()
    assert got.keys() == expected.keys()
    tol = TOLERANCE.get(case, 2e-6)
    for key, want in expected.items():
        torch.testing.assert_close(got[key], want, rtol=tol, atol=tol, msg=f"{kind} {case} {key}")


def test_a_pool_is_a_dict_or_anything_with_model_names_and_load_model():
    models = pool("mlp")

    class Pool:  # FusionBench's BaseModelPool, as far as the algorithms use it
        model_names = [k for k in models if k != "_pretrained_"]

        def load_model(self, name):
            return models[name]

    by_dict = ours.MagMaxAlgorithm(scaling_factor=0.5, inplace=False).run(pool("mlp")).state_dict()
    by_pool = ours.MagMaxAlgorithm(scaling_factor=0.5, inplace=False).run(Pool()).state_dict()
    assert all(torch.equal(by_dict[k], by_pool[k]) for k in by_dict)


def test_bad_arguments_are_named():
    with pytest.raises(ParameterError, match="merge_func"):
        ours.TiesMergingAlgorithm(scaling_factor=1, threshold=0.2, remove_keys=[], merge_func="median").run(pool("mlp"))
    with pytest.raises(ParameterError, match="weights: expected 4"):
        ours.WeightedAverageAlgorithm(normalize=True, weights=[1.0]).run(pool("mlp"))
    with pytest.raises(ParameterError, match="_pretrained_"):
        ours.TaskArithmeticAlgorithm(scaling_factor=0.3).run({"a": pool("mlp")["task0"]})
