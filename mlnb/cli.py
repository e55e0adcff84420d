"""The ``mlnb`` console script: ``mlnb demo``, ``mlnb doctor``, ``mlnb bench``."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import shlex
import sys
from pathlib import Path

__all__ = ["main", "doctor_report"]


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return "not installed"
    except Exception as exc:  # e.g. an xformers built for another torch raises on import
        return f"broken ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return str(getattr(mod, "__version__", "installed"))


def _torch_row() -> str:
    """``2.11.0+cu130 (CUDA 13.0)``, ``2.13.0+cpu (CPU build, no CUDA)``, or why torch is not there."""
    version = _version("torch")
    try:
        import torch

        cuda, hip = torch.version.cuda, getattr(torch.version, "hip", None)
    except Exception:  # not installed, or broken: _version says which
        return version
    if cuda:
        return f"{version} (CUDA {cuda})"
    return f"{version} (ROCm {hip})" if hip else f"{version} (CPU build, no CUDA)"


def doctor_report() -> list[tuple[str, str]]:
    """``(what, value)`` rows about the environment, then ``("warning", ...)`` rows for known-bad combinations."""
    from importlib import metadata

    rows = [("python", platform.python_version()), ("platform", platform.platform())]
    rows.append(("torch", _torch_row()))
    for name in ("diffusers", "transformers", "accelerate", "safetensors", "xformers", "IPython", "ipykernel", "ipywidgets", "tqdm"):
        rows.append((name, _version(name)))
    try:
        rows.append(("nvidia-ml-py", metadata.version("nvidia-ml-py")))
    except metadata.PackageNotFoundError:
        rows.append(("nvidia-ml-py", "not installed"))

    from .device import get_device
    from .session import memory_rows

    info = get_device().info()
    if info.available:
        cc = ".".join(map(str, info.compute_capability)) if info.compute_capability else "N/A"
        bf16 = "in hardware" if info.native_bf16 else ("emulated" if info.supports_bf16 else "no")
        rows.append(("GPU", f"{info.name}, compute capability {cc}, bf16 {bf16}"))
        rows.append(("SDXL VAE decode", "bf16 (no fp32 upcast)" if info.native_bf16 else "fp32 (diffusers' upcast)"))
        rows.append(("fp8 storage", "yes (float8_e4m3fn)" if info.supports_fp8 else "no: this torch has no float8_e4m3fn"))
        rows.append(("driver", info.driver_version or f"N/A ({info.nvml_error})"))
    else:
        rows.append(("GPU", "none (CPU only)"))
    rows += memory_rows(info)
    from .planner import describe_card

    rows.append(("planner facts", describe_card(get_device())))
    rows += [("warning", w) for w in _known_bad(rows)]
    return rows


def _known_bad(rows: list[tuple[str, str]]) -> list[str]:
    values = dict(rows)
    warnings = []
    xformers = values.get("xformers", "")
    if xformers.startswith("broken"):
        warnings.append(f"xformers fails to import ({xformers}); it is probably built for another torch. mlnb uses SDPA.")
    elif xformers not in ("not installed", ""):
        from importlib import metadata

        from packaging.requirements import InvalidRequirement, Requirement
        from packaging.version import InvalidVersion, Version

        try:
            torch_version = Version(values.get("torch", "").split(" ")[0])
            requires = [Requirement(r) for r in metadata.requires("xformers") or []]
        except (InvalidVersion, InvalidRequirement, metadata.PackageNotFoundError):
            requires = []
        for req in requires:
            applies = req.marker is None or req.marker.evaluate({"extra": ""})
            if req.name == "torch" and applies and not req.specifier.contains(torch_version, prereleases=True):
                warnings.append(f"xformers {xformers} was built for torch {req.specifier}, this is torch {torch_version}")
    try:
        import diffusers
        from packaging.version import Version

        if Version(diffusers.__version__) < Version("0.39"):
            warnings.append(f"diffusers {diffusers.__version__} is older than 0.39, the oldest mlnb supports")
    except Exception as exc:
        warnings.append(f"diffusers is missing or broken ({type(exc).__name__}: {exc})")
    return warnings


def _doctor(args) -> int:
    rows = doctor_report()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _demo(args) -> int:
    # transformers' advisories (e.g. that torchvision is missing, which generation does not need) are not the demo's
    # subject; its errors still show. Read when transformers is first imported, below.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    out = Path(args.out).expanduser()
    if os.path.lexists(out) and not out.is_dir():
        return _demo_error(f"--out {str(out)!r} is a file, not a folder: give a folder for the PNG")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file on the way, no permission
        return _demo_error(f"--out: cannot create the folder {str(out)!r}: {exc.strerror or exc}")
    from IPython.core.error import UsageError
    from IPython.testing.globalipapp import start_ipython

    from .pipeline.saving import save_images
    from .tiny import default_tiny_model

    model = args.model or str(default_tiny_model("sd"))
    shell = start_ipython()
    shell.run_line_magic("load_ext", "mlnb")
    # The line is read as a shell reads it (a model folder may have spaces); the body's braces are the prompt's own.
    cell = (f"--model {shlex.quote(model)} --steps {args.steps} --width {args.size} --height {args.size} "
            f"--seed {args.seed} --out demo_result")
    try:
        shell.run_cell_magic("generate", cell, args.prompt.replace("{", "{{").replace("}", "}}"))
    except UsageError as exc:  # a bad option or model: one line, as in a notebook
        return _demo_error(str(exc))
    result = shell.user_ns["demo_result"]
    try:  # mlnb-<seed>-<i>.png, or the first free name beside it, as --save names them in a folder
        paths = save_images(result.images, out, result.seed)
    except OSError as exc:
        return _demo_error(f"--out: cannot save the image in {str(out)!r}: {exc.strerror or exc}")
    print(shell.run_line_magic("vram", ""))
    print(f"saved {', '.join(str(p) for p in paths)}")
    print(result.report_line())
    return 0


def _demo_error(message: str) -> int:
    print(f"mlnb demo: error: {message}", file=sys.stderr)
    return 2


def _bench(argv: list[str]) -> int:
    from .bench import main as bench_main

    return bench_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    parser = argparse.ArgumentParser(prog="mlnb", description="Diffusion models on small GPUs, from a notebook.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate an image with the embedded tiny model (or --model) in an IPython shell")
    demo.add_argument("--model", help="hub id or local diffusers folder (default: the embedded tiny model)")
    demo.add_argument("--prompt", default="a watercolor fox in a snowy forest")
    demo.add_argument("--steps", type=int, default=4)
    demo.add_argument("--size", type=int, default=64, help="width and height in pixels (multiple of 8)")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--out", default=os.environ.get("MLNB_DEMO_OUT", "mlnb-demo"),
                      help="folder for the PNG (created; an existing file there is never replaced)")
    demo.set_defaults(func=_demo)
    doctor = sub.add_parser("doctor", help="versions, GPU, driver, and known-bad combinations")
    doctor.set_defaults(func=_doctor)
    sub.add_parser("bench", help="benchmark levels against plain diffusers (see mlnb bench --help)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
