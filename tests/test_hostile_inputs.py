"""Hostile and odd inputs: a named FusionError or a correct result, never a traceback, never a
wrong output, never a journal left behind. Property tests (hypothesis) over recipes, safetensors
headers and index files, and the cases found by hand."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelfusion.demos.streaming import make_llama_family, recipe_text
from modelfusion.errors import CheckpointError, FusionError, RecipeError
from modelfusion.io import Checkpoint, read_header
from modelfusion.pipeline import load_recipe, merge, plan_merge
from modelfusion.pipeline.recipe import parse_size

SMALL = dict(hidden=32, layers=2, intermediate=48, vocab=64, kv_heads=2, heads=4)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_llama_family(tmp_path_factory.mktemp("hostile"), 2, torch.float32, **SMALL)


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modelfusion", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120
    )


# ---------------------------------------------------------------- recipes


def _laughs(key: str) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + f"\nmerge_method: linear\nmodels: [x]\n{key}: *i\n"


@pytest.mark.parametrize("key", ["seed", "memory_budget", "device", "tokenizer_source", "models", "threads"])
def test_billion_laughs_is_refused_quickly_with_a_short_message(key):
    text = _laughs(key).replace("models: [x]\n" + f"{key}: *i", f"{key}: *i") if key == "models" else _laughs(key)
    start = time.perf_counter()
    with pytest.raises(RecipeError) as info:
        load_recipe(text)
    assert time.perf_counter() - start < 2.0
    assert len(str(info.value)) < 400


def test_deep_nesting_and_huge_recipes_are_named():
    with pytest.raises(RecipeError, match="nest"):
        load_recipe("merge_method: linear\nmodels: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(RecipeError, match="at most"):
        load_recipe("merge_method: linear\n# " + "x" * (5 * 2**20))


@pytest.mark.parametrize(
    "extra, message",
    [
        ("threads: 100000", r"threads: expected an int in \[1, 4096\]"),
        ("memory_budget: 0.0001B", "memory_budget: expected a positive size"),
        ("seed: -1", "seed: expected an int"),
    ],
)
def test_out_of_range_settings_are_named(family, extra, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe_text("linear", family) + extra + "\n")


def test_an_int_layer_range_and_a_missing_gpu_are_named(family):
    base, a, _ = family
    sliced = f"merge_method: linear\nslices:\n  - sources:\n    - model: {a}\n      layer_range: 3\n"
    with pytest.raises(RecipeError, match=r"layer_range: expected \[start, end\]"):
        load_recipe(sliced)
    if torch.cuda.device_count() < 8:
        with pytest.raises(RecipeError, match="asked for, but this machine has"):
            plan_merge(recipe_text("linear", family) + "device: cuda:7\n")


def test_sizes_that_round_to_nothing_are_refused():
    with pytest.raises(RecipeError):
        parse_size("0.0001B", "--memory-budget")
    assert parse_size("1.5KiB", "x") == 1536


_yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_keys = st.sampled_from(
    ["merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "seed", "memory_budget"]
    + ["threads", "device", "max_shard_size", "tokenizer_source", "tokenizer", "chat_template", "unknown"]
)


@FAST
@given(st.dictionaries(_keys, _yaml_values, max_size=8), st.sampled_from(["linear", "ties", "slerp", "della"]))
def test_any_recipe_is_parsed_or_refused_by_name(raw, method):
    raw.setdefault("merge_method", method)
    with contextlib.suppress(FusionError):
        load_recipe(yaml.safe_dump(raw))


# ---------------------------------------------------------------- headers and indexes


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_as_a_safetensors_file_are_read_or_refused(tmp_path, data):
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    with contextlib.suppress(CheckpointError):
        read_header(path)


_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I32", "F8_E4M3", "F8_E5M2", "X9", 3]),
        "shape": st.lists(st.integers(-3, 5) | st.floats(0, 3) | st.text(max_size=2), max_size=3),
        "data_offsets": st.lists(st.integers(-4, 64), min_size=0, max_size=3),
    }
)


@FAST
@given(st.dictionaries(st.text(max_size=6), _entries, max_size=4), st.integers(0, 64))
def test_any_header_is_read_exactly_or_refused(tmp_path, header, data_bytes):
    encoded = json.dumps(header).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(data_bytes))
    try:
        tensors = read_header(path)
    except CheckpointError:
        return
    for info in tensors.values():  # accepted: every tensor lies inside the file, its size agrees
        assert info.offset + info.nbytes <= path.stat().st_size
        assert info.nbytes == info.dtype.itemsize * torch.Size(info.shape).numel()


@FAST
@given(_yaml_values)
def test_any_index_json_is_read_or_refused(tmp_path, weight_map):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with contextlib.suppress(CheckpointError):
        Checkpoint(tmp_path)


# ---------------------------------------------------------------- runs: journals, resume, CLI


def test_a_failed_run_leaves_nothing_and_a_fixed_rerun_works(family, tmp_path, monkeypatch):
    import modelfusion.pipeline.executor as executor

    def broken(*args, **kwargs):
        raise CheckpointError("simulated failure on the first tensor")

    monkeypatch.setattr(executor, "compute_task", broken)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="simulated"):
        merge(recipe_text("linear", family), out, progress=False)
    assert not out.exists()  # no journal, no directory: nothing blocks the next run
    monkeypatch.undo()
    merge(recipe_text("linear", family), out, progress=False)
    assert (out / "model.safetensors.index.json").exists()


def test_resume_of_a_finished_merge_succeeds_and_a_corrupt_journal_is_named(family, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text("linear", family))
    out = tmp_path / "out"
    assert _cli("merge", recipe, out, "--quiet").returncode == 0
    again = _cli("merge", recipe, out, "--resume", "--quiet")
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr
    other = tmp_path / "other.yaml"
    other.write_text(recipe_text("linear", family).replace("seed: 7", "seed: 8"))
    assert _cli("merge", other, out, "--resume", "--quiet").returncode == 2
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / ".modelfusion-journal.json").write_text("{not json")
    run = _cli("merge", recipe, broken, "--resume", "--quiet")
    assert run.returncode == 2 and "corrupt journal" in run.stderr and "Traceback" not in run.stderr


def test_version_and_help_are_plain_text():
    import fusion_kernels

    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"modelfusion {fusion_kernels.__version__}"
    helped = _cli("merge", "--help")
    assert helped.returncode == 0 and "``" not in helped.stdout and "the YAML recipe" in helped.stdout


SIGNAL_RUNS = int(os.environ.get("MODELFUSION_SIGNAL_RUNS", "4"))


@pytest.fixture(scope="module")
def sharded_family(tmp_path_factory):
    shape = dict(hidden=512, layers=4, intermediate=1024, vocab=4096, kv_heads=4, heads=8)
    return make_llama_family(tmp_path_factory.mktemp("signals"), 2, torch.bfloat16, **shape)


def test_sigint_and_sigterm_stop_cleanly_and_resume_is_byte_identical(sharded_family, tmp_path):
    """Signals at random points of the merge (the first shard journaled, or later): exit 130 for
    SIGINT and 143 for SIGTERM, never an abort, and --resume completes it byte for byte."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text("ties", sharded_family) + "max_shard_size: 2MB\nthreads: 1\n")
    whole = tmp_path / "whole"
    assert _cli("merge", recipe, whole, "--quiet").returncode == 0
    rng = random.Random(0)
    for run in range(SIGNAL_RUNS):
        out = tmp_path / f"out{run}"
        sig = (signal.SIGINT, signal.SIGTERM)[run % 2]
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelfusion", "merge", str(recipe), str(out), "--quiet"],
            stderr=subprocess.PIPE,
            text=True,
        )
        journal = out / ".modelfusion-journal.json"
        wanted = rng.randint(1, 6)
        while proc.poll() is None:
            try:
                if len(json.loads(journal.read_text())["shards"]) >= wanted:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.002)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
        assert "terminate called" not in stderr and "Traceback" not in stderr, stderr
        assert proc.returncode in (0, 130 if sig == signal.SIGINT else 143), (proc.returncode, stderr)
        if proc.returncode != 0:
            resumed = _cli("merge", recipe, out, "--resume", "--quiet")
            assert resumed.returncode == 0, resumed.stderr
        for f in whole.iterdir():
            assert (out / f.name).read_bytes() == f.read_bytes(), (run, f.name)
