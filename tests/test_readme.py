"""The README's quick start must run as written and compute what its comments say."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quick_start_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "no python block in README"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    models = scope["models"]
    torch.testing.assert_close(scope["reference"], scope["mix"], rtol=1.6e-2, atol=1e-5)
    assert scope["soup"].shape == models[0].shape and scope["fisher"].dtype == torch.bfloat16


def test_alignment_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "fk.permute(" in b]
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    w, p_out, p_in = scope["w"], scope["p_out"], scope["p_in"]
    assert torch.equal(scope["w2"], w[p_out][:, p_in])
    assert torch.equal(scope["state2"]["fc2.weight"], scope["state"]["fc2.weight"][:, p_out])
    assert sorted(scope["perm_next"].tolist()) == list(range(64))
    torch.testing.assert_close(scope["soft"].sum(0), torch.ones(64), rtol=1e-4, atol=1e-4)
    assert bool((scope["res"].error <= 1e-6).all())
