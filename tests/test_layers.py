"""The pipeline and session layers as the design draws them, read from the source (no import runs): no import
cycle, dependencies pointing down, and no module reading another object's private state."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mlnb"
CHECKED = ("mlnb.setting", "mlnb.pipeline", "mlnb.session")
# What each checked layer must not import: the layers above it.
ABOVE = {
    "mlnb.setting": ("mlnb.pipeline", "mlnb.session", "mlnb.ipython", "mlnb.widgets", "mlnb.cli", "mlnb.optimizer",
                     "mlnb.monitor", "mlnb.device"),
    "mlnb.pipeline": ("mlnb.session", "mlnb.ipython", "mlnb.widgets", "mlnb.cli"),
    "mlnb.session": ("mlnb.ipython", "mlnb.widgets", "mlnb.cli"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The mlnb modules ``name`` imports when it runs, anywhere in it (a function's lazy import counts too; what
    only a type checker reads, under ``if TYPE_CHECKING:``, does not)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from .cache import add` imports mlnb.pipeline.cache
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _in_checked(name: str) -> bool:
    return any(name == layer or name.startswith(layer + ".") for layer in CHECKED)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items() if _in_checked(name)}


def test_no_import_cycle_through_the_pipeline_and_session_modules(graph):
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        """A cycle through ``name``'s imports, or None; each module is walked once."""
        for target in sorted(graph.get(name, ())):
            if target in path:
                return path[path.index(target):] + [target]
            if target in graph and target not in done:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        done.add(name)
        return None

    for start in sorted(graph):
        cycle = visit(start, [start])
        assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("layer", sorted(ABOVE))
def test_dependencies_point_down(graph, layer):
    upward = sorted((name, target) for name, targets in graph.items() if name == layer or name.startswith(layer + ".")
                    for target in targets if any(target == up or target.startswith(up + ".") for up in ABOVE[layer]))
    assert not upward, upward


def test_no_module_reads_another_object_s_private_state():
    """``managed._generating`` from the cache was how room-making asked whether a pipeline was busy: a module uses
    another object's public methods (``busy``, ``hold``) and attributes, and its own private names only."""
    found = []
    for name, path in sorted(_modules().items()):
        if not _in_checked(name):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{name}:{node.lineno} .{node.attr}")
    assert not found, found
