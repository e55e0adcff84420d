"""The namespace walkers (``%vram who``, ``%vram free --outputs``, the traceback check after an error) against
objects that raise whenever they are looked at, and the frames an error's traceback keeps for ``%debug``.

Each case is typed as a user types it, in the real shell; the hostile classes are defined in a cell too.
"""

from __future__ import annotations

import gc
import re
import sys

import pytest
import torch

from mlnb.device import use_device
from mlnb.testing import FakeDevice
from mlnb.monitor import cell_history

pytestmark = pytest.mark.usefixtures("fresh_defaults", "fresh_outputs")

# What lazy proxies and odd containers do: every way of looking at them raises.
HOSTILE = '''
class Loading:
    """A lazy proxy as IPython can still show it (its class is readable): the rest raises."""
    @property
    def __dict__(self):
        raise RuntimeError("not loaded")
    def __getattr__(self, name):
        raise RuntimeError("not loaded")
    def __len__(self):
        raise RuntimeError("not loaded")
    def __iter__(self):
        raise RuntimeError("not loaded")
    def __eq__(self, other):
        raise RuntimeError("not loaded")
    def __hash__(self):
        raise RuntimeError("not loaded")
    def __bool__(self):
        raise RuntimeError("not loaded")
    def __repr__(self):
        return "<Loading>"

class Lazy(Loading):
    """A lazy proxy that is not loaded: attribute access, its class, len, iteration, ==, hash and truth raise."""
    @property
    def __class__(self):
        raise RuntimeError("not loaded")
    def __repr__(self):
        return "<Lazy (not loaded)>"

class LazyDict(dict):
    def items(self):
        raise RuntimeError("not loaded")
    def __iter__(self):
        raise RuntimeError("not loaded")
    def __len__(self):
        raise RuntimeError("not loaded")

class LazyList(list):
    def __iter__(self):
        raise RuntimeError("not loaded")
    def __len__(self):
        raise RuntimeError("not loaded")

class Key:
    def __repr__(self):
        raise RuntimeError("no repr")
'''


def run(ip, source: str):
    return ip.run_cell(source, store_history=True)


@pytest.fixture
def gpu(ip):
    """A fake GPU as the session's device, with ``fake`` and ``torch`` in the namespace and the hostile classes
    defined."""
    device = FakeDevice(total=4 * 2**30)
    with use_device(device):
        ip.user_ns["fake"] = device
        assert run(ip, "import torch\n" + HOSTILE).success
        yield device
    for name in ("fake", "lazy", "loading", "odd", "keyed", "listed", "Lazy", "Loading", "LazyDict", "LazyList", "Key"):
        ip.user_ns.pop(name, None)


def test_vram_who_survives_objects_that_raise_and_says_what_it_skipped(ip, gpu):
    run(ip, "lazy = Lazy()\n"
            "odd = LazyDict(t=fake.track(torch.zeros(1024)))\n"
            "keyed = {Key(): fake.track(torch.zeros(2048))}\n"
            "listed = LazyList([lazy, fake.track(torch.zeros(512))])")
    result = run(ip, "%vram who")
    assert result.error_in_exec is None, result.error_in_exec
    table = result.result
    assert [row[3] for row in table.rows] == ["keyed[<Key>]", "odd['t']", "listed[1]"]
    assert table.footer.endswith("; skipped 1 object(s) that raised when looked into (first: Lazy (RuntimeError))")
    assert str(table).count("skipped") == 1


def test_vram_free_outputs_survives_an_output_that_raises(ip, gpu, capsys):
    run(ip, "loading = Loading()")
    assert run(ip, "loading").result is ip.user_ns["loading"]  # Out[n] and _ are the proxy
    pinned = run(ip, "fake.track(torch.zeros(1024))").execution_count
    capsys.readouterr()
    result = run(ip, "%vram free --outputs")
    assert result.error_in_exec is None, result.error_in_exec
    assert result.result.outputs_dropped == (f"Out[{pinned}]",)
    out = capsys.readouterr().out
    assert "[mlnb] %vram free --outputs skipped 1 object(s) that raised when looked into (first: Loading" in out
    assert type(ip.user_ns["loading"]).__name__ == "Loading"  # the user's variable stays


