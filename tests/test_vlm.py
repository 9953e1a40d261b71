"""Vision-language models (mergekit's VLM tests: tiny LLaVAs): merged by name with ``models:``, every
tensor kept under its checkpoint name, and the output loads into transformers with no key missing.

mergekit 0.1.5 under transformers 5 writes only the vision tower and the projector (renamed under
``model.``) and drops the whole language model; where it writes a tensor, ours equals it."""

import pytest
import torch
from helpers import assert_peer_close, tensors_of
from modelfusion.pipeline import merge
from peers import run_mergekit

transformers = pytest.importorskip("transformers")


def _llava(path, seed: int):
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(
        image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2, hidden_size=64, intermediate_size=128
    )
    text = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2
    )
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    return [_llava(root / f"vlm{i}", i) for i in range(3)]


RECIPES = {
    "linear": (
        "merge_method: linear\nmodels: [{{model: {a}}}, {{model: {b}}}]\nparameters: {{weight: 0.5}}\ndtype: float32\n"
    ),
    "task_arithmetic": (
        "merge_method: task_arithmetic\nbase_model: {c}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
        "parameters: {{weight: 0.5}}\n"
        "dtype: float32\n"
    ),
    "nuslerp": (
        "merge_method: nuslerp\nbase_model: {c}\nmodels: [{{model: {a}, parameters: {{weight: 0.3}}}}, "
        "{{model: {b}, parameters: {{weight: 0.7}}}}]\ndtype: float32\n"
    ),
}


@pytest.mark.parametrize("method", list(RECIPES))
def test_a_vlm_merge_keeps_every_tensor_and_equals_mergekit_where_it_writes(vlms, tmp_path, method):
    a, b, c = vlms
    recipe = RECIPES[method].format(a=a, b=b, c=c)
    merge(recipe, tmp_path / "ours", progress=False)
    ours, source = tensors_of(tmp_path / "ours"), tensors_of(a)
    assert ours.keys() == source.keys()  # the language model, vision tower and projector, as named
    _, info = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    run_mergekit(recipe, tmp_path / "mergekit")
    theirs = tensors_of(tmp_path / "mergekit")
    assert theirs and all(name.startswith("model.") and name[len("model.") :] in ours for name in theirs)
    for name, tensor in theirs.items():
        assert_peer_close(ours[name[len("model.") :]], tensor, "peer_float32", msg=name)
    assert not any("language_model" in name for name in theirs)  # what mergekit drops (see above)
