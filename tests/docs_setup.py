"""What the docs' code blocks assume exists, made small: a page marks a block with
``<!-- setup: NAME -->`` and tests/test_docs.py runs it in the scope that ``NAME`` yields (inside a
temporary working directory), then checks what ``check_NAME`` says of the result, if there is one."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches(seed: int, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(n)]


@contextlib.contextmanager
def two_models(tmp: Path):
    """Two small MLPs (untrained: the calls, not the accuracy, are what the block shows) and data."""
    data = _batches(0)
    yield {
        "model_a": _mlp(1),
        "model_b": _mlp(2),
        "example_inputs": data[0][0],
        "batches": data,
        "train_batches": data[:2],
        "test_batches": data[2:],
    }


def check_two_models(scope: dict) -> None:
    assert sorted(scope["match"].perms) == sorted(scope["perms"])
    assert len(scope["result"].losses) == 11 and (Path("paths.png")).stat().st_size > 0


@contextlib.contextmanager
def experts(tmp: Path):
    """Three small MLP experts around a base, their data, and an evaluate function."""
    base = _mlp(0)
    experts = [_mlp(0) for _ in range(3)]
    for i, e in enumerate(experts):
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.01 * (i + 1) * torch.randn_like(p))
    data = [_batches(10 + i, 2) for i in range(3)]
    x, y = _batches(99, 1)[0]

    def evaluate(state) -> float:
        model = _mlp(0)
        model.load_state_dict(state)
        return float((model(x).argmax(-1) == y).float().mean())

    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    loader = [xb for xb, _ in _batches(5, 2)]
    yield {
        "experts": experts,
        "base": base,
        "evaluate": evaluate,
        "zero_shot": base,
        "fine_tuned": experts[0],
        "task_data": data,
        "net": net,
        "loader": loader,
    }


def check_experts(scope: dict) -> None:
    soup, experts = scope["soup"], scope["experts"]
    key = "0.weight"
    expected = sum(e.state_dict()[key] for e in experts) / len(experts)
    torch.testing.assert_close(soup[key], expected)
    assert isinstance(scope["model"], nn.Module)


@contextlib.contextmanager
def peft_patched(tmp: Path):
    """The block patches PEFT's module attributes; they are put back afterwards."""
    import peft.tuners.lora.model as lora_model
    import peft.utils.merge_utils as merge_utils

    names = ("ties", "dare_ties", "dare_linear", "magnitude_prune", "task_arithmetic")
    saved = {(m, n): getattr(m, n, None) for m in (merge_utils, lora_model) for n in names}
    try:
        yield {}
        from fusion_kernels.compat import peft as fused

        assert merge_utils.ties is fused.ties and lora_model.dare_linear is fused.dare_linear
    finally:
        for (module, name), value in saved.items():
            if value is None:
                delattr(module, name)
            else:
                setattr(module, name, value)


@contextlib.contextmanager
def mergekit_config(tmp: Path):
    """A mergekit config of a ties merge of two tiny generated Llamas, and its options."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions
    from modelfusion.demos.streaming import make_llama_family

    base, a, b = make_llama_family(
        tmp / "models", 2, torch.float32, hidden=32, layers=2, intermediate=48, vocab=64, kv_heads=2, heads=4
    )
    recipe = f"""
merge_method: ties
base_model: {base}
models: [{{model: {a}}}, {{model: {b}}}]
parameters: {{weight: 0.5, density: 0.5}}
dtype: float32
"""
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe))
    yield {"config": config, "options": MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)}
    import fusion_kernels.compat.mergekit as fused

    fused.uninstall()  # the block leaves the prefixed names installed


def check_mergekit_config(scope: dict) -> None:
    assert Path("out/config.json").exists()


@contextlib.contextmanager
def one_rank_llamas(tmp: Path):
    """Two grouped-query Llamas (32 heads, 8 KV heads) in ./llama-a and ./llama-b, and a gloo group
    of one process standing in for torchrun's."""
    import torch.distributed as dist
    from modelfusion.demos.streaming import make_llama_family

    paths = make_llama_family(
        tmp, 1, torch.float32, hidden=64, layers=2, intermediate=96, vocab=64, kv_heads=8, heads=32
    )
    paths[0].rename(tmp / "llama-a")
    paths[1].rename(tmp / "llama-b")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000), "RANK": "0", "WORLD_SIZE": "1"}
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_one_rank_llamas(scope: dict) -> None:
    assert scope["aligned"].keys() == scope["state_b"].keys() and scope["result"].perms
