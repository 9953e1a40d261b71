"""FusionBench 0.2.33's outputs on two small model pools, stored for tests/test_fusion_bench.py.

Regenerate with fusion-bench installed (a separate venv is fine: it pulls lightning and hydra):
    python tests/fusion_bench_golden.py [CASE ...]   # writes tests/data/fusion_bench/*.safetensors
The pools are made here from fixed seeds, so the test rebuilds the same inputs without fusion-bench.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

DATA = Path(__file__).with_name("data") / "fusion_bench"
TASKS = 4

# (case, FusionBench module, class, constructor arguments); our classes take the same arguments
CASES = [
    ("simple_average", "fusion_bench.method", "SimpleAverageAlgorithm", {}),
    (
        "weighted_average",
        "fusion_bench.method",
        "WeightedAverageAlgorithm",
        {"normalize": True, "weights": [0.1, 0.2, 0.3, 0.4]},
    ),
    ("task_arithmetic", "fusion_bench.method", "TaskArithmeticAlgorithm", {"scaling_factor": 0.3}),
    *[
        (
            f"ties_{f}",
            "fusion_bench.method",
            "TiesMergingAlgorithm",
            {"scaling_factor": 0.3, "threshold": 0.2, "remove_keys": [], "merge_func": f},
        )
        for f in ("sum", "mean", "max")
    ],
    ("magmax", "fusion_bench.method.magmax", "MagMaxAlgorithm", {"scaling_factor": 0.5}),
    ("tsv", "fusion_bench.method.task_singular_vector", "TaskSingularVectorMerging", {"alpha": 1.0}),
    (
        "tsv_per_task",
        "fusion_bench.method.task_singular_vector",
        "TaskSingularVectorMerging",
        {"alpha": [1.0, 0.5, 0.8, 1.2]},
    ),
    ("iso_c", "fusion_bench.method.isotropic_merging", "ISO_C_Merge", {"scaling_factor": 1.0}),
    (
        "iso_cts",
        "fusion_bench.method.isotropic_merging",
        "ISO_CTS_Merge",
        {"scaling_factor": 1.0, "common_space_fraction": 0.8},
    ),
    ("slerp", "fusion_bench.method.slerp", "SlerpMergeAlgorithm", {"t": 0.3}),
    ("model_stock", "fusion_bench.method.model_stock", "ModelStock", {}),
    ("model_stock_2", "fusion_bench.method.model_stock", "ModelStock", {"ignore_keys": ["0.bias"]}),
]
# DARE: (case, class, arguments); FusionBench's masks (torch.rand_like in its order) are stored
# beside each output, so the test can hand ours the same masks
DARE_CASES = [
    (
        "dare_task_arithmetic",
        "DareTaskArithmetic",
        {"scaling_factor": 0.3, "sparsity_ratio": 0.4, "only_on_linear_weights": False, "rescale": True},
    ),
    (
        "dare_task_arithmetic_linear",
        "DareTaskArithmetic",
        {"scaling_factor": 0.5, "sparsity_ratio": 0.6, "only_on_linear_weights": True, "rescale": False},
    ),
    ("dare_simple_average", "DareSimpleAverage", {"sparsity_ratio": 0.5, "only_on_linear_weights": False}),
    (
        "dare_ties",
        "DareTiesMerging",
        {
            "sparsity_ratio": 0.3,
            "only_on_linear_weights": False,
            "rescale": True,
            "scaling_factor": 0.5,
            "threshold": 0.2,
            "remove_keys": [],
            "merge_func": "sum",
        },
    ),
]


def dropped_order(template: nn.Module, only_on_linear_weights: bool) -> list[str]:
    """The tensors FusionBench's DARE draws a mask for, in its order (per model)."""
    if only_on_linear_weights:
        return [f"{n}.weight" for n, m in template.named_modules() if isinstance(m, nn.Linear)]
    return [n for n, p in template.named_parameters() if p.requires_grad]


# cases run on a smaller pool: slerp takes exactly two models (the pretrained one among them)
POOL_TASKS = {"slerp": 1, "model_stock_2": 2}


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 40), nn.LayerNorm(40), nn.Linear(40, 12))


def _clip() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    return CLIPVisionModel(config)


TEMPLATES = {"mlp": _mlp, "clip": _clip}


