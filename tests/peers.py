"""Load the peer libraries' merge code for parity tests, or skip with the install command.

Both are installed with ``--no-deps`` (their pins would pull another torch). PEFT's ``merge_utils``
needs only torch, so it is loaded from its file without running ``peft/__init__`` (which imports
transformers); mergekit's merge methods import only torch and pydantic.
"""

import importlib.util
from pathlib import Path

import pytest

PEFT_VERSION, MERGEKIT_VERSION = "0.21.2", "0.1.5"
INSTALL = f"pip install --no-deps peft=={PEFT_VERSION} mergekit=={MERGEKIT_VERSION}"


def peft_merge_utils():
    spec = importlib.util.find_spec("peft")
    if spec is None:
        pytest.skip(f"peft is not installed: {INSTALL}")
    path = Path(spec.submodule_search_locations[0]) / "utils" / "merge_utils.py"
    module_spec = importlib.util.spec_from_file_location("_peft_merge_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def mergekit_gta():
    if importlib.util.find_spec("mergekit") is None:
        pytest.skip(f"mergekit is not installed: {INSTALL}")
    from mergekit.merge_methods import generalized_task_arithmetic as gta
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.sparsify import SparsificationMethod

    return gta, TensorGroup, SparsificationMethod


def run_mergekit(recipe: str, out: Path) -> None:
    """mergekit's own ``run_merge`` on a recipe's YAML, writing to ``out``."""
    if importlib.util.find_spec("mergekit") is None or importlib.util.find_spec("transformers") is None:
        pytest.skip(f"mergekit's run_merge needs mergekit and transformers: {INSTALL}")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe))
    run_merge(config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))


def merged_by_both(recipe: str, root: Path) -> tuple[dict, dict]:
    """(ours, mergekit's) output tensors of one recipe, after checking both wrote the same names
    and dtypes."""
    from helpers import tensors_of
    from modelfusion.pipeline import merge

    run_mergekit(recipe, root / "mergekit")
    merge(recipe, root / "ours", progress=False)
    theirs, ours = tensors_of(root / "mergekit"), tensors_of(root / "ours")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
    return ours, theirs
