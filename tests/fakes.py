"""Test doubles shared by several test modules."""

from __future__ import annotations

from mlnb.units import GiB


class FakeCuda:
    """The slice of ``torch.cuda`` that ``CudaDevice`` uses, with fixed figures (a 16 GiB "Tesla T4")."""

    def __init__(self, mem_get_info_fails: bool = False):
        self.mem_get_info_fails = mem_get_info_fails
        self.calls: list[str] = []
        self.stats_reads = 0  # reads of the allocator's statistics table

    def mem_get_info(self, index):
        if self.mem_get_info_fails:
            raise RuntimeError("CUDA error: unspecified launch failure")
        return 10 * GiB, 16 * GiB

    def get_device_capability(self, index):
        return (7, 5)

    def get_device_name(self, index):
        return "Tesla T4"

    def is_bf16_supported(self):
        return False

    def memory_allocated(self, index=None):
        return 1 * GiB

    def memory_reserved(self, index=None):
        return 2 * GiB

    def max_memory_allocated(self, index=None):
        return 3 * GiB

    def max_memory_reserved(self, index=None):
        return 4 * GiB

    def memory_stats_as_nested_dict(self, index=None):  # the table the figures above come from, as torch nests it
        self.stats_reads += 1
        return {"allocated_bytes": {"all": {"current": self.memory_allocated(index),
                                            "peak": self.max_memory_allocated(index)}},
                "reserved_bytes": {"all": {"current": self.memory_reserved(index),
                                           "peak": self.max_memory_reserved(index)}},
                "num_alloc_retries": 0, "num_device_alloc": 7}

    def synchronize(self, index=None):
        self.calls.append("synchronize")

    def empty_cache(self):
        self.calls.append("empty_cache")

    def ipc_collect(self):
        self.calls.append("ipc_collect")

    def reset_peak_memory_stats(self, index=None):
        self.calls.append("reset_peak_memory_stats")

    def Event(self, enable_timing=False):  # torch.cuda.Event
        cuda = self

        class Event:
            def __init__(self):
                self.at = None

            def record(self):
                cuda.calls.append("record")
                self.at = len(cuda.calls)  # a stand-in time: how many calls came before

            def elapsed_time(self, end):  # milliseconds, as torch's
                if not enable_timing:
                    raise RuntimeError("Events were not created with timing enabled")
                return float(end.at - self.at)

        return Event()


def _tiny_planner(pipe, monkeypatch, max_block: int):
    """Scale the planner's reserves and largest block down to a tiny model (for the rest of the test), with no
    block too small to stream; returns the pipeline's model facts under them."""
    from mlnb.planner import blocks, cost, search

    monkeypatch.setattr(cost, "denoise_reserve", lambda work: 100_000)
    monkeypatch.setattr(cost, "decode_reserve", lambda work, tile: 100_000)
    monkeypatch.setattr(cost, "_ENCODE_ACTIVATIONS", 10_000)
    monkeypatch.setattr(search, "MIN_STREAMED", 0)
    monkeypatch.setattr(blocks, "MAX_BLOCK", max_block)
    return blocks.model_facts(pipe)


def tiny_stream_budget(pipe, monkeypatch, max_block: int = 200_000):
    """A budget for which a tiny pipeline's plan streams part of its UNet, with the planner's reserves and its
    largest block (``max_block`` bytes, for every pipeline planned while the test runs) scaled down to the tiny model
    (the real ones are hundreds of MiB), and no block too small to stream."""
    facts = _tiny_planner(pipe, monkeypatch, max_block)
    need = facts.denoiser_other + 400_000 + 2 * max(b.nbytes for b in facts.blocks) + facts.vae + 300_000
    return int(need / 0.92)


