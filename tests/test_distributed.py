"""Distributed merges: 2–4 processes on loopback (our own launcher and torchrun), byte-identical to one
process; a killed rank fails the others within the timeout and --resume completes the output;
ranks that plan differently or do not share OUT are refused; --node-local. Distributed weight
matching over gloo equals the single-process result."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import kill_when_journaled
from modelfusion.demos.streaming import make_llama_family, recipe_text
from modelfusion.errors import DistributedError
from modelfusion.pipeline import merge
from modelfusion.pipeline.distributed import World
from modelfusion.ranks import deal_by_cost

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    shape = dict(hidden=256, layers=8, intermediate=512, vocab=2048, kv_heads=2, heads=4)
    return make_llama_family(tmp_path_factory.mktemp("models"), 2, torch.float32, max_shard_size=2**22, **shape)


def write_recipe(path: Path, method: str, models, shard: str = "300KB") -> Path:
    path.write_text(recipe_text(method, models) + f"max_shard_size: {shard}\n")  # threads: per rank, by default
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks: int, *args, port: int | None = None, per_rank=None) -> list[subprocess.Popen]:
    """``ranks`` processes of ``modelfusion merge ARGS --distributed``; ``per_rank(r)`` may give a rank other args."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port or free_port()), "WORLD_SIZE": str(ranks)}
    procs = []
    for r in range(ranks):
        rank_args = per_rank(r) if per_rank else args
        cmd = [sys.executable, "-m", "modelfusion", "merge", *map(str, rank_args), "--distributed", "--quiet"]
        procs.append(subprocess.Popen(cmd, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def finish(procs, timeout=300) -> list[tuple[int, str, str]]:
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out.decode(), err.decode()))
    return results


def assert_same_files(actual: Path, expected: Path) -> None:
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in actual.iterdir()) == names  # no journals or partial files left
    for name in names:
        assert (actual / name).read_bytes() == (expected / name).read_bytes(), name


def test_shards_are_balanced_by_bytes():
    costs = [5, 1, 1, 1, 1, 1, 4, 3, 3]
    owners = deal_by_cost(costs, 3)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(3)]
    assert loads == [7, 7, 6] and owners == deal_by_cost(costs, 3)
    assert max(loads) <= sum(costs) / 3 + max(costs)
    assert deal_by_cost([10, 10], 4) == [0, 1]  # more ranks than shards: the others idle
    assert deal_by_cost([], 2) == []


@pytest.mark.parametrize(("method", "ranks"), [("linear", 2), ("ties", 3), ("dare_ties", 4), ("dare_linear", 2)])
def test_distributed_output_is_byte_identical(models, tmp_path, method, ranks):
    recipe = write_recipe(tmp_path / "r.yaml", method, models)
    merge(recipe, tmp_path / "single", progress=False)
    results = finish(launch(ranks, recipe, tmp_path / "dist"))
    for rc, _, err in results:
        assert rc == 0, err
    assert f"by {ranks} processes" in results[0][1]
    assert_same_files(tmp_path / "dist", tmp_path / "single")


