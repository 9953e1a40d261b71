"""modelfusion.io: safetensors headers checked, tensors read exactly, shards written atomically."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from modelfusion.errors import CheckpointError, OutputError
from modelfusion.io import Checkpoint, OutputTensor, ShardWriter, read_header, save_model
from safetensors.torch import load_file, save_file

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool]


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(ALL_DTYPES):
        x = torch.randn(3, 5 + i, generator=g) * 10
        out[f"t{i}.{str(dtype)[6:]}"] = x > 0 if dtype == torch.bool else x.to(dtype)
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 4)
    return out


def test_reads_what_the_safetensors_library_wrote(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "m.safetensors")
    c = Checkpoint(tmp_path / "m.safetensors")
    assert set(c.tensors) == set(tensors)
    for name, t in tensors.items():
        got = c.read(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name


def test_our_shards_load_in_the_safetensors_library(tmp_path):
    tensors = sample_tensors()
    save_model(tmp_path, tensors, {"model_type": "test"}, max_shard_size=100)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)
    loaded = {}
    for shard in shards:
        sizes = [t.nbytes for t in read_header(shard).values()]
        assert sum(sizes) <= 100 or len(sizes) == 1, (shard, sizes)
        loaded.update(load_file(shard))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    c = Checkpoint(tmp_path)
    assert all(torch.equal(c.read(n), t) for n, t in tensors.items())
    assert not list(tmp_path.glob("*.partial"))


def test_writer_rejects_a_tensor_off_plan_and_aborts_cleanly(tmp_path):
    w = ShardWriter(tmp_path / "s.safetensors", [OutputTensor("a", torch.float32, (2, 3))])
    with pytest.raises(OutputError, match=r"'a' expected torch.float32 \(2, 3\), got torch.float16"):
        w.write(torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(OutputError, match="1 planned tensors were not written"):
        w.commit()
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(100), "b": torch.ones(7)}, path)
    raw = path.read_bytes()
    cases = {
        "truncated": raw[:-3],
        "no header": raw[:5],
        "header longer than file": struct.pack("<Q", 10**6) + raw[8:],
        "corrupt json": raw[:8] + b"{" * (len(raw) - 8),
    }
    for what, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=str(path)):
            read_header(path)
        assert what


def test_a_hole_in_the_data_is_rejected(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    with pytest.raises(CheckpointError, match="starts at byte 4 of the data, expected 0"):
        read_header(path)


def test_a_file_truncated_after_opening_fails_on_read(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(1000)}, path)
    c = Checkpoint(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated while reading tensor 'a'"):
        c.read("a")


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_entries_that_escape_the_directory_are_rejected(tmp_path, target):
    model = tmp_path / "model"
    model.mkdir()
    save_file({"a": torch.ones(2)}, tmp_path / "outside.safetensors")
    index = {"metadata": {}, "weight_map": {"a": target}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        Checkpoint(model)


def test_index_naming_a_tensor_its_file_lacks(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "s.safetensors")
    index = {"weight_map": {"a": "s.safetensors", "b": "s.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="1 tensors are not in the files"):
        Checkpoint(tmp_path)


def test_bin_checkpoints_need_the_opt_in_and_load_weights_only(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        Checkpoint(tmp_path)
    c = Checkpoint(tmp_path, allow_pickle=True)
    assert all(torch.equal(c.read(n), t) for n, t in state.items())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="evil.bin"):
        Checkpoint(tmp_path / "evil.bin", allow_pickle=True)


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no model weights"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("where", ["disk", "shm"])
def test_staged_writes_across_many_blocks(tmp_path, monkeypatch, where):
    """Tensors spanning several staging buffers, odd sizes, on a file system with O_DIRECT and on
    tmpfs (which refuses it)."""
    import os
    import tempfile

    from modelfusion.io import writer

    if where == "shm" and not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    directory = Path(tempfile.mkdtemp(dir="/dev/shm")) if where == "shm" else tmp_path
    monkeypatch.setattr(writer, "STAGE_BYTES", 3 * 4096)
    g = torch.Generator().manual_seed(5)
    tensors = {f"t{i}": torch.randn(n, generator=g).to(torch.bfloat16) for i, n in enumerate([1, 10_001, 3, 40_000])}
    try:
        save_model(directory, tensors)
        c = Checkpoint(directory)
        assert all(torch.equal(c.read(n), t) and torch.equal(c.map(n), t) for n, t in tensors.items())
        assert load_file(next(directory.glob("model-*.safetensors")))["t3"].equal(tensors["t3"])
    finally:
        if where == "shm":
            shutil.rmtree(directory)


def _hub_cache(root: Path, tensors: dict, sharded: bool) -> Path:
    """A model laid out as huggingface_hub's cache does: snapshot files are symlinks into ../../blobs."""
    entry = root / "models--org--tiny"
    blobs, snapshot = entry / "blobs", entry / "snapshots" / "abc123"
    staging = root / "staging"
    if sharded:
        save_model(staging, tensors, {"model_type": "test"}, max_shard_size=64)
    else:
        staging.mkdir()
        save_file(tensors, staging / "model.safetensors")
        (staging / "config.json").write_text('{"model_type": "test"}')
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(staging.iterdir())):
        shutil.move(f, blobs / f"sha{i}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"sha{i}")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123")
    return entry


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single-file"])
def test_a_hugging_face_hub_cache_entry_and_snapshot_are_read(tmp_path, sharded):
    tensors = {"a": torch.randn(4, 8), "b": torch.randn(16), "c": torch.arange(6)}
    entry = _hub_cache(tmp_path, tensors, sharded)
    snapshot = entry / "snapshots" / "abc123"
    for path in (entry, snapshot):
        c = Checkpoint(path)
        assert c.path == snapshot and c.config == {"model_type": "test"}
        assert all(torch.equal(c.read(n), t) and torch.equal(c.map(n), t) for n, t in tensors.items())


