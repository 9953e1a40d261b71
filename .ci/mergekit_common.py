"""Model factories and the merge-and-check helper that mergekit 0.1.5's test modules import as
``tests.common`` (its sdist ships the tests without that module). Written for fusion-kernels from
the names and arguments the tests use: tiny random Hugging Face models, and run_merge plus checks
of the output (an index or single shard, config.json, no NaN, every required tensor present).

Each recipe the suite merges also runs through ``modelfusion.pipeline.merge`` and is compared
with mergekit's output tensor by tensor (:func:`compare_with_modelfusion`); ``PARITY`` collects
the outcomes for .ci/mergekit_suite's summary."""

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
        compare_with_modelfusion(config, root)


PARITY: list[tuple[str, str, str]] = []  # (outcome, method, detail): same, refused, differs
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}  # masks from other generators
# methods that select elements by rank: equal keys at the cut-off are taken by index here and in
# torch.topk's order there, which bf16 inputs make common
SELECTING = {"ties", "breadcrumbs", "breadcrumbs_ties", "sce"}
# mergekit 0.1.5 writes these methods' float32 results as float32 even with dtype: bfloat16 (its
# other methods, and out_dtype's documented default, give the recipe's dtype, as ours do)
FLOAT32_OUTPUT = {"arcee_fusion", "ramplus_tl"}


def _no_farther(config, name: str, ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """The issue's bar for 16-bit merges: ours is no farther from a float32 run of mergekit than
    mergekit's own 16-bit output (largest error over the tensor, plus one unit of the dtype for
    our own final rounding). mergekit computes in the recipe's dtype, we accumulate in float32."""
    from modelfusion.io import Checkpoint

    with tempfile.TemporaryDirectory() as out:
        wide = config.model_copy(update={"dtype": "float32", "out_dtype": None})
        run_merge(wide, out_path=out, options=MergeOptions())
        exact = Checkpoint(Path(out)).read(name).float()
    unit = torch.finfo(ours.dtype).eps * max(exact.abs().max().item(), 1.0)
    return (ours.float() - exact).abs().max().item() <= (theirs.float() - exact).abs().max().item() + unit


def compare_with_modelfusion(config, mergekit_out: Path) -> None:
    """The recipe through modelfusion: the same tensor names, shapes and dtypes as mergekit's
    output, and (but for the random methods) the same values within float32 rounding, or two
    bf16/fp16 units; for the selecting methods at most 1% of the elements may differ more (ties at
    the cut-off). A recipe modelfusion refuses is recorded with its message."""
    from modelfusion.errors import FusionError
    from modelfusion.io import Checkpoint
    from modelfusion.pipeline import merge

    method = str(config.merge_method)
    with tempfile.TemporaryDirectory() as ours:
        try:
            merge(config.to_yaml(), Path(ours) / "out", progress=False)
        except FusionError as e:
            PARITY.append(("refused", method, str(e).splitlines()[0][:160]))
            return
        mine, theirs = Checkpoint(Path(ours) / "out"), Checkpoint(mergekit_out)
        names = {name: name for name in theirs.tensors}
        notes = set()
        if set(mine.tensors) != set(theirs.tensors):
            renamed = {name: name.removeprefix("model.") for name in theirs.tensors}
            if not set(renamed.values()) < set(mine.tensors):
                only = sorted(set(mine.tensors) ^ set(theirs.tensors))[:3]
                PARITY.append(("differs", method, f"tensor names differ, e.g. {only}"))
                return
            # a vision-language model: mergekit writes the vision tower and projector under model.,
            # and drops the language model (tests/test_vlm.py); what it writes is compared
            names = renamed
            notes.add(f"mergekit drops {len(mine.tensors) - len(names)} of {len(mine.tensors)} tensors (VLM)")
        for name in theirs.tensors:
            a, b = mine.read(names[name]), theirs.read(name)
            if a.dtype != b.dtype and method in FLOAT32_OUTPUT and b.dtype == torch.float32:
                notes.add(f"mergekit writes float32, ours {a.dtype}")
                b = b.to(a.dtype)
            if a.shape != b.shape or a.dtype != b.dtype:
                PARITY.append(("differs", method, f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"))
                return
            if method in RANDOM or not a.is_floating_point():
                continue
            unit = torch.finfo(a.dtype).eps if a.dtype != torch.float32 else 1e-5
            scale = max(b.float().abs().max().item(), 1.0)
            off = (a.float() - b.float()).abs() > 2 * unit * scale
            allowed = 0.01 * off.numel() if method in SELECTING else 0
            if off.sum().item() > allowed and a.dtype != torch.float32 and _no_farther(config, name, a, b):
                notes.add("16-bit: ours no farther from mergekit's float32 run than its own 16-bit output")
                continue
            if off.sum().item() > allowed:
                error = (a.float() - b.float()).abs().max().item()
                where = f"{name}: {int(off.sum())} of {off.numel()} elements, largest {error:.3g}"
                PARITY.append(("differs", method, where))
                return
            if off.any():
                notes.add(f"ties at the cut-off: up to {off.float().mean().item():.2%} of a tensor's elements")
        renamed = any(key != value for key, value in names.items())
        PARITY.append(("known" if renamed else "same", method, "; ".join(sorted(notes))))
