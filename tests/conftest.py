"""Shared fixtures: the suite's own $MLNB_CACHE, tiny pipelines saved to disk once per session, a fake GPU, and the
gpu/browser markers."""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


_own_cache: list[tuple[str | None, str]] = []  # (MLNB_CACHE before the session, the session's folder)


def pytest_configure(config):
    # The suite's own $MLNB_CACHE (the notebooks' kernels inherit it): the card facts one run records never steer the
    # plans of the next run or of another process on the machine, and the user's cache is left alone.
    _own_cache.append((os.environ.get("MLNB_CACHE"), tempfile.mkdtemp(prefix="mlnb-test-cache-")))
    os.environ["MLNB_CACHE"] = _own_cache[-1][1]


def pytest_unconfigure(config):
    if not _own_cache:
        return
    before, folder = _own_cache.pop()
    if before is None:
        os.environ.pop("MLNB_CACHE", None)
    else:
        os.environ["MLNB_CACHE"] = before
    shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    has_cuda = _cuda_available()
    browser = os.environ.get("MLNB_BROWSER_TEST") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_check.sh on a GPU machine)")
    skip_browser = pytest.mark.skip(reason="real-browser test: run by .ci/browser-test (MLNB_BROWSER_TEST=1)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "browser" in item.keywords and not browser:
            item.add_marker(skip_browser)


@pytest.fixture(autouse=True)
def card_facts_of_the_test(tmp_path_factory):
    """Card facts measured during a test go to a cache of its own, never the user's ``~/.cache/mlnb``: a fake CUDA
    card's step times from one run would otherwise time (and so choose) the plans of the next. A test that sets
    ``MLNB_CACHE`` itself overrides this. (Not through ``monkeypatch``, which would then be undone after the test's
    own fixtures' teardown, not before.)"""
    saved = os.environ.get("MLNB_CACHE")
    os.environ["MLNB_CACHE"] = str(tmp_path_factory.mktemp("mlnb-cache"))
    yield
    if saved is None:
        os.environ.pop("MLNB_CACHE", None)
    else:
        os.environ["MLNB_CACHE"] = saved


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_sd(tiny_root):
    """A tiny random-weight StableDiffusionPipeline folder (safetensors)."""
    from mlnb.testing import tiny_pipeline

    return tiny_pipeline("sd", tiny_root / "sd")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_root):
    """A tiny random-weight StableDiffusionXLPipeline folder (safetensors, VAE with force_upcast)."""
    from mlnb.testing import tiny_pipeline

    return tiny_pipeline("sdxl", tiny_root / "sdxl")


@pytest.fixture(scope="session")
def tiny_sd3(tiny_root):
    """A tiny random-weight StableDiffusion3Pipeline folder (MMDiT with a dual-attention block, two CLIPs, T5)."""
    from mlnb.testing import tiny_pipeline

    return tiny_pipeline("sd3", tiny_root / "sd3")


@pytest.fixture(scope="session")
def tiny_flux(tiny_root):
    """A tiny random-weight FluxPipeline folder (double- and single-stream blocks, guidance embedder, CLIP, T5)."""
    from mlnb.testing import tiny_pipeline

    return tiny_pipeline("flux", tiny_root / "flux")


@pytest.fixture(scope="session")
def tiny_sd_pickle(tiny_root):
    """The tiny SD pipeline saved with pickle (.bin) weights only."""
    from mlnb.testing import tiny_pipeline

    return tiny_pipeline("sd", tiny_root / "sd-pickle", pickle=True)


@pytest.fixture
def fake_device():
    """A simulated 4 GiB GPU installed as the current device for the test."""
    from mlnb.device import use_device
    from mlnb.testing import FakeDevice

    with use_device(FakeDevice(total=4 * 2**30)) as device:
        yield device


@pytest.fixture
def clean_cache():
    """Unload every cached pipeline before and after the test."""
    from mlnb.pipeline import unload_all

    unload_all()
    yield
    unload_all()


@pytest.fixture(scope="session", autouse=True)
def frozen_heap(tiny_sdxl, tiny_flux):
    """Import everything a load touches (throwaway loads of a UNet and a transformer pipeline), then move the heap
    (torch, diffusers, transformers: ~400k objects) into the permanent generation for the session, so each full
    ``gc.collect()`` that mlnb's cleanup runs (on every load, unload and error: 0.2 s each with that heap) walks only
    what the tests create."""
    from diffusers import DiffusionPipeline

    for folder in (tiny_sdxl, tiny_flux):
        DiffusionPipeline.from_pretrained(folder)
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def ip():
    """The real IPython shell (``IPython.testing.globalipapp``) with mlnb loaded for the module."""
    from IPython import get_ipython
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython() or get_ipython()  # the global shell starts once per process
    shell.run_line_magic("load_ext", "mlnb")
    yield shell
    shell.run_line_magic("unload_ext", "mlnb")


@pytest.fixture
def fresh_defaults(monkeypatch):
    """No MLNB_MODEL, and the session defaults put back after the test."""
    from mlnb.session import defaults

    monkeypatch.delenv("MLNB_MODEL", raising=False)
    saved = (defaults.model, defaults.setting, defaults.monitor, defaults.verbose)
    yield
    defaults.model, defaults.setting, defaults.monitor, defaults.verbose = saved


@pytest.fixture
def fresh_outputs(ip):
    """An empty output cache and no stored error before and after the test (the real shell is the whole run's).

    ``_``, ``__`` and ``___`` are emptied too: IPython leaves them when ``_`` is a builtin, as under pytest.
    """

    def forget() -> None:
        ip.run_line_magic("reset", "-f out")
        for name in ("_", "__", "___"):
            ip.user_ns[name] = ""
            if name in ip.user_ns_hidden:
                ip.user_ns_hidden[name] = ""
            setattr(ip.displayhook, name, "")

    forget()
    yield
    forget()
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
