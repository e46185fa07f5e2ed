"""The house has no import circles: every import inside profuser/ — at module level or inside a
function, which runs later but still ties the two modules together — points one way. An import
under ``if TYPE_CHECKING:`` never runs and is left out."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "profuser"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the profuser modules it imports (``from pkg import name`` counts as importing the
    submodule ``pkg.name`` where there is one, else ``pkg``), and the packages above those, whose
    ``__init__`` runs first (but not the importer's own packages, which are already running)."""
    modules = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a name inside a module
                    target = target.rpartition(".")[0]
                while target and target != name and not name.startswith(target + "."):
                    edges.add(target)
                    target = target.rpartition(".")[0]
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def test_profuser_has_no_import_cycle():
    found = cycle(import_graph())
    assert found is None, "import cycle: " + " -> ".join(reversed(found))


def test_the_walker_sees_function_level_imports_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "profuser"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n"
                              "def f():\n    from .stages.b import g\n")
    (pkg / "stages" / "b.py").write_text("from ..a import f\n")
    (pkg / "c.py").write_text("import profuser.a\n")
    graph = import_graph(pkg)
    assert graph["profuser.a"] == {"profuser.stages.b", "profuser.stages"}
    assert graph["profuser.c"] == {"profuser.a"}
    assert graph["profuser.stages.b"] == {"profuser.a"}
    assert set(cycle(graph)) == {"profuser.a", "profuser.stages.b"}


@pytest.mark.parametrize("pair", [("profuser.workers", "profuser.pipeline"), ("profuser.recipe", "profuser.stages.merge")])
def test_the_seams_named_in_the_architecture_hold(pair):
    graph = import_graph()
    importer, imported = pair
    assert imported not in graph[importer], f"{importer} imports {imported}"
