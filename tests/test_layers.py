"""The package's shape as the design draws it, read from the source (no import runs): no import cycle anywhere in
mlnb, dependencies of the pipeline and session layers pointing down, no module reading another object's private
state, modules of a readable size, and code comments without measurement history (runs, cards and dates live in
docs/benchmarks.md)."""

from __future__ import annotations

import ast
import io
import re
import tokenize
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


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as the path that closes it, or None."""
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
        if cycle:
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_through_the_pipeline_and_session_modules(graph):
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_no_import_cycle_anywhere_in_mlnb():
    modules = _modules()
    whole = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    cycle = _cycle(whole)
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


# Modules allowed past MAX_LINES, each with the reason it stays one module.
MAX_LINES = 500
LONG_MODULES: dict[str, str] = {}


def test_modules_stay_readable_in_size():
    too_long = {name: n for name, path in _modules().items()
                if (n := len(path.read_text().splitlines())) > MAX_LINES and name not in LONG_MODULES}
    assert not too_long, too_long


# Measurement history: dates, numbered runs, commits, "measured on an H100". A card named as a fact about what it
# computes ("bf16 is emulated on a T4") is not history.
_HISTORY = re.compile(
    r"\b20\d\d-\d\d-\d\d\b"
    r"|\bruns? \d+\b"
    r"|\bcommit [0-9a-f]{7,}\b"
    r"|\b(?:measured|timed|took|peaked|ran)\b[^.\n]{0,60}\bon (?:an?|the|one) (?:H100|H200|A100|T4|L4)\b"
    r"|\bon (?:an?|the|one) (?:H100|H200|A100)\b",
    re.IGNORECASE,
)


def _comments_and_docstrings(path: Path) -> list[tuple[int, str]]:
    source = path.read_text()
    found = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found.append((node.body[0].lineno, doc))
    return found


@pytest.mark.parametrize("text", ["took 67 ms a step on an H100", "(run 5, 2026-11-26)", "as in commit 807578c",
                                  "measured on the H200 in the design notes"])
def test_the_history_pattern_catches_history(text):
    assert _HISTORY.search(text)


def test_the_history_pattern_leaves_facts_about_cards_alone():
    assert not _HISTORY.search("on a T4, bf16 is emulated and slow")


def test_no_measurement_history_in_code_comments():
    """The benchmark (mlnb.bench) names the cards and runs it measures on: that is its subject, not history."""
    hits = [f"{name}:{line}: {_HISTORY.search(text)[0]!r}" for name, path in sorted(_modules().items())
            if not name.startswith("mlnb.bench") for line, text in _comments_and_docstrings(path)
            if _HISTORY.search(text)]
    assert not hits, hits
