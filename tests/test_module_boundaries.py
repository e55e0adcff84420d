"""Who may import what: the fake device and the rest of :mod:`mlnb.testing` stay out of the library, and only the
device package reaches ``torch.cuda`` and NVML. Read from the source (``ast``), so a lazy import inside a function
counts as much as one at the top of a module."""

from __future__ import annotations

import ast
from pathlib import Path

import mlnb

ROOT = Path(mlnb.__file__).parent


def _modules(outside: str) -> list[tuple[str, ast.Module]]:
    """``(dotted name, tree)`` of every module of mlnb except those of the subpackage ``outside``."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("mlnb",) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if name == f"mlnb.{outside}" or name.startswith(f"mlnb.{outside}."):
            continue
        found.append((name, ast.parse(path.read_text(), filename=str(path))))
    return found


def _imports(name: str, tree: ast.Module, is_package: bool) -> set[str]:
    """Every module ``name`` imports, relative imports resolved, with ``from x import y`` also counted as ``x.y``
    (``y`` may be a submodule)."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _is_package(name: str) -> bool:
    return (ROOT.parent / name.replace(".", "/") / "__init__.py").exists()


def test_no_library_module_imports_mlnb_testing_or_the_fake_device():
    """The fake GPU and the tiny pipelines of ``mlnb.testing`` are for tests, the notebooks and users; the library
    never imports them (``mlnb.testing`` is reached lazily, by name, from ``mlnb.__getattr__``)."""
    offenders = {
        name: sorted(i for i in _imports(name, tree, _is_package(name)) if i == "mlnb.testing" or
                     i.startswith("mlnb.testing.") or i.endswith("fake_device"))
        for name, tree in _modules(outside="testing")
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_import_walk_sees_relative_and_lazy_imports():
    """The check itself works: a relative import inside a function resolves to the module it names."""
    tree = ast.parse("def f():\n    from ..testing import FakeDevice\n    from . import fake_device\n")
    assert {"mlnb.testing", "mlnb.testing.FakeDevice"} <= _imports("mlnb.bench.worker", tree, False)
    assert "mlnb.device.fake_device" in _imports("mlnb.device", tree, True)


def test_only_the_device_package_reaches_torch_cuda_and_nvml():
    """``torch.cuda`` (imported or used as ``torch.cuda``) and ``pynvml`` appear in mlnb/device/ only."""
    offenders = {}
    for name, tree in _modules(outside="device"):
        found = {i for i in _imports(name, tree, _is_package(name))
                 if i.split(".")[0] == "pynvml" or i == "torch.cuda" or i.startswith("torch.cuda.")}
        found.update("torch.cuda" for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                     and node.attr == "cuda" and isinstance(node.value, ast.Name) and node.value.id == "torch")
        if found:
            offenders[name] = sorted(found)
    assert offenders == {}
