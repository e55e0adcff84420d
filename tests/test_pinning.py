"""Packing streamed units' host copies into power-of-two buffers (pure torch on the CPU; pinning itself needs CUDA)."""

from __future__ import annotations

import pytest
import torch

from mlnb.planner.pinning import BIN_BYTES, layout, pack, view_in
from mlnb.units import MiB


def _recording_allocator():
    sizes: list[int] = []

    def allocate(nbytes: int):
        sizes.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    return allocate, sizes


def _contents(regions, expected):
    for region, want in zip(regions, expected):
        lay = layout(want)
        assert region.numel() == lay.nbytes and region.is_contiguous()
        for offset, tensor in zip(lay.offsets, want):
            copy = view_in(region, tensor, offset)
            assert copy.dtype == tensor.dtype and copy.shape == tensor.shape and torch.equal(copy, tensor)
            assert offset % 512 == 0 and (copy.data_ptr() == region.data_ptr() + offset or not copy.numel())


def test_a_unit_is_one_region_keeping_dtypes_shapes_and_values_in_power_of_two_buffers():
    torch.manual_seed(0)
    unit = [
        torch.randn(1280, 5120, dtype=torch.float16),  # 12.5 MiB: pinned alone it would lock 16 MiB
        torch.randn(640, 640).to(torch.bfloat16),
        torch.arange(77, dtype=torch.int64).view(1, 77),  # a buffer (position ids)
        torch.tensor(3.0),  # 0-d
        torch.ones(3, 5, dtype=torch.bool),
        torch.empty(0, 4),
        torch.randn(64, 32).t(),  # not contiguous
    ]
    other = [torch.randn(10, 3)]
    expected = [[t.clone() for t in unit], [t.clone() for t in other]]
    allocate, sizes = _recording_allocator()
    regions, allocated = pack([list(unit), list(other)], allocate, bin_bytes=16 * MiB)
    _contents(regions, expected)
    assert all(size & (size - 1) == 0 for size in sizes)  # the host allocator has nothing to round
    assert allocated == sum(sizes) and len(sizes) == 1 and sizes[0] == 16 * MiB


