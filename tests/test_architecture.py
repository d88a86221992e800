"""The package's layers: every import of a loralab module points down (or within its own subpackage),
and no two modules import each other, directly or round a longer loop. Imports inside functions
count too: a lazy import may defer a heavy third-party library, never hide a cycle. Imports under
`if __name__ == "__main__":` do not: that block is a script entry point, not a dependency."""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"

# Lower layers know nothing of higher ones. Subpackages on one layer do not import each other.
LAYERS = {
    "util": 0,
    "config": 1,
    "data": 2, "adapters": 2,
    "model_utils": 3,
    "metrics": 4,
    "training": 5,
    "data_preparation": 6, "fine_tune_lora": 6, "evaluation": 6, "pipeline": 6,  # the spec's entry points
    "studies": 7, "deploy": 7,
    "prune": 8,  # measures through studies' runner and deploy's speed and GGUF code
    "ui": 8,  # the dashboard: reads what training, studies and data write; mounts deploy's serving app
    "audit": 8,  # `loralab provenance`: reads every committed result and git; imports no other layer but util
    "cli": 9, "__main__": 10, "__init__": 10,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(path_root(path)).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(["loralab", *parts])


def path_root(path: Path) -> Path:
    return next(parent for parent in path.parents if parent.name == "src")


def top(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _is_main_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__")


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """loralab modules `path` imports, resolved to module names (a `from pkg import module` counts as the module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_main_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("loralab"))
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; use absolute loralab.* imports"
            if node.module and node.module.startswith("loralab"):
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    found.add(candidate if candidate in known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found - {"loralab"}


def graph() -> dict[str, set[str]]:
    return _graph(SRC)


@functools.cache
def _graph(src: Path) -> dict[str, set[str]]:
    known = {module_name(p) for p in src.rglob("*.py")}
    return {module_name(p): imported_modules(p, known) for p in src.rglob("*.py")}


def test_every_module_has_a_layer():
    unknown = {top(m) for m in graph()} - set(LAYERS)
    assert not unknown, f"add {sorted(unknown)} to LAYERS in tests/test_architecture.py"


@pytest.mark.parametrize("module", sorted(graph()))
def test_imports_point_down(module):
    mine = top(module)
    for target in graph()[module]:
        theirs = top(target)
        if theirs == mine:
            continue
        assert LAYERS[theirs] < LAYERS[mine], (
            f"{module} (layer {mine}={LAYERS[mine]}) imports {target} (layer {theirs}={LAYERS[theirs]}): "
            f"a module may import only from lower layers"
        )


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt in edges and not state.get(nxt):
                walk(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if not state.get(start):
            walk(start, [start])


def test_the_guard_catches_an_upward_import(tmp_path, monkeypatch):
    """The checks above are only worth something if they can fail."""
    fake = tmp_path / "src"
    (fake / "util").mkdir(parents=True)
    (fake / "util" / "__init__.py").write_text("")
    (fake / "util" / "bad.py").write_text("def f():\n    from loralab.cli import main\n")
    (fake / "cli.py").write_text("from loralab.util import bad\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    edges = graph()
    assert edges["loralab.util.bad"] == {"loralab.cli"}
    with pytest.raises(AssertionError, match="only from lower layers"):
        test_imports_point_down("loralab.util.bad")
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()
