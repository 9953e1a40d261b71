"""LoRA extraction (``modelfusion extract-lora``): the best rank-r factors of every linear layer's
task matrix as a PEFT adapter that PEFT loads and our ``model+adapter`` reader applies, no farther
from the tuned model than mergekit-extract-lora's at the same rank; bad input refused, nothing
partial left."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_peer_close
from modelfusion.cli import main
from modelfusion.demos.streaming import make_llama_family
from modelfusion.errors import CheckpointError, OutputError, RecipeError
from modelfusion.io import Checkpoint, save_model
from modelfusion.io.lora import open_model
from modelfusion.pipeline.extract import extract_lora

import fusion_kernels as fk

SMALL = dict(hidden=64, layers=2, intermediate=96, vocab=128, kv_heads=2, heads=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base and a tune of it: rank-3 changes to the linear layers, a changed norm and embedding."""
    root = tmp_path_factory.mktemp("extract")
    base = make_llama_family(root / "family", 0, torch.float32, **SMALL)[0]
    g = torch.Generator().manual_seed(1)
    state = {n: Checkpoint(base).read(n) for n in Checkpoint(base).tensors}
    tuned = {}
    for name, x in state.items():
        if x.dim() == 2 and "embed" not in name and "lm_head" not in name:
            x = x + 0.05 * torch.randn(x.shape[0], 3, generator=g) @ torch.randn(3, x.shape[1], generator=g)
        elif name.endswith("layers.1.input_layernorm.weight") or "embed_tokens" in name:
            x = x + 0.01 * torch.randn(x.shape, generator=g)
        tuned[name] = x
    save_model(root / "tuned", tuned, json.loads((base / "config.json").read_text()))
    return base, root / "tuned"


def test_a_low_rank_tune_is_recovered_and_applies_through_our_reader(models, tmp_path):
    base, tuned = models
    done = extract_lora(base, tuned, tmp_path / "adapter", 4, progress=False)
    assert done.modules == 14 and done.relative_error < 1e-5  # 7 linear layers x 2, each of rank 3 < 4
    norms = [f"model.layers.{i}.input_layernorm.weight" for i in range(2)]  # PEFT takes a module name's all
    assert done.saved_whole == ["model.embed_tokens.weight", *norms]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4 and config["peft_type"] == "LORA"
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert config["modules_to_save"] == ["embed_tokens", "input_layernorm"]
    applied, want = open_model(Path(f"{base}+{tmp_path / 'adapter'}")), Checkpoint(tuned)
    for name in want.tensors:
        assert_peer_close(applied.read(name), want.read(name), "float32_formula", msg=name)


def test_peft_loads_the_adapter_and_reproduces_the_tuned_model(models, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base, tuned = models
    extract_lora(base, tuned, tmp_path / "adapter", 4, progress=False)
    model = transformers.LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").merge_and_unload().state_dict()
    want = Checkpoint(tuned)
    for name in want.tensors:
        assert_peer_close(merged[name], want.read(name), "float32_formula", msg=name)


def test_the_error_is_the_best_a_rank_allows_and_no_worse_than_mergekits(models, tmp_path):
    """A full-rank tune: each matrix's error is Eckart-Young's √(Σ_{i>r} sᵢ²), and mergekit-extract-lora's
    (0.1.5, same rank) is no smaller."""
    base, _ = models
    family = make_llama_family(tmp_path / "full", 1, torch.float32, **SMALL)
    extract_lora(family[0], family[1], tmp_path / "ours", 5, progress=False)
    ours, plain, want = (
        open_model(Path(f"{family[0]}+{tmp_path / 'ours'}")),
        Checkpoint(family[0]),
        Checkpoint(family[1]),
    )
    name = "model.layers.0.mlp.up_proj.weight"
    delta = (want.read(name) - plain.read(name)).double()
    s = torch.linalg.svdvals(delta)
    best = float(s[5:].square().sum().sqrt())
    error = float((ours.read(name).double() - want.read(name).double()).norm())
    assert abs(error - best) <= 1e-5 * float(s.norm())
    if shutil.which("mergekit-extract-lora") is None:
        pytest.skip("mergekit-extract-lora is not installed")
    run = subprocess.run(
        ["mergekit-extract-lora", "--model", str(family[1]), "--base-model", str(family[0]),
         "--out-path", str(tmp_path / "theirs"), "--max-rank", "5"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = open_model(Path(f"{family[0]}+{tmp_path / 'theirs'}"))
    their_error = float((theirs.read(name).double() - want.read(name).double()).norm())
    assert error <= their_error * (1 + 1e-5)


def test_bad_input_is_refused_and_nothing_partial_is_left(models, tmp_path):
    base, tuned = models
    with pytest.raises(RecipeError, match="rank: expected an int >= 1"):
        extract_lora(base, tuned, tmp_path / "a", 0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(OutputError, match="not an empty directory"):
        extract_lora(base, tuned, tmp_path / "full", 4)
    other = make_llama_family(tmp_path / "other", 0, torch.float32, **{**SMALL, "hidden": 32})[0]
    with pytest.raises(CheckpointError, match="tensor 'model.*: .* in .*, but .* has shape"):
        extract_lora(other, tuned, tmp_path / "b", 4)
    with pytest.raises(RecipeError, match="memory_budget"):
        extract_lora(base, tuned, tmp_path / "c", 4, memory_budget=1000)
    assert not any(p.name.endswith(".partial") or p.name in "abc" for p in tmp_path.iterdir())


def test_the_command_line(models, tmp_path, capsys):
    base, tuned = models
    assert main(["extract-lora", str(base), str(tuned), str(tmp_path / "adapter"), "--rank", "2", "--quiet"]) == 0
    assert "14 linear layers at rank 2" in capsys.readouterr().out
    assert main(["extract-lora", str(base), str(tuned), str(tmp_path / "adapter"), "--rank", "2"]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert sys.executable  # the command runs in-process here; the wheel check runs the installed one


def test_ctrl_c_leaves_nothing_and_says_so(models, tmp_path, monkeypatch, capsys):
    base, tuned = models
    calls = []
    real_svd = fk.truncated_svd

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(fk, "truncated_svd", interrupted)
    assert main(["extract-lora", str(base), str(tuned), str(tmp_path / "adapter"), "--rank", "2", "--quiet"]) == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