def test_a_recipe_names_a_cached_hub_model_by_its_id_and_revision(tmp_path, monkeypatch):
    """``org/name`` (``@revision``, or mergekit's ``{path, revision}``) that is no local path is read
    from the Hugging Face cache ($HF_HUB_CACHE) at ``refs/main`` or the revision; nothing is
    downloaded, and a model the cache lacks is refused with the command that fetches it."""
    from modelfusion.errors import RecipeError
    from modelfusion.pipeline import load_recipe, merge

    generator = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(4, 8, generator=generator), "b": torch.randn(16, generator=generator)}
    (tmp_path / "cache").mkdir()
    entry = _hub_cache(tmp_path / "cache", tensors, sharded=False)
    (entry / "refs" / "v1").write_text("abc123")
    other = tmp_path / "other"
    save_model(other, {k: v + 1 for k, v in tensors.items()}, {"model_type": "test"})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # org/tiny is no local path here
    snapshot = entry / "snapshots" / "abc123"
    text = f"merge_method: linear\nmodels:\n  - model: MODEL\n    parameters: {{weight: 1}}\n  - model: {other}\n"
    text += "    parameters: {weight: 1}\n"
    for name in ("org/tiny", "org/tiny@v1", "org/tiny@abc123", "{path: org/tiny, revision: v1}"):
        assert load_recipe(text.replace("MODEL", name)).models[0].path == snapshot, name
    merge(text.replace("MODEL", "org/tiny"), tmp_path / "out", progress=False)
    merged = Checkpoint(tmp_path / "out")
    for n, t in tensors.items():  # the two models' mean (1e-6: values near 0 after rounding t + 1)
        torch.testing.assert_close(merged.read(n), (t + (t + 1)) / 2, rtol=1e-6, atol=1e-6)
    for name, command in (("org/absent", "huggingface-cli download org/absent`"), ("org/tiny@v2", "--revision v2`")):
        with pytest.raises(RecipeError, match=f"models\\[0\\].model: '{name}' is no local path.*{command}"):
            load_recipe(text.replace("MODEL", name))


def test_index_entries_must_be_regular_files(tmp_path):
    (tmp_path / "sub").mkdir()
    index = {"weight_map": {"a": "sub"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a regular file"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize(
    "weight_map, message",
    [([["a", "s.safetensors"]], "weight_map: expected a mapping"), ({"a": 3}, "outside the model directory")],
    ids=["list", "int"],
)
def test_malformed_index_files_are_named(tmp_path, weight_map, message):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(tmp_path)


def test_a_corrupt_config_and_a_deep_header_are_named(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not a valid JSON config"):
        Checkpoint(tmp_path)
    deep = b"[" * 200_000 + b"]" * 200_000
    (tmp_path / "d.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        read_header(tmp_path / "d.safetensors")


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"dtype": "F32", "shape": [-2, 1], "data_offsets": [0, 8]}, "bad header entry"),
        ({"dtype": "F8_E8M0", "shape": [2], "data_offsets": [0, 2]}, "unsupported dtype 'F8_E8M0'"),
        ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, "bad header entry"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, r"do not hold \(3,\)"),
    ],
    ids=["negative-dim", "unknown-dtype", "float-dim", "size-disagrees"],
)
def test_hostile_header_entries_are_named(tmp_path, entry, message):
    header = json.dumps({"a": entry}).encode()
    (tmp_path / "h.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(CheckpointError, match=message):
        read_header(tmp_path / "h.safetensors")


def test_fp8_reads_exactly_and_block_scaled_fp8_dequantizes(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(300, 200, generator=g) * 3).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2, generator=g) + 0.5  # blocks of 128 x 128, the last ones partial
    e5 = torch.randn(7, generator=g).to(torch.float8_e5m2)
    save_file({"w": w, "w_scale_inv": scale, "e5": e5}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"weight_block_size": [128, 128]}}))
    c = Checkpoint(tmp_path)
    assert set(c.tensors) == {"w", "e5"}  # the scale travels with its weight
    expected = w.float() * scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert torch.equal(c.read("w"), expected) and torch.equal(c.map("w"), expected)
    assert c.read("e5").dtype == torch.float8_e5m2 and torch.equal(c.read("e5").float(), e5.float())


