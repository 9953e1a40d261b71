"""The dependency rule of docs/architecture.md, checked on the source: arrows point down only.

Read from the files' import statements (no import runs), so a broken rule fails here before it
shows up as a cycle at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = {"fusion_kernels": ROOT / "fusion_kernels", "modelfusion": ROOT / "python" / "modelfusion"}

# modelfusion's layers, bottom first: a module may import its own layer or lower ones only.
LAYERS = [
    {"modelfusion", "modelfusion.errors", "modelfusion.ranks"},
    {"modelfusion.io"},
    {"modelfusion.average", "modelfusion.align", "modelfusion.connect", "modelfusion.ensemble"},
    {"modelfusion.pipeline"},
    {"modelfusion.integrations", "modelfusion.demos", "modelfusion.cli", "modelfusion.__main__"},
]


def _modules() -> dict[str, Path]:
    found = {}
    for package, root in PACKAGE_ROOTS.items():
        for path in root.rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()
COMPILED = {"fusion_kernels._C", "fusion_kernels._C_cuda"}  # extension modules, built from csrc/


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [a.name for a in node.names]
            # `from pkg import module` imports the module pkg.module
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES.keys() | COMPILED]
            taken = [n for n in names if f"{base}.{n}" not in subs]
            if taken or not subs:
                out.append((base, taken, node.lineno))
            out += [(s, [], node.lineno) for s in subs]
    return out


def _layer(module: str) -> int:
    for depth, layer in enumerate(LAYERS):
        for owner in layer:
            if module == owner or (owner != "modelfusion" and module.startswith(owner + ".")):
                return depth
    raise AssertionError(f"{module} sits in no layer of docs/architecture.md")


def _ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGE_ROOTS


def test_every_modelfusion_module_has_a_layer():
    for name in MODULES:
        if name.startswith("modelfusion"):
            _layer(name)


def test_the_engine_never_imports_modelfusion():
    bad = [
        f"{name}:{line} imports {target}"
        for name, path in MODULES.items()
        if name.startswith("fusion_kernels")
        for target, _, line in _imports(name, path)
        if target.split(".")[0] == "modelfusion"
    ]
    assert not bad, bad


def test_modelfusion_imports_point_down_only():
    bad = []
    for name, path in MODULES.items():
        if not name.startswith("modelfusion"):
            continue
        for target, _, line in _imports(name, path):
            if target.startswith("modelfusion") and _layer(target) > _layer(name):
                bad.append(f"{name}:{line} imports {target}, a higher layer")
    assert not bad, bad


def test_no_private_name_crosses_a_module():
    bad = []
    for name, path in MODULES.items():
        for target, names, line in _imports(name, path):
            if not _ours(target):
                continue
            leaf = target.rpartition(".")[2]
            crossing_package = target.split(".")[0] != name.split(".")[0]
            if leaf.startswith("_") and not leaf.startswith("__") and crossing_package:
                bad.append(f"{name}:{line} imports the private module {target}")
            bad += [f"{name}:{line} takes {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    # inside the engine, private modules (_validate, _dispatch, ...) are shared by its own layers
    assert not bad, bad


def test_no_import_cycle():
    # a module's own ancestor packages are initialised before it, so those edges are no cycle
    graph = {
        name: {t for t, _, _ in _imports(name, path) if t in MODULES and not (name + ".").startswith(t + ".")}
        for name, path in MODULES.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, path)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_checker_sees_a_violation(tmp_path):
    """The rule can fail: an upward import in a made-up module is found."""
    fake = tmp_path / "task_vectors.py"
    fake.write_text("from ..pipeline.plan import Plan\nfrom .state import _private\n")
    imports = _imports("modelfusion.average.task_vectors", fake)
    assert ("modelfusion.pipeline.plan", ["Plan"], 1) in imports
    assert _layer("modelfusion.pipeline.plan") > _layer("modelfusion.average.task_vectors")
    assert ("modelfusion.average.state", ["_private"], 2) in imports