def tiny_dit_stream_budget(pipe, monkeypatch, max_block: int) -> int:
    """A budget whose plan streams about half a tiny transformer's units and keeps the rest, with the planner's
    reserves scaled down to the tiny model (as :func:`tiny_stream_budget` does for the UNets)."""
    from mlnb.planner import CardFacts, Workload, cost

    facts = _tiny_planner(pipe, monkeypatch, max_block)
    _, decode, _ = cost.phase_terms(facts, None, Workload(64, 64, 1, 2), CardFacts())
    largest = max(b.nbytes for b in facts.blocks)
    kept = facts.denoiser_other + sum(b.nbytes for b in facts.blocks) // 2
    return int((kept + max(decode, 2 * largest + 100_000, facts.encoder_slots + 10_000)) / 0.92)


def generate_64(pipe):
    """One 64×64 image in two steps, seed 1, as a uint8 array."""
    import numpy as np
    import torch

    pipe.set_progress_bar_config(disable=True)
    out = pipe("a fox", num_inference_steps=2, width=64, height=64, generator=torch.Generator().manual_seed(1))
    return np.asarray(out.images[0])


def _streamed_units(sizes):
    """One unit per size: a Linear(8, 8) for 8, else two Linears through that many features."""
    import torch

    return torch.nn.ModuleList(torch.nn.Linear(8, 8) if n == 8 else torch.nn.Sequential(
        torch.nn.Linear(8, n), torch.nn.Linear(n, 8)) for n in sizes)


def interleaved(sizes=(8, 16, 8, 32, 8, 16)):
    """Streamed units ``streamed.0`` ... (a Linear(8, 8), or two Linears through ``n`` features, by ``sizes``) with a
    resident layer ``resident.i`` after each (8 features in and out)."""
    import torch

    class Interleaved(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.streamed = _streamed_units(sizes)
            self.resident = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in sizes)
            self.register_buffer("scale", torch.tensor(0.5))

        def forward(self, x):
            for unit, keep in zip(self.streamed, self.resident):
                x = torch.tanh(keep(unit(x))) * self.scale * 2
            return x

    return Interleaved()


def in_runs(sizes=(8, 8, 16, 8, 32, 8, 8, 8), run: int = 3):
    """Streamed units ``streamed.0`` ... (sized as :func:`interleaved`'s) in runs of ``run`` with nothing between them,
    and a resident layer ``resident.j`` after each run (8 features in and out)."""
    import torch

    class InRuns(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.streamed = _streamed_units(sizes)
            self.resident = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(-(-len(sizes) // run)))

        def forward(self, x):
            for index, unit in enumerate(self.streamed):
                x = torch.tanh(unit(x))
                if index % run == run - 1 or index == len(self.streamed) - 1:
                    x = self.resident[index // run](x)
            return x

    return InRuns()


def log_runs(model, names, log: list) -> None:
    """Append ``("run", name)`` to ``log`` as each module ``names`` of ``model`` runs its forward: inside a streaming
    hook, which wraps the forward it finds, so after the unit's copy is waited for."""
    for name in names:
        module = dict(model.named_modules())[name]

        def forward(*args, _forward=module.forward, _name=name, **kwargs):
            log.append(("run", _name))
            return _forward(*args, **kwargs)

        module.forward = forward


def calls_a_twice():
    """A module whose forward runs its layer ``a`` twice: ``a(b(a(x)))`` (4 features)."""
    import torch

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.a(self.b(self.a(x)))

    return Twice()


def run_cell(ip, source: str):
    """Run ``source`` as a notebook cell (stored in the history, as Jupyter sends it)."""
    return ip.run_cell(source, store_history=True)


def usage_error(ip, source: str, capsys) -> str:
    """Run a cell that must fail with a UsageError shown as exactly one line, no traceback; return the line."""
    from IPython.core.error import UsageError

    capsys.readouterr()
    result = run_cell(ip, source)
    assert isinstance(result.error_in_exec, UsageError), result.error_in_exec
    captured = capsys.readouterr()
    text = (captured.out + captured.err).strip()
    assert "Traceback" not in text and text.count("\n") == 0 and text.startswith("UsageError: "), text
    return text
