"""The package layout is the architecture: stages import only the stages below them, no cycles.

Every ``import`` inside ``finetune/`` is read from the source (imports inside functions
included; ``if TYPE_CHECKING:`` blocks excluded, as they never run), so a cycle fails here
even when it is hidden in a function that no other test calls.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

import finetune

PACKAGE = Path(finetune.__file__).parent

# The stages, lowest first: a module may import its own stage and those before it, never one
# after it. The root package (``finetune.__version__``) and ``__main__`` stand outside.
LAYERS = (
    ("errors", "files"),
    ("config",),
    ("recipes",),
    ("data",),
    ("model",),
    ("run",),
    ("training",),
    ("strategies",),
    ("inference",),
    ("reporting",),
    ("log",),
    ("pipeline",),
    ("tuning",),
    ("cli",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The ``finetune`` modules that running this tree imports."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "finetune")
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] == "finetune"
        ):
            for alias in node.names:  # `from finetune.data import scan` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports."""
    files = {module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    return {
        name: _imports(ast.parse(path.read_text(encoding="utf-8")), set(files)) - {name}
        for name, path in files.items()
    }


@functools.cache
def package_graph() -> dict[str, frozenset[str]]:
    """finetune's own import graph, parsed once for every test of this module."""
    return {name: frozenset(targets) for name, targets in import_graph().items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start)):
            return cycle
    return None


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__main__" else None


def test_no_import_cycle_inside_the_package() -> None:
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    pkg = tmp_path / "finetune"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "scan.py").write_text("from finetune.model import backbone\n")
    (pkg / "model").mkdir()
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "model" / "backbone.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from finetune.pipeline import fit\n"
        "def f():\n    from finetune.data.scan import x\n"
    )
    (pkg / "pipeline.py").write_text("from finetune.model.backbone import f\n")
    graph = import_graph(pkg)
    assert graph["finetune.model.backbone"] == {"finetune.data.scan"}  # TYPE_CHECKING: skipped
    assert find_cycle(graph) == [
        "finetune.data.scan",
        "finetune.model.backbone",
        "finetune.data.scan",
    ]


def test_every_stage_is_in_a_layer() -> None:
    stages = {s for m in package_graph() if (s := _stage(m))}
    assert stages <= set(RANK), f"add {sorted(stages - set(RANK))} to LAYERS"


@pytest.mark.parametrize("module", sorted(package_graph()))
def test_imports_point_down(module: str) -> None:
    """A stage imports only itself and the stages below it (timm's data/ never imports models/)."""
    own = _stage(module)
    if own is None:
        return
    upward = sorted(
        target
        for target in package_graph()[module]
        if (stage := _stage(target)) is not None and RANK[stage] > RANK[own]
    )
    assert not upward, f"{module} ({own}) imports later stages: {upward}"


def test_no_stage_shadows_a_public_name() -> None:
    """A submodule named like a function of ``finetune/__init__.py`` would replace that function
    on the package once imported (``finetune.report`` the module, not the function)."""
    top = {p.stem for p in PACKAGE.glob("*.py")} | {
        p.parent.name for p in PACKAGE.glob("*/__init__.py")
    }
    assert not top & set(finetune.__all__), sorted(top & set(finetune.__all__))