def test_the_traceback_check_survives_objects_that_raise(ip, gpu, capsys):
    gpu_tensor = "fake.track(torch.zeros(1 << 20), allocate=True)"
    run(ip, "lazy = Lazy()")
    cell_history.clear()
    capsys.readouterr()
    result = run(ip, f"def step(proxy):\n    latents = {gpu_tensor}\n    raise ValueError('boom')\nstep(lazy)")
    assert isinstance(result.error_in_exec, ValueError)
    (record,) = cell_history.records()
    assert record.error == "ValueError"
    (note,) = record.notes
    assert note.startswith("cleared 1 traceback frame(s) pinning 4.0 MiB"), note
    assert re.search(r"; skipped \d+ object\(s\) that raised when looked into \(first: \w+ \(RuntimeError\)\)$", note)
    gpu.empty_cache()
    assert gpu.allocated == 0


def test_an_error_clears_only_the_frames_that_pin_gpu_tensors(ip, gpu, capsys):
    """The frame holding the GPU tensor lets it go; the frame that raised holds none and keeps its locals."""
    result = run(ip, "def check(shape):\n    note = 'kept for %debug'\n    raise ValueError(shape)\n"
                     "def denoise():\n    latents = fake.track(torch.zeros(1 << 20), allocate=True)\n"
                     "    check(tuple(latents.shape))\n"
                     "denoise()")
    assert isinstance(result.error_in_exec, ValueError)
    frames = {}
    tb = sys.last_traceback
    while tb is not None:
        frames[tb.tb_frame.f_code.co_name] = tb.tb_frame
        tb = tb.tb_next
    assert frames["check"].f_locals.get("note") == "kept for %debug"
    assert "latents" not in frames["denoise"].f_locals
    gc.collect()
    gpu.empty_cache()
    assert gpu.allocated == 0
    assert "cleared 1 traceback frame(s) pinning 4.0 MiB of GPU tensors" in "".join(capsys.readouterr())


def test_a_step_callback_that_raises_keeps_its_locals_for_debug(ip, tiny_sd, clean_cache):
    """It holds no GPU tensor (here: no GPU at all), so its frame is not cleared."""
    ip.user_ns["folder"] = str(tiny_sd)
    run(ip, "import mlnb\npipe = mlnb.load_pipeline(folder, level='none')")
    result = run(ip, "def on_step(pipe, step, timestep, callback_kwargs):\n"
                     "    mine = 'the callback local'\n"
                     "    raise ValueError('my callback failed')\n"
                     "pipe.generate('a fox', steps=2, width=64, height=64, callback_on_step_end=on_step)")
    assert isinstance(result.error_in_exec, ValueError)
    tb, seen = sys.last_traceback, {}
    while tb is not None:
        seen[tb.tb_frame.f_code.co_name] = dict(tb.tb_frame.f_locals)
        tb = tb.tb_next
    assert seen["on_step"].get("mine") == "the callback local", seen.get("on_step")
    assert "callback_kwargs" in seen["on_step"]
    for name in ("pipe", "folder", "on_step"):
        ip.user_ns.pop(name, None)


def test_a_tensor_behind_a_raising_container_is_still_found():
    """The walk reads containers through the base class's own methods, so an override that raises hides nothing."""
    from mlnb.monitor import Skipped, find_tensors, is_host_tensor

    namespace: dict = {}
    exec(HOSTILE, namespace)
    skipped = Skipped()
    holder = type("Holder", (), {})()
    holder.__dict__[3] = torch.zeros(1)  # an attribute name that is not a string
    roots = [("d", namespace["LazyDict"](t=torch.zeros(4))), ("l", namespace["LazyList"]([torch.zeros(3)])),
             ("p", namespace["Lazy"]()), ("k", {namespace["Key"](): torch.zeros(2)}), ("attrs", holder)]
    found = find_tensors(roots, is_host_tensor, skipped)
    assert [r.path for r in found] == ["d['t']", "l[0]", "k[<Key>]", "attrs.3"]
    assert skipped.count == 1 and skipped.first == "Lazy (RuntimeError)"
