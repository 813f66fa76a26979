"""The package layers hold: kernels <- fwpkm <- lit <- ablations. Nothing imports upward, no module
imports another's private names, and the project's modules import each other without a cycle
(function-level imports included: a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["kernels", "fwpkm", "lit", "ablations"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def imports_of(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement of the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def resolve(target: str, names: list[str], modules: dict) -> list[str]:
    """The project modules an import statement depends on (``from pkg import submodule`` counts)."""
    out = [target] if target in modules else []
    out += [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
    return out


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    edges = {}
    for name, path in modules.items():
        edges[name] = {dep for target, names in imports_of(name, path) for dep in resolve(target, names, modules)
                       if dep != name}
    return edges


@pytest.mark.parametrize("layer", LAYERS)
def test_no_module_imports_a_higher_layer(layer):
    higher = LAYERS[LAYERS.index(layer) + 1:]
    bad = [(name, dep) for name, deps in graph().items() if name.split(".")[0] == layer
           for dep in deps if dep.split(".")[0] in higher]
    assert not bad, f"{layer} imports from a higher layer: {bad}"


def test_no_module_imports_private_names_of_another():
    modules = project_modules()
    bad = []
    for name, path in modules.items():
        for target, names in imports_of(name, path):
            if target.split(".")[0] in LAYERS and target != name:
                bad += [(name, f"{target}.{n}") for n in names if n.startswith("_") and not n.startswith("__")]
                bad += [(name, target)] if any(p.startswith("_") and not p.startswith("__")
                                               for p in target.split(".")) else []
    assert not bad, f"imports of private names: {bad}"


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"