def _page_aligned(values: torch.Tensor) -> torch.Tensor:
    """``values`` copied into an anonymous mapping: memory that starts on a page, as the pipeline's
    output buffers do."""
    import mmap

    out = torch.frombuffer(mmap.mmap(-1, values.nbytes), dtype=values.dtype).view(values.shape)
    return out.copy_(values)


def _aligned_and_not():
    """(name, tensor) in an order that takes every path of ShardWriter.write: page-aligned and 1 MiB
    or more (written from their own memory), one with a tail of 100 bytes past its last block, small
    ones that leave the file's end off a block (so the aligned one after them is copied) and put it
    back on one (so the next goes direct again)."""
    g = torch.Generator().manual_seed(5)
    return [
        ("a", _page_aligned(torch.randn(2**18, generator=g))),
        ("b", _page_aligned(torch.randn(2**18 + 25, generator=g))),  # tail: 100 bytes past a block
        ("c", torch.randn(1000, generator=g).bfloat16()),
        ("d", _page_aligned(torch.randn(2**19, generator=g).bfloat16())),  # the file's end is off a block
        ("e", torch.randn((4096 - 100 - 2000) // 2, generator=g).bfloat16()),  # ...and back on one
        ("f", _page_aligned(torch.randn(512, 1024, generator=g))),
        ("g", torch.randn(7, generator=g)),
    ]


def _write_shard(path: Path, tensors, on_written=None) -> None:
    w = ShardWriter(path, [OutputTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors])
    for name, t in tensors:
        w.write(t, on_written=None if on_written is None else (lambda name=name: on_written(name)))
    w.commit()


def test_aligned_tensors_are_written_from_their_own_memory_byte_for_byte(tmp_path, monkeypatch):
    """The file is the same bytes as one written all through the staging buffers, its data starts on
    a block, on_written reports each tensor once, and the safetensors library reads it back."""
    from modelfusion.io import writer as writer_module

    tensors = _aligned_and_not()
    direct, reported = [], []
    real = writer_module.ShardWriter._write_direct

    def counted(self, data, offset, on_written):
        direct.append((len(data), offset))
        real(self, data, offset, on_written)

    monkeypatch.setattr(writer_module.ShardWriter, "_write_direct", counted)
    _write_shard(tmp_path / "direct.safetensors", tensors, reported.append)
    assert sorted(reported) == [n for n, _ in tensors]
    header = 8 + struct.unpack("<Q", (tmp_path / "direct.safetensors").read_bytes()[:8])[0]
    assert header % 4096 == 0
    block = lambda nbytes: nbytes // 4096 * 4096  # noqa: E731
    sizes = {n: t.nbytes for n, t in tensors}
    assert [d[0] for d in direct] == [sizes["a"], block(sizes["b"]), sizes["f"]]
    assert all(offset % 4096 == 0 for _, offset in direct)
    monkeypatch.setattr(writer_module, "DIRECT_BYTES", 2**62)  # nothing direct: every byte through the stage
    _write_shard(tmp_path / "staged.safetensors", tensors)
    assert len(direct) == 3
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "staged.safetensors").read_bytes()
    loaded = load_file(tmp_path / "direct.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in tensors)


def test_a_failed_direct_write_fails_the_shard_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    import os

    from modelfusion.io import writer as writer_module

    real = os.pwrite

    def full(fd, data, offset):
        if len(data) >= 2**20 and not isinstance(data, bytes):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", full)
    tensors = _aligned_and_not()
    with pytest.raises(OutputError, match=r"direct.safetensors.partial: cannot (write tensor|commit).*No space left"):
        _write_shard(tmp_path / "direct.safetensors", tensors, lambda name: None)
    assert list(tmp_path.iterdir()) == []
