"""The package's layers (DESIGN "The flow"): each module imports only from its own layer or the
layers below, nothing imports the CLI, and no modules import each other in a circle.

Read from the source with ``ast`` (imports inside functions count: they are dependencies too);
the project's own modules only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Bottom to top. A module belongs to the first entry that is it or a package above it.
LAYERS: list[tuple[str, ...]] = [
    ("instbank.errors", "instbank.types", "instbank.version"),
    ("instbank.formats",),
    ("instbank.crops",),
    ("instbank.storage",),
    ("instbank.engines", "instbank.build"),
    ("instbank.sampling",),
    ("instbank.paste",),
    ("instbank.integrations", "instbank.stats", "instbank.preview", "instbank.plots", "instbank.paste_demo",
     "instbank.testing", "instbank.progress"),
    ("instbank.cli",),
    ("instbank",),  # the package face: open_bank and the exceptions, imported by users only
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Project modules imported anywhere in ``path`` (``from a import b`` counts ``a.b`` when that
    is a module, else ``a``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m == "instbank" or m.startswith("instbank.")}


MODULES = {module_name(p): p for p in (SRC / "instbank").rglob("*.py")}
GRAPH = {name: imported_modules(path) - {name} for name, path in MODULES.items()}


def layer_of(module: str) -> int:
    for rank, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_from_its_layer_or_below(module):
    upward = sorted(dep for dep in GRAPH[module] if layer_of(dep) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports higher layers: {upward}"


def test_nothing_imports_the_cli():
    assert [m for m, deps in GRAPH.items() if "instbank.cli" in deps] == []


def test_no_circle_of_imports():
    # A package's __init__ re-exporting its submodules is the package's face, not a dependency of
    # theirs: a submodule importing its own package's __init__ would close a circle and is caught.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(GRAPH.get(module, ())):
            if state.get(dep) == 1:
                circle = stack[stack.index(dep):] + [dep]
                raise AssertionError("circle of imports: " + " -> ".join(circle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_the_checker_sees_imports_inside_functions():
    # build.py imports the engines registry; engines/ray.py imports shard at module level; the
    # CLI imports build lazily inside a command: all three must be edges.
    assert "instbank.engines" in GRAPH["instbank.build"]
    assert "instbank.engines.shard" in GRAPH["instbank.engines.ray"]
    assert "instbank.build" in GRAPH["instbank.cli"]
