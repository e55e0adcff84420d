"""``import mlnb`` stays light: torch, diffusers, transformers and ipywidgets load only when first needed."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "ipywidgets", "accelerate", "PIL", "numpy")


def _imported_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; return which heavy modules it imported."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_mlnb_imports_no_heavy_library():
    """A bare ``import mlnb`` leaves torch, diffusers, transformers and ipywidgets unimported."""
    assert _imported_after("import mlnb") == []


def test_pure_layers_and_lazy_names_stay_light():
    """The pure layers (units, levels, errors, device) and the lazily exported level names import no heavy
    library either; ``choose_level`` runs without torch."""
    code = (
        "import mlnb, mlnb.units, mlnb.levels, mlnb.errors, mlnb.device\n"
        "mlnb.OptimizationLevel, mlnb.MemoryOptimizationConfig.from_level('ultra')\n"
        "assert mlnb.choose_level(4 * 10**9).level.value == 'ultra'"
    )
    assert _imported_after(code) == []


def test_the_probe_does_see_heavy_imports():
    """The check itself works: the first call that needs torch does import it."""
    assert "torch" in _imported_after("import mlnb.pipeline.files as m\nm.parse_dtype('fp16')")