def pool(kind: str, tasks: int = TASKS) -> dict[str, nn.Module]:
    """``{"_pretrained_": θ₀, "task0": θ₀ + τ₀, ...}``, the same on every machine."""
    g = torch.Generator().manual_seed(7)
    base = TEMPLATES[kind]()
    for p in base.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.2
    models = {"_pretrained_": base}
    for i in range(tasks):
        tuned = TEMPLATES[kind]()
        tuned.load_state_dict(base.state_dict())
        for p in tuned.parameters():
            p.data += torch.randn(p.shape, generator=g) * 0.05 * (1 + i)
        models[f"task{i}"] = tuned
    return models


def main(only: list[str]) -> None:
    import importlib

    from fusion_bench.modelpool import BaseModelPool
    from safetensors.torch import save_file

    DATA.mkdir(parents=True, exist_ok=True)
    for kind in TEMPLATES:
        for case, module, name, kwargs in CASES:
            if only and case not in only:
                continue
            algorithm = getattr(importlib.import_module(module), name)(**kwargs)
            merged = algorithm.run(BaseModelPool(pool(kind, POOL_TASKS.get(case, TASKS))))
            state = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
            save_file(state, DATA / f"{kind}-{case}.safetensors")
            print(kind, case, file=sys.stderr)
        if not only or "emr" in only:
            from fusion_bench.method.emr_merging import EMRMerging

            emr = EMRMerging().run(BaseModelPool(pool(kind)))
            state = {f"unified|{k}": v.detach().contiguous() for k, v in emr.unified_task_vector.state_dict().items()}
            for i in range(TASKS):
                emr.set_task(f"task{i}")
                state.update({f"task{i}|{k}": v.detach().clone() for k, v in emr.backbone.state_dict().items()})
                modulator = emr.modulators[f"task{i}"]
                state[f"rescaler|{i}"] = modulator.rescaler.detach().reshape(1)
                state.update(
                    {f"mask{i}|{k}": v.detach().to(torch.uint8) for k, v in modulator.mask.state_dict().items()}
                )
            save_file(state, DATA / f"{kind}-emr.safetensors")
            print(kind, "emr", file=sys.stderr)
        for lam in (0.4, 1.0):
            if only and f"tall_{lam}" not in only:
                continue
            # TallMaskTaskArithmeticAlgorithm.run itself raises on any pool of modules (it mixes the
            # Parameters of state_dict(keep_vars=True) with plain tensors); its steps, on plain
            # state dicts, with FusionBench's own functions:
            from fusion_bench.method.tall_mask.task_arithmetic import generate_task_masks
            from fusion_bench.utils import state_dict_arithmetic as sda

            models = pool(kind)
            theta0 = models.pop("_pretrained_").state_dict()
            taus = {name: sda.state_dict_sub(m.state_dict(), theta0) for name, m in models.items()}
            multi = sda.state_dict_sum(list(taus.values()))
            state = {}
            for name, tau in taus.items():
                mask = generate_task_masks(multi, tau, theta0, tall_mask_lambda=lam)
                merged = sda.state_dict_add(theta0, sda.state_dict_hadamard_product(mask, multi))
                state.update({f"{name}|{k}": v.contiguous() for k, v in merged.items()})
            save_file(state, DATA / f"{kind}-tall_{lam}.safetensors")
            print(kind, "tall", lam, file=sys.stderr)
        for case, name, kwargs in DARE_CASES:
            if only and case not in only:
                continue
            drawn: list = []
            rand_like = torch.rand_like

            def recording(t, *args, _draw=rand_like, _drawn=drawn, **kw):
                r = _draw(t, *args, **kw)
                _drawn.append(r)
                return r

            torch.manual_seed(0)
            torch.rand_like = recording
            try:
                algorithm = getattr(importlib.import_module("fusion_bench.method.dare"), name)(**kwargs)
                merged = algorithm.run(BaseModelPool(pool(kind)))
            finally:
                torch.rand_like = rand_like
            state = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
            save_file(state, DATA / f"{kind}-{case}.safetensors")
            order = dropped_order(TEMPLATES[kind](), kwargs["only_on_linear_weights"])
            keys = [f"{i}|{n}" for i in range(TASKS) for n in order]
            assert len(keys) == len(drawn), (len(keys), len(drawn))
            masks = {k: (r > kwargs["sparsity_ratio"]).to(torch.uint8) for k, r in zip(keys, drawn, strict=True)}
            save_file(masks, DATA / f"{kind}-{case}-masks.safetensors")
            print(kind, case, file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])  # the cases named, or all
