"""LoRA references (``model+adapter``): a PEFT adapter's update added as the model is read, equal
to PEFT's own merge_and_unload, through the reader and through a recipe."""

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_peer_close
from modelfusion.demos.streaming import make_llama_family
from modelfusion.errors import CheckpointError
from modelfusion.io import Checkpoint
from modelfusion.io.lora import open_model
from modelfusion.pipeline import merge

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SMALL = dict(hidden=64, layers=2, intermediate=96, vocab=128, kv_heads=2, heads=4)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_llama_family(tmp_path_factory.mktemp("lora"), 0, torch.float32, **SMALL)[0]


def make_adapter(base: Path, out: Path, **options) -> dict[str, torch.Tensor]:
    """Saves a LoRA adapter with random A and B at ``out``; returns PEFT's merged state dict."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    config = peft.LoraConfig(init_lora_weights=False, **options)
    wrapped = peft.get_peft_model(model, config)
    wrapped.save_pretrained(out)
    return {k: v.detach().clone() for k, v in wrapped.merge_and_unload().state_dict().items()}


ADAPTERS = {
    "linear": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    "rslora-patterns": dict(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "down_proj"], alpha_pattern={"down_proj": 3}
    ),
    "embedding-and-head": dict(
        r=2, lora_alpha=4, target_modules=["embed_tokens", "o_proj"], modules_to_save=["lm_head"]
    ),
}


@pytest.mark.parametrize("kind", ADAPTERS)
def test_reading_through_an_adapter_equals_peft_merge_and_unload(base, tmp_path, kind):
    expected = make_adapter(base, tmp_path / "adapter", **ADAPTERS[kind])
    model = open_model(Path(f"{base}+{tmp_path / 'adapter'}"))
    plain = Checkpoint(base)
    changed = 0
    for name in plain.tensors:
        got = model.read(name)
        assert_peer_close(got, expected[name], "peer_float32", msg=name)
        changed += not torch.equal(got, plain.read(name))
    assert changed >= 2, "the adapter must change some tensors"


def test_a_recipe_merges_a_lora_reference(base, tmp_path):
    expected = make_adapter(base, tmp_path / "adapter", **ADAPTERS["linear"])
    recipe = (
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {{model: {base}, lora: {tmp_path / 'adapter'}}}\n    parameters: {{weight: 0.5}}\n"
    )
    merge(recipe, tmp_path / "out", progress=False)
    out, plain = Checkpoint(tmp_path / "out"), Checkpoint(base)
    for name in plain.tensors:  # base + 0.5·(W + ΔW − W)
        want = plain.read(name) + 0.5 * (expected[name] - plain.read(name))
        assert_peer_close(out.read(name), want, "peer_float32", msg=name)
    string_form = recipe.replace(f"{{model: {base}, lora: {tmp_path / 'adapter'}}}", f"{base}+{tmp_path / 'adapter'}")
    merge(string_form, tmp_path / "out2", progress=False)
    second = Checkpoint(tmp_path / "out2")
    assert all(torch.equal(second.read(n), out.read(n)) for n in plain.tensors)


def test_adapters_that_cannot_be_applied_are_named(base, tmp_path):
    make_adapter(base, tmp_path / "dora", r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(CheckpointError, match="DoRA"):
        open_model(Path(f"{base}+{tmp_path / 'dora'}"))
    with pytest.raises(CheckpointError, match="not a PEFT adapter"):
        open_model(Path(f"{base}+{tmp_path / 'missing'}"))
    make_adapter(base, tmp_path / "odd", r=2, lora_alpha=4, target_modules=["q_proj"])
    config = json.loads((tmp_path / "odd" / "adapter_config.json").read_text())
    narrow = {**SMALL, "hidden": 32, "heads": 2, "kv_heads": 1}
    other = make_llama_family(tmp_path / "narrow", 0, torch.float32, **narrow)[0]
    assert config["r"] == 2
    with pytest.raises(CheckpointError, match="do not fit"):
        open_model(Path(f"{other}+{tmp_path / 'odd'}"))
