"""nbval runs the tutorial notebooks as Jupyter does, in the environment their stored outputs were made in."""

from __future__ import annotations

import os

import pytest
from nbtools import KERNEL_ENV
from nbval.kernel import RunningKernel

_saved: dict[str, str | None] = {}


# nbval sends every cell with store_history=False. IPython then never advances the execution count: each result
# lands in Out[1] and the per-cell lines all say "cell 1". Notebook 03 is about the output cache, so cells run here
# the way Jupyter sends them.
def _execute_like_jupyter(self, cell_input, allow_stdin=None):
    return self.kc.execute(cell_input, store_history=True, allow_stdin=allow_stdin, stop_on_error=False)


RunningKernel.execute_cell_input = _execute_like_jupyter


# nbval starts a notebook's kernel while setting up its first cell; the kernel inherits os.environ at that moment.
# These hooks apply to the items under notebooks/ only, and put the environment back after each one.
@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for key, value in KERNEL_ENV.items():
        _saved.setdefault(key, os.environ.get(key))
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    for key, value in _saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved.clear()
