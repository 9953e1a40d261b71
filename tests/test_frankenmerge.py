"""Slices (mergekit's frankenmerges): layer ranges stacked, renumbered and merged slice by slice,
checked tensor by tensor against mergekit 0.1.5's run_merge, plus the output config and the errors."""

import json

import pytest
import torch
from helpers import assert_peer_close, tensors_of, with_tied_head
from modelfusion.demos.streaming import make_llama_family
from modelfusion.errors import RecipeError
from modelfusion.pipeline import merge, plan_merge
from peers import merged_by_both

SMALL = dict(hidden=64, layers=4, intermediate=96, vocab=128, kv_heads=2, heads=4)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_llama_family(tmp_path_factory.mktemp("fr"), 2, torch.float32, max_shard_size=2**16, **SMALL)


def recipes(base, a, b) -> dict[str, str]:
    return {
        # a frankenmerge: layers 0-1 of a, 1-3 of b, 3 of a again (7 layers from two 4-layer models)
        "passthrough": f"""
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}]
  - sources: [{{model: {b}, layer_range: [1, 4]}}]
  - sources: [{{model: {a}, layer_range: [3, 4]}}]
dtype: float32
""",
        # gradients run over each slice's own layers; the second slice sets its own t
        "slerp": f"""
merge_method: slerp
base_model: {base}
slices:
  - sources: [{{model: {base}, layer_range: [0, 2]}}, {{model: {a}, layer_range: [0, 2]}}]
  - sources: [{{model: {base}, layer_range: [1, 4]}}, {{model: {a}, layer_range: [1, 4]}}]
    parameters: {{t: [{{filter: mlp, value: [0.9, 0.1]}}, {{value: 0.3}}]}}
parameters: {{t: [0.2, 0.8]}}
dtype: float32
""",
        # per-source parameters before the slice's before the recipe's
        "ties": f"""
merge_method: ties
base_model: {base}
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 3]}}
      - {{model: {a}, layer_range: [0, 3], parameters: {{weight: 0.6}}}}
      - {{model: {b}, layer_range: [1, 4]}}
    parameters: {{density: 0.7}}
  - sources:
      - {{model: {base}, layer_range: [3, 4]}}
      - {{model: {a}, layer_range: [3, 4], parameters: {{density: 0.4}}}}
      - {{model: {b}, layer_range: [0, 1]}}
parameters: {{weight: 1.0, density: 0.5}}
dtype: float32
""",
    }


@pytest.mark.parametrize("method", ["passthrough", "slerp", "ties"])
def test_slices_match_mergekit(family, tmp_path, method):
    base, a, b = family
    recipe = recipes(base, a, b)[method]
    ours, theirs = merged_by_both(recipe, tmp_path)
    for name in theirs:
        assert_peer_close(ours[name], theirs[name], "peer_float32", msg=name)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    mergekit_config = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    assert config["num_hidden_layers"] == mergekit_config["num_hidden_layers"]


def test_slices_over_a_base_with_tied_embeddings_merge_its_embedding_as_its_head(family, tmp_path):
    """The head comes from the last slice's sources; a source that keeps it tied to its embedding
    gives its embedding, as mergekit reads it, and the output config unties the head."""
    base, a, b = family
    tied = with_tied_head(base, tmp_path / "tied")
    ours, theirs = merged_by_both(recipes(tied, a, b)["ties"], tmp_path)
    assert "lm_head.weight" in ours
    for name in theirs:
        assert_peer_close(ours[name], theirs[name], "peer_float32", msg=name)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["tie_word_embeddings"] is False


