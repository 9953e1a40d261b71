"""The README and every docs/ page: their Python blocks run as written and compute what their
comments say; a block marked ``<!-- setup: NAME -->`` (it needs models, data or a peer's config)
runs in the scope tests/docs_setup.py's ``NAME`` makes, in a temporary directory. The generated
benchmark tables must match their JSON."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, assert_peer_close

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- setup: (\w+) -->\n)?```python\n(.*?)```", re.S)


def _blocks(page: Path) -> list[tuple[str, str | None]]:
    """(code, setup name or None) of each Python block."""
    return [(m.group(2), m.group(1)) for m in BLOCK.finditer(page.read_text())]


def _run(code: str, where: str, scope: dict | None = None) -> dict:
    scope = {} if scope is None else scope
    exec(compile(code, where, "exec"), scope)
    return scope


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_block_runs(page, tmp_path, monkeypatch):
    import docs_setup

    for i, (code, setup) in enumerate(_blocks(page)):
        where = f"{page.name} block {i}"
        if setup is None:
            _run(code, where)
            continue
        monkeypatch.chdir(tmp_path)
        with getattr(docs_setup, setup)(tmp_path) as scope:
            scope = _run(code, where, scope)
            check = getattr(docs_setup, f"check_{setup}", None)
            if check is not None:
                check(scope)


def test_readme_quick_start_computes_what_it_says():
    code, _ = _blocks(ROOT / "README.md")[0]
    scope = _run(code, "README.md")
    models = scope["models"]
    assert_close(scope["reference"], scope["mix"])
    assert scope["soup"].shape == models[0].shape and scope["fisher"].dtype == torch.bfloat16
    assert scope["ties"].shape == models[0].shape


def test_alignment_example_computes_what_it_says():
    (code,) = [c for c, _ in _blocks(ROOT / "docs" / "alignment.md") if "fk.permute(" in c]
    scope = _run(code, "alignment.md")
    w, p_out, p_in = scope["w"], scope["p_out"], scope["p_in"]
    assert torch.equal(scope["w2"], w[p_out][:, p_in])
    assert torch.equal(scope["state2"]["fc2.weight"], scope["state"]["fc2.weight"][:, p_out])
    assert sorted(scope["perm_next"].tolist()) == list(range(64))
    assert_peer_close(scope["soft"].sum(0), torch.ones(64), "float32_forward")
    assert bool((scope["res"].error <= 1e-6).all())


def test_readme_stays_a_five_minute_read():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_benchmark_tables_are_generated_from_the_results():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), "--check"], capture_output=True)
    assert run.returncode == 0, run.stderr.decode()


def test_every_docs_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.name for p in PAGES[1:] if p.name not in nav]
    assert not missing, missing
