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
