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


def test_mlnb_testing_imports_lazily():
    """``mlnb.testing`` is reached lazily from ``mlnb`` and imports no heavy library itself; the fake device, which
    needs torch, loads when first asked for."""
    assert _imported_after("import mlnb\nmlnb.testing.tiny_pipeline, mlnb.testing.TINY_KINDS") == []
    assert "torch" in _imported_after("from mlnb.testing import FakeDevice\nassert FakeDevice().is_cuda is False")


def test_the_probe_does_see_heavy_imports():
    """The check itself works: the first call that needs torch does import it."""
    assert "torch" in _imported_after("import mlnb.pipeline.files as m\nm.parse_dtype('fp16')")


def test_the_planner_imports_light_and_its_cost_model_and_search_run_without_torch():
    """The planner's pure part (its cost model and placement search) needs no torch: a plan for model facts given
    by hand, and its prediction at another size, import no heavy library; neither does the package itself."""
    code = (
        "import mlnb.planner\n"
        "from mlnb.planner import Block, CardFacts, ModelFacts, Workload, plan_for_budget, predict\n"
        "facts = ModelFacts({'text_encoder': 2**28}, 2**27, tuple(Block(f'b{i}', 2**26) for i in range(20)), 2**27)\n"
        "plan = plan_for_budget(2**31, facts, work=Workload(512, 512))\n"
        "assert plan.strategy == 'stream' and plan.streamed\n"
        "assert predict(plan, facts, CardFacts(), Workload(256, 256))[0] > 0"
    )
    assert _imported_after(code) == []
