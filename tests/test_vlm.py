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


def _modules_recipe(a, b, layers=2, text_weight="0.5", only=None):
    """mergekit's own form of a models recipe on a LLaVA (its mergekit_config.yml): one module per
    layer stack, named in transformers' layout, and ``default`` for the tensors outside layers."""
    modules = {
        "default": 0,
        "model.language_model.layers": layers,
        "model.vision_tower.encoder.layers": 2,
    }
    lines = ["merge_method: linear", "dtype: float32", "modules:"]
    for name, count in modules.items():
        if only and name not in only:
            continue
        weight = text_weight if "language" in name else "0.5"
        lines += [f"  {name}:", "    slices:", "    - sources:"]
        for m, w in ((a, weight), (b, "0.5")):
            lines += [f"      - {{model: {m}, layer_range: [0, {count}], parameters: {{weight: {w}}}}}"]
    return "\n".join(lines) + "\n"


def test_mergekits_modules_form_merges_as_the_models_form(vlms, tmp_path):
    a, b, _ = vlms
    merge(_modules_recipe(a, b, text_weight="[0.2, 0.8]"), tmp_path / "modules", progress=False)
    models = (
        f"merge_method: linear\ndtype: float32\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.5}}}}\n"
        f"  - {{model: {b}, parameters: {{weight: 0.5}}}}\n"
    )
    merge(models, tmp_path / "models", progress=False)
    got, plain, xa, xb = (tensors_of(p) for p in (tmp_path / "modules", tmp_path / "models", a, b))
    assert got.keys() == plain.keys() == xa.keys()
    for name in got:
        if "language_model.model.layers." in name:  # a's weight, a gradient over the language model's 2 layers
            w = 0.2 if ".layers.0." in name else 0.8
            assert_peer_close(got[name], (w * xa[name] + 0.5 * xb[name]) / (w + 0.5), "float32_formula", msg=name)
        else:
            assert torch.equal(got[name], plain[name]), name


def test_modules_are_checked_against_the_models(vlms, tmp_path):
    a, b, _ = vlms
    from modelfusion.errors import RecipeError

    wrong = _modules_recipe(a, b).replace("model.vision_tower.encoder.layers", "vision_tower.blocks")
    with pytest.raises(RecipeError, match=r"modules.vision_tower.blocks: model .* has no such module; its modules"):
        merge(wrong, tmp_path / "x", progress=False)
    with pytest.raises(RecipeError, match="changing the layer count of one module of several is not supported"):
        merge(_modules_recipe(a, b, layers=1), tmp_path / "y", progress=False)
    sliced = f"merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 1]}}]\n"
    with pytest.raises(RecipeError, match="has several modules .*slice them under 'modules'"):
        merge(sliced, tmp_path / "z", progress=False)
    assert not any(p.exists() for p in (tmp_path / "x", tmp_path / "y", tmp_path / "z"))


def test_a_recipe_of_some_modules_writes_only_those_and_says_so(vlms, tmp_path):
    a, b, _ = vlms
    with pytest.warns(UserWarning, match="not written, as mergekit writes only the modules a recipe names"):
        merge(_modules_recipe(a, b, only=["model.language_model.layers"]), tmp_path / "out", progress=False)
    written = tensors_of(tmp_path / "out")
    assert written and all(".layers." in n and "language_model" in n for n in written)