def test_a_frankenmerge_copies_each_layer_from_its_source_and_renumbers(family, tmp_path):
    base, a, b = family
    merge(recipes(base, a, b)["passthrough"], tmp_path / "out", progress=False)
    out, ta, tb = tensors_of(tmp_path / "out"), tensors_of(a), tensors_of(b)
    sources = [(ta, 0), (ta, 1), (tb, 1), (tb, 2), (tb, 3), (ta, 3)]
    for layer, (model, src) in enumerate(sources):
        for name in [n for n in ta if n.startswith("model.layers.0.")]:
            assert torch.equal(out[name.replace(".0.", f".{layer}.", 1)], model[name.replace(".0.", f".{src}.", 1)])
    assert torch.equal(out["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])  # the first slice's
    assert torch.equal(out["model.norm.weight"], ta["model.norm.weight"])  # the last slice's
    assert not any(n.startswith("model.layers.6.") for n in out)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6


def test_per_layer_config_lists_are_sliced_alike(family, tmp_path):
    base, a, b = family
    config = json.loads((a / "config.json").read_text())
    variant = tmp_path / "a"
    variant.mkdir()
    for f in a.iterdir():
        (variant / f.name).symlink_to(f)
    (variant / "config.json").unlink()
    layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    (variant / "config.json").write_text(json.dumps({**config, "layer_types": layer_types}))
    recipe = recipes(base, variant, b)["passthrough"]
    plan = plan_merge(recipe)
    assert plan.config_overrides["num_hidden_layers"] == 6
    assert plan.config_overrides["layer_types"] == [layer_types[i] for i in (0, 1, 1, 2, 3, 3)]
    merge(recipe, tmp_path / "out", progress=False)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["layer_types"] == plan.config_overrides["layer_types"]


def test_a_slice_over_all_layers_is_the_models_recipe(family, tmp_path):
    base, a, b = family
    models = f"merge_method: ties\nbase_model: {base}\nmodels:\n"
    models += "".join(f"  - model: {m}\n    parameters: {{weight: 0.5, density: [0.3, 0.9]}}\n" for m in (a, b))
    sliced = f"merge_method: ties\nbase_model: {base}\nslices:\n  - sources:\n"
    sliced += f"      - {{model: {base}, layer_range: [0, 4]}}\n"
    sliced += "".join(
        f"      - {{model: {m}, layer_range: [0, 4], parameters: {{weight: 0.5, density: [0.3, 0.9]}}}}\n"
        for m in (a, b)
    )
    merge(models, tmp_path / "models", progress=False)
    merge(sliced, tmp_path / "sliced", progress=False)
    x, y = tensors_of(tmp_path / "models"), tensors_of(tmp_path / "sliced")
    assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)


def test_gradients_run_over_each_slice(family):
    base, a, b = family
    plan = plan_merge(recipes(base, a, b)["slerp"])
    t = {task.out.name: task.params["t"] for task in plan.tasks}
    assert t["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(0.2)
    assert t["model.layers.1.self_attn.q_proj.weight"] == pytest.approx(0.8)
    assert t["model.layers.2.mlp.up_proj.weight"] == pytest.approx(0.9)  # the second slice's own t
    assert t["model.layers.3.mlp.up_proj.weight"] == pytest.approx(0.5)
    assert t["model.layers.4.self_attn.q_proj.weight"] == pytest.approx(0.3)
    assert t["model.embed_tokens.weight"] == pytest.approx(0.2)  # outside layers: t = 0


def test_slice_errors_name_the_slice_and_source(family):
    base, a, b = family
    good = recipes(base, a, b)
    bad = {
        good["passthrough"].replace(
            "[1, 4]", "[2, 6]"
        ): r"slices\[1\]\.sources\[0\]\.layer_range: \[2, 6\] reaches past the 4 layers",
        good["passthrough"].replace(
            "[1, 4]", "[3, 1]"
        ): r"slices\[1\]\.sources\[0\]\.layer_range: expected \[start, end\]",
        good["slerp"].replace(f"{{model: {a}, layer_range: [0, 2]}}", f"{{model: {a}, layer_range: [0, 3]}}"): (
            r"slices\[0\]\.sources: every source must span the same number of layers"
        ),
        good["slerp"].replace(f"  - sources: [{{model: {base}, layer_range: [0, 2]}}, ", "  - sources: ["): (
            r"slices\[0\]: the base model .* is not one of its sources"
        ),
        good["passthrough"].replace("  - sources: [{model", "  - merge_method: linear\n    sources: [{model", 1): (
            r"slices\[0\]\.'merge_method': unknown key .*one merge_method per recipe"
        ),
        good["passthrough"].replace(
            f"[{{model: {a}, layer_range: [0, 2]}}]",
            f"[{{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [0, 2]}}]",
        ): (r"slices\[0\]\.sources: passthrough takes exactly one other, got 2"),
    }
    for recipe, message in bad.items():
        with pytest.raises(RecipeError, match=message):
            plan_merge(recipe)


def test_modules_of_one_module_are_its_models_or_slices(family, tmp_path):
    base, a, b = family
    slices = recipes(base, a, b)["ties"].split("slices:\n", 1)[1].split("parameters: {weight: 1.0")[0]
    moduled = (
        f"merge_method: ties\nbase_model: {base}\nmodules:\n  default:\n    slices:\n"
        + "".join(f"    {line}\n" for line in slices.splitlines())
        + "    parameters: {weight: 1.0, density: 0.5}\ndtype: float32\n"
    )
    merge(recipes(base, a, b)["ties"], tmp_path / "plain", progress=False)
    merge(moduled, tmp_path / "module", progress=False)
    x, y = tensors_of(tmp_path / "plain"), tensors_of(tmp_path / "module")
    assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)
    with pytest.raises(RecipeError, match=r"modules.vision.models: expected a non-empty list"):
        plan_merge(moduled.replace("modules:\n  default:", "modules:\n  vision: {models: []}\n  default:"))
    with pytest.raises(
        RecipeError, match=r"modules.vision: model .* has no such module; its modules are \['default'\]"
    ):
        plan_merge(
            moduled.replace(
                "modules:\n  default:",
                f"modules:\n  vision: {{models: [{a}], parameters: {{weight: 1.0}}}}\n  default:",
            )
        )
