"""Write docs/api.md from the public names' signatures and docstrings, so the reference cannot drift from the code.

    python scripts/api_reference.py           # rewrite docs/api.md
    python scripts/api_reference.py --check   # exit 1 when docs/api.md differs from what the code says

tests/test_api_reference.py runs the check. To change the reference, change the docstring.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "api.md"
if str(ROOT) not in sys.path:  # this checkout's mlnb, whatever else is installed
    sys.path.insert(0, str(ROOT))

INTRO = """\
# API reference

Generated from the code's signatures and docstrings by `python scripts/api_reference.py` (a test fails when this
page and the code differ). `import mlnb` is light: each name below imports its module (and torch, diffusers,
ipywidgets where needed) on first access. Sizes are in bytes unless a name says otherwise; `None` means not
available (no GPU, NVML missing) and prints as `N/A`. The magics and console commands are in the
[user guide](user_guide.md); what each bad input prints is in [failures](failures.md).
"""

# (section title, [(dotted name as the user writes it, module that defines it, attribute)])
SECTIONS: list[tuple[str, list[str]]] = [
    ("Levels and configuration", [
        "mlnb.OptimizationLevel", "mlnb.Technique", "mlnb.MemoryOptimizationConfig", "mlnb.MemorySetting",
        "mlnb.choose_level",
    ]),
    ("The optimizer", ["mlnb.MemoryOptimizer", "mlnb.OptimizationReport", "mlnb.TechniqueResult"]),
    ("Measuring memory", ["mlnb.MemoryMonitor", "mlnb.MemoryReport"]),
    ("Pipelines", [
        "mlnb.load_pipeline", "mlnb.ManagedPipeline", "mlnb.GenerationResult", "mlnb.last_result", "mlnb.unload_all",
    ]),
    ("The dashboard", ["mlnb.dashboard"]),
    ("Devices", ["mlnb.get_device", "mlnb.DeviceInfo"]),
    ("Testing helpers", ["mlnb.testing.tiny_pipeline", "mlnb.testing.default_tiny_model", "mlnb.testing.FakeDevice"]),
    ("Errors", ["mlnb.errors"]),
]


def _resolve(dotted: str):
    """The object a user reaches as ``dotted`` (``mlnb.load_pipeline``, ``mlnb.testing.tiny_pipeline``)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _doc(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip()


def _value(value) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    return repr(value)


def _annotation(annotation) -> str:
    """``'int | None'`` (a string under ``from __future__ import annotations``) as written: ``int | None``."""
    return inspect.formatannotation(annotation).strip("'\"")


# Classes made by a factory (``load_pipeline``), whose constructor is not for users.
FACTORY_MADE = {"mlnb.ManagedPipeline"}


def _signature(obj, drop_first: bool = False) -> str:
    """The signature as the code spells it: annotations unquoted, ``self``/``cls`` left out, enum defaults by name."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    params = list(sig.parameters.values())
    if drop_first and params:
        params = params[1:]
    parts, starred = [], False
    for param in params:
        if param.kind is param.KEYWORD_ONLY and not starred:
            parts.append("*")
            starred = True
        prefix = {param.VAR_POSITIONAL: "*", param.VAR_KEYWORD: "**"}.get(param.kind, "")
        starred = starred or param.kind is param.VAR_POSITIONAL
        text = prefix + param.name
        if param.annotation is not param.empty:
            text += f": {_annotation(param.annotation)}"
        if param.default is not param.empty:
            text += (" = " if param.annotation is not param.empty else "=") + _value(param.default)
        parts.append(text)
        if param.kind is param.POSITIONAL_ONLY and (len(parts) == len(params) or
                                                    params[len(parts)].kind is not param.POSITIONAL_ONLY):
            parts.append("/")
    ret = ""
    if sig.return_annotation is not sig.empty and sig.return_annotation not in ("None", None):
        ret = f" -> {_annotation(sig.return_annotation)}"
    return f"({', '.join(parts)}){ret}"


def _is_public_member(name: str, value) -> bool:
    return not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, (property, classmethod,
                                                                                       staticmethod)))


def _class_block(dotted: str, cls) -> list[str]:
    bases = [b.__name__ for b in cls.__bases__ if b is not object]
    head = f"class {cls.__name__}({', '.join(bases)})" if bases else f"class {cls.__name__}"
    lines = [f"### `{dotted}`", "", "```python"]
    if dataclasses.is_dataclass(cls):
        frozen = cls.__dataclass_params__.frozen
        lines.append(f"@dataclass{'(frozen=True)' if frozen else ''}")
        lines.append(f"{head}:")
        for field in dataclasses.fields(cls):
            if field.name.startswith("_"):
                continue
            default = ""
            if field.default is not dataclasses.MISSING:
                default = f" = {_value(field.default)}"
            elif field.default_factory is not dataclasses.MISSING:
                default = f" = {getattr(field.default_factory, '__name__', 'factory')}()"
            lines.append(f"    {field.name}: {field.type}{default}")
    elif issubclass(cls, enum.Enum):
        lines.append(f"{head}:")
        for member in cls:
            lines.append(f"    {member.name} = {member.value!r}")
    elif dotted in FACTORY_MADE:
        lines.append(f"{head}: ...")
    else:
        lines.append(f"{head}:")
        lines.append(f"    def __init__{_signature(cls.__init__, drop_first=True)}")
    lines += ["```", ""]
    if _doc(cls):
        lines += [_doc(cls), ""]
    members = [(name, value) for name, value in vars(cls).items() if _is_public_member(name, value)]
    for name, value in members:
        if isinstance(value, property):
            doc = (value.fget.__doc__ or "").strip() if value.fget is not None else ""
            lines.append(f"- `.{name}` (property)" + (f": {inspect.cleandoc(doc)}" if doc else ""))
            continue
        func = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        prefix = f"{cls.__name__}." if isinstance(value, (classmethod, staticmethod)) else "."
        doc = _doc(func)
        drop = not isinstance(value, staticmethod)
        lines.append(f"- `{prefix}{name}{_signature(func, drop_first=drop)}`" + (":" if doc else ""))
        if doc:
            lines += ["", *("  " + line if line else "" for line in doc.splitlines()), ""]
    if members:
        lines.append("")
    return lines


def _function_block(dotted: str, func) -> list[str]:
    lines = [f"### `{dotted}`", "", "```python", f"def {func.__name__}{_signature(func)}", "```", ""]
    if _doc(func):
        lines += [_doc(func), ""]
    return lines


def _module_block(dotted: str, module) -> list[str]:
    lines = [_doc(module), ""] if _doc(module) else []
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name)
        if inspect.isclass(obj):
            bases = ", ".join(b.__name__ for b in obj.__bases__)
            lines.append(f"- `{dotted}.{name}({bases})`" + (f": {_doc(obj)}" if _doc(obj) else ""))
    return lines + [""]


def render() -> str:
    out = [INTRO]
    for title, names in SECTIONS:
        out += [f"## {title}", ""]
        for dotted in names:
            obj = _resolve(dotted)
            if inspect.ismodule(obj):
                out += _module_block(dotted, obj)
            elif inspect.isclass(obj):
                out += _class_block(dotted, obj)
            else:
                out += _function_block(dotted, obj)
    text = "\n".join(out)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET.relative_to(ROOT)} differs from the code: run python scripts/api_reference.py")
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
