"""Model factories and the merge-and-check helper that mergekit 0.1.5's test modules import as
``tests.common`` (its sdist ships the tests without that module). Written for fusion-kernels from
the names and arguments the tests use: tiny random Hugging Face models, and run_merge plus checks
of the output (an index or single shard, config.json, no NaN, every required tensor present)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import transformers
from mergekit.architecture import arch_info_for_config, get_architecture_info
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex
from mergekit.merge import MergeOptions, run_merge


def _save(model, path) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def make_picollama(path, vocab_size: int = 64) -> str:
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2
    )
    return _save(transformers.LlamaForCausalLM(config), path)


def make_picogranite(path, vocab_size: int = 64) -> str:
    config = transformers.GraniteConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=2,
    )
    return _save(transformers.GraniteForCausalLM(config), path)


def make_gpt2size(path) -> str:
    config = transformers.GPT2Config(n_ctx=1024, n_embd=768, n_head=12, n_layer=12, n_positions=1024)
    return _save(transformers.GPT2LMHeadModel(config), path)


def make_picoLlaVa(path) -> str:  # noqa: N802 (the name mergekit's tests import)
    vision = transformers.CLIPVisionConfig(
        image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2, hidden_size=64, intermediate_size=128
    )
    text = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2
    )
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16)
    return _save(transformers.LlavaForConditionalGeneration(config), path)


def run_and_check_merge(
    config,
    check_nan: bool = True,
    check_tensors: bool = True,
    validate=None,
    index_json_name: str | None = None,
    auto_arch: bool = False,
) -> None:
    index_name = index_json_name or "model.safetensors.index.json"
    with tempfile.TemporaryDirectory() as out:
        run_merge(config, out_path=out, options=MergeOptions())
        root = Path(out)
        single = root / index_name.replace(".index.json", "")
        assert (root / index_name).exists() or single.exists(), "no model written"
        assert (root / "config.json").exists(), "no config.json written"
        if check_nan:
            loader = LazyTensorLoader.from_disk(out, lazy_unpickle=False)
            for name in loader.index.tensor_paths:
                assert not torch.isnan(loader.get_tensor(name)).any(), f"NaN in {name}"
        if check_tensors:
            model_config = transformers.AutoConfig.from_pretrained(out)
            arch = get_architecture_info(config, MergeOptions()) if auto_arch else arch_info_for_config(model_config)
            written = ShardedTensorIndex.from_disk(out).tensor_paths
            for weight in arch.all_weights(model_config):
                names = [weight.name, *(weight.aliases or ())]
                if not weight.optional and not any(n in written for n in names):
                    raise RuntimeError(f"the output lacks {weight.name}")
        if validate is not None:
            validate(out)