def test_many_units_fill_full_buffers_and_waste_little():
    """Forty units of a 13.1 MB projection and its bias: per-tensor pinning would lock 16 MiB for each 13.1 MB;
    packed, the host locks under 3% more than the bytes."""
    groups = [[torch.zeros(1280, 5120, dtype=torch.float16), torch.zeros(5120, dtype=torch.float16)] for _ in range(40)]
    weights = sum(t.numel() * t.element_size() for g in groups for t in g)
    allocate, sizes = _recording_allocator()
    _, allocated = pack(groups, allocate)
    per_tensor = 40 * 16 * MiB + 40 * 16 * 1024
    assert allocated < 1.03 * weights < per_tensor
    assert len(sizes) == -(-weights // BIN_BYTES) and set(sizes) == {BIN_BYTES}  # as few buffers as the bytes need


def test_a_unit_larger_than_a_bin_raises_the_bin_size():
    big = [torch.zeros(20 * MiB, dtype=torch.uint8), torch.zeros(20 * MiB, dtype=torch.uint8)]
    allocate, sizes = _recording_allocator()
    regions, _ = pack([big, [torch.zeros(10)]], allocate, bin_bytes=16 * MiB)
    assert sizes == [64 * MiB] and regions[0].numel() == 40 * MiB


def test_sources_are_released_as_they_are_copied_and_done_sees_each_copy():
    groups = [[torch.full((1000,), float(i)), torch.full((3,), -float(i))] for i in range(5)]
    seen = {}
    regions, _ = pack(groups, lambda n: torch.empty(n, dtype=torch.uint8), done=lambda g, i, c: seen.setdefault((g, i), c))
    assert groups == [[None, None]] * 5  # pack dropped its references
    assert sorted(seen) == [(g, i) for g in range(5) for i in range(2)]
    assert [float(seen[g, 0][0]) for g in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(seen[g, 1].data_ptr() == regions[g].data_ptr() + 4096 for g in range(5))  # 4000 bytes, aligned


def test_filled_runs_after_each_buffer_once_its_sources_are_dropped():
    """Where the caller gives the freed heap back to the OS: after each buffer, with that buffer's sources gone."""
    groups = [[torch.zeros(4 * MiB, dtype=torch.uint8)] for _ in range(5)]
    alive = []
    regions, _ = pack(groups, lambda n: torch.empty(n, dtype=torch.uint8), bin_bytes=8 * MiB,
                      filled=lambda: alive.append(sum(t is not None for g in groups for t in g)))
    assert alive == [3, 1, 0]  # buffers of two, two and one unit (4 MiB each, 8 MiB buffers), sources dropped as copied


def test_the_buffer_size_is_the_power_of_two_that_locks_the_fewest_bytes():
    """Units just over half a buffer leave the rest of it empty: T5-XXL's 240 MiB feed-forward and 128 MiB (and a
    norm) attention units, in buffers of their own power of two (256 MiB), lock 2 GiB for 1.44 GiB; in 512 MiB
    buffers two feed-forward units share one and three attention units another: 1.75 GiB. No larger buffer than
    :data:`MAX_BIN_BYTES` is chosen, and where larger buffers lock no less, the smaller stay."""
    from mlnb.planner.pinning import MAX_BIN_BYTES, packed_bytes

    t5 = [240 * MiB] * 4 + [128 * MiB + 4096] * 4
    assert packed_bytes(t5) == 1792 * MiB
    allocate, sizes = _recording_allocator()
    pack([[torch.empty(n, dtype=torch.uint8)] for n in t5], allocate)
    assert sorted(sizes) == [256 * MiB, 512 * MiB, 512 * MiB, 512 * MiB] and max(sizes) <= MAX_BIN_BYTES
    # 40 MiB units: one a 64 MiB buffer (512 MiB), three a 128 MiB one (384 MiB); 256 MiB ones lock no less
    assert packed_bytes([40 * MiB] * 8) == 384 * MiB


def test_an_allocation_failure_propagates():
    def refuse(nbytes):
        raise RuntimeError("cannot lock host memory")

    with pytest.raises(RuntimeError, match="cannot lock"):
        pack([[torch.zeros(10)]], refuse)


def test_streamed_units_host_copies_become_packed_views(tiny_sdxl):
    """What stream_units does on every device: each streamed unit's tensors, parameters and buffers, become views
    into one region of the allocated buffers with their values unchanged, so the pageable originals are gone."""
    from diffusers import DiffusionPipeline

    from mlnb.device import CpuDevice
    from mlnb.planner import stream_units
    from mlnb.planner.blocks import model_units

    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl)
    encoder = pipe.text_encoder_2
    names = [name for name, _ in model_units(encoder, 20_000)]
    before = {name: t.detach().clone() for name, t in list(encoder.named_parameters()) + list(encoder.named_buffers())}
    allocate, sizes = _recording_allocator()
    buffers: list = []

    def keep(nbytes):
        buffers.append(allocate(nbytes))
        return buffers[-1]

    streamer = stream_units(encoder, names, torch.device("cpu"), CpuDevice(), host_buffer=keep)
    assert len(streamer.units) == len(names) > 1
    bases = {b.data_ptr(): b.numel() for b in buffers}
    streamed = {id(t) for unit in streamer.units.values() for t in unit.tensors}
    for name, tensor in list(encoder.named_parameters()) + list(encoder.named_buffers()):
        assert torch.equal(tensor, before[name])
        inside = any(base <= tensor.data_ptr() < base + size for base, size in bases.items())
        assert inside == (id(tensor) in streamed), name
    for unit in streamer.units.values():
        assert all(unit.region.data_ptr() <= h.data_ptr() < unit.region.data_ptr() + unit.region.numel() for h in unit.home)
    assert len(buffers) == 1 and all(s & (s - 1) == 0 for s in sizes)  # one power-of-two buffer for the lot


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_host_ram_stand_in_script_plans_applies_and_reports_a_peak(tiny_sd, tmp_path):
    """``scripts/host_ram_standin.py`` (how the planner docs' host RAM figures are made) runs end to end on a folder:
    its plan applied with the stand-ins, and a peak no lower than what is held at the end."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "host_ram_standin.py"
    out = tmp_path / "rss.json"
    proc = subprocess.run([sys.executable, str(script), str(tiny_sd), "--budget", "1GiB", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = json.loads(out.read_text())  # one row: one folder, one budget
    assert result["plan"] == "resident" and result["budget"] == "1GiB" and "after the plan" in proc.stdout
    assert result["rss_peak"] >= result["rss_end"] > 0 and result["peak_over_fp16_weights"] > 0
    assert [p["phase"] for p in result["phases"]][:2] == ["start", "from_pretrained"]