def test_torchrun_runs_the_recipe_unchanged(models, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "ties", models)
    merge(recipe, tmp_path / "single", progress=False)
    cmd = ["--standalone", "--nproc-per-node", "2", "-m", "modelfusion", "merge", recipe, tmp_path / "dist", "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *map(str, cmd)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "by 2 processes" in proc.stdout
    assert_same_files(tmp_path / "dist", tmp_path / "single")


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_fails_the_run_within_the_timeout_and_resume_completes_it(models, tmp_path, victim):
    recipe = write_recipe(tmp_path / "r.yaml", "dare_ties", models)
    merge(recipe, tmp_path / "single", progress=False)
    out, timeout = tmp_path / "dist", 4
    procs = launch(2, recipe, out, "--timeout", timeout)
    kill_when_journaled(procs[victim], out / f".modelfusion-journal-rank{victim:05d}.json", 2)
    killed = time.monotonic()
    survivor = procs[1 - victim]
    _, err = survivor.communicate(timeout=120)
    waited = time.monotonic() - killed
    assert survivor.returncode == 2, err.decode()
    err = err.decode()
    if victim == 1:  # rank 0 notices rank 1's silence
        assert "rank 1 stopped beating its heartbeat for 4 s" in err, err
        assert waited < timeout + 10
    else:  # rank 1 loses the store rank 0 served
        assert "lost the job's store at 127.0.0.1" in err, err
    assert "--resume" in err
    assert not (out / INDEX).exists()
    results = finish(launch(2, recipe, out, "--resume"))
    for rc, _, err in results:
        assert rc == 0, err
    assert "shards kept from before" in results[0][1]
    assert_same_files(out, tmp_path / "single")


def test_ranks_with_different_recipes_are_refused(models, tmp_path):
    ties = write_recipe(tmp_path / "ties.yaml", "ties", models)
    other = write_recipe(tmp_path / "other.yaml", "ties", models, shard="200KB")
    results = finish(launch(2, port=None, per_rank=lambda r: [ties if r == 0 else other, tmp_path / "out"]))
    for rc, _, err in results:
        assert rc == 2 and "ranks [1] planned a different merge than rank 0" in err, err
    assert not (tmp_path / "out").exists()


def test_a_rank_that_cannot_read_the_recipe_fails_every_rank_at_once(models, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "linear", models)
    start = time.monotonic()
    results = finish(launch(2, per_rank=lambda r: [recipe if r == 0 else tmp_path / "missing.yaml", tmp_path / "out"]))
    assert time.monotonic() - start < 60  # not the 300 s timeout: the error is published
    assert "rank 1" in results[0][2] and "missing.yaml" in results[0][2], results[0][2]
    assert results[1][0] == 2 and "missing.yaml" in results[1][2]


def test_an_unshared_output_is_refused_and_node_local_writes_each_part(models, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "ties", models)
    merge(recipe, tmp_path / "single", progress=False)
    results = finish(launch(2, per_rank=lambda r: [recipe, tmp_path / f"node{r}"]))
    for rc, _, err in results:
        assert rc == 2 and "not one directory shared by all ranks" in err and "--node-local" in err, err
    for r in range(2):
        for f in (tmp_path / f"node{r}").iterdir():
            f.unlink()
    results = finish(launch(2, per_rank=lambda r: [recipe, tmp_path / f"node{r}", "--node-local"]))
    for rc, _, err in results:
        assert rc == 0, err
    assert (tmp_path / "node0" / INDEX).exists() and not (tmp_path / "node1" / INDEX).exists()
    parts = {p.name: p for r in range(2) for p in (tmp_path / f"node{r}").iterdir()}
    assert sorted(parts) == sorted(p.name for p in (tmp_path / "single").iterdir())
    for name, path in parts.items():
        assert path.read_bytes() == (tmp_path / "single" / name).read_bytes(), name


def test_a_distributed_run_needs_the_launcher_variables(monkeypatch, tmp_path):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedError, match="lacks RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"):
        World.from_env()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(DistributedError, match=r"RANK must be in \[0, WORLD_SIZE=2\), got 2"):
        World.from_env()


MATCH_WORKER = """
import sys, torch, torch.distributed as dist
from modelfusion import align
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
case = torch.load(sys.argv[1])
a, b = case["a"], case["b"]
spec = align.llama_spec(a, heads=6, kv_heads=2)
mine = align.local_keys({k: a[k].nbytes for k in sorted(spec.by_tensor())}, rank, world)
result = align.weight_matching(spec, {k: a[k] for k in mine}, {k: b[k] for k in mine}, group=dist.group.WORLD)
aligned = align.apply_perms(spec, result.perms, {k: b[k] for k in mine})
torch.save({"perms": result.perms, "objective": result.objective, "sweeps": result.sweeps, "aligned": aligned},
           sys.argv[2] + f".{rank}")
dist.destroy_process_group()
"""


def _two_llamas():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6)
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**config, num_key_value_heads=2, tie_word_embeddings=False))
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


@pytest.mark.parametrize("ranks", [2, 3])
def test_distributed_weight_matching_equals_one_process(tmp_path, ranks):
    from modelfusion import align

    a, b = _two_llamas()
    spec = align.llama_spec(a, heads=6, kv_heads=2)
    expected = align.weight_matching(spec, a, b)
    assert expected.sweeps > 1  # a real descent, not a planted one-step recovery
    torch.save({"a": a, "b": b}, tmp_path / "case.pt")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(ranks)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MATCH_WORKER, tmp_path / "case.pt", tmp_path / "result"],
            env={**env, "RANK": str(r)},
            stderr=subprocess.PIPE,
        )
        for r in range(ranks)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    results = [torch.load(tmp_path / f"result.{r}") for r in range(ranks)]
    aligned = align.apply_perms(spec, expected.perms, b)
    held = [set(r["aligned"]) for r in results]
    assert set().union(*held) == set(spec.by_tensor()) and sum(map(len, held)) == len(spec.by_tensor())
    for r in results:
        assert r["sweeps"] == expected.sweeps
        assert r["objective"] == pytest.approx(expected.objective, rel=1e-9)
        for p, perm in expected.perms.items():
            assert torch.equal(r["perms"][p], perm), p
        for k, t in r["aligned"].items():
            assert torch.equal(t, aligned[k]), k


def test_a_distributed_dry_run_prints_each_shards_rank(models, tmp_path, monkeypatch, capsys):
    from modelfusion.cli import main

    recipe = write_recipe(tmp_path / "r.yaml", "linear", models, shard="1MB")
    for name, value in {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--distributed", "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if ".safetensors:" in line]
    assert lines and {line.rsplit("(rank ", 1)[1] for line in lines} == {"0)", "1)", "2)"}
    assert not (tmp_path / "out").exists()
