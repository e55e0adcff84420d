"""Packing streamed host copies into power-of-two buffers (pure torch on the CPU; pinning itself needs CUDA)."""

from __future__ import annotations

import pytest
import torch

from mlnb.optimizer.pinning import BIN_BYTES, pack
from mlnb.units import MiB


def _recording_allocator():
    sizes: list[int] = []

    def allocate(nbytes: int):
        sizes.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    return allocate, sizes


def test_copies_keep_dtype_shape_and_values_in_buffers_sized_as_powers_of_two():
    torch.manual_seed(0)
    tensors = [
        torch.randn(1280, 5120, dtype=torch.float16),  # 12.5 MiB: pinned alone it would lock 16 MiB
        torch.randn(640, 640).to(torch.bfloat16),
        torch.arange(77, dtype=torch.int64).view(1, 77),  # a buffer (position ids)
        torch.tensor(3.0),  # 0-d
        torch.ones(3, 5, dtype=torch.bool),
        torch.empty(0, 4),
        torch.randn(64, 32).t(),  # not contiguous
    ]
    expected = [t.clone() for t in tensors]
    allocate, sizes = _recording_allocator()
    copies, allocated = pack(list(tensors), allocate, bin_bytes=16 * MiB)
    for copy, want in zip(copies, expected):
        assert copy.dtype == want.dtype and copy.shape == want.shape and torch.equal(copy, want)
        assert copy.is_contiguous()
    assert all(size & (size - 1) == 0 for size in sizes)  # the host allocator has nothing to round
    assert allocated == sum(sizes) and len(sizes) == 1 and sizes[0] == 16 * MiB


def test_many_tensors_fill_full_buffers_and_waste_little():
    """Forty 13.1 MB projections and their biases: per-tensor pinning would lock 16 MiB for each 13.1 MB;
    packed, the host locks under 3% more than the bytes."""
    tensors = [torch.zeros(1280, 5120, dtype=torch.float16) for _ in range(40)]
    tensors += [torch.zeros(5120, dtype=torch.float16) for _ in range(40)]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    allocate, sizes = _recording_allocator()
    _, allocated = pack(tensors, allocate)
    per_tensor = 40 * 16 * MiB + 40 * 16 * 1024
    assert allocated < 1.03 * weights < per_tensor
    assert len(sizes) == -(-weights // BIN_BYTES) and set(sizes) == {BIN_BYTES}  # as few buffers as the bytes need


def test_a_tensor_larger_than_a_bin_raises_the_bin_size():
    big = torch.zeros(40 * MiB, dtype=torch.uint8)
    allocate, sizes = _recording_allocator()
    copies, _ = pack([big, torch.zeros(10)], allocate, bin_bytes=16 * MiB)
    assert sizes == [64 * MiB] and copies[0].numel() == 40 * MiB


def test_sources_are_released_as_they_are_copied_and_done_sees_each_copy():
    tensors = [torch.full((1000,), float(i)) for i in range(5)]
    seen = {}
    sources = list(tensors)
    copies, _ = pack(sources, lambda n: torch.empty(n, dtype=torch.uint8), done=lambda i, c: seen.setdefault(i, c))
    assert sources == [None] * 5  # pack dropped its references
    assert sorted(seen) == list(range(5)) and all(seen[i] is copies[i] for i in range(5))
    assert [float(c[0]) for c in copies] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_an_allocation_failure_propagates():
    def refuse(nbytes):
        raise RuntimeError("cannot lock host memory")

    with pytest.raises(RuntimeError, match="cannot lock"):
        pack([torch.zeros(10)], refuse)


def test_streamed_units_host_copies_become_packed_views(tiny_sdxl):
    """What stream_units does with a copy stream (CUDA), checked without one: every host copy of every streamed
    unit, parameters and buffers, is a view into the allocated buffers with its values unchanged, and a unit's
    parameters point at it, so the pageable original is gone."""
    from diffusers import DiffusionPipeline

    from mlnb.optimizer.budget import _units
    from mlnb.optimizer.streaming import _pin_packed

    try:
        from diffusers.hooks.group_offloading import GroupOffloadingConfig, GroupOffloadingHook, ModuleGroup

        class Stream:  # only its presence matters here: it makes diffusers keep host copies per tensor
            def synchronize(self):
                pass

        pipe = DiffusionPipeline.from_pretrained(tiny_sdxl)
        encoder = pipe.text_encoder_2
        hooks = {}
        for name, unit in _units(encoder, 20_000):
            group = ModuleGroup([unit], torch.device("cpu"), torch.device("cpu"), unit, unit, stream=Stream(),
                                low_cpu_mem_usage=True)
            hooks[name] = GroupOffloadingHook(group, config=GroupOffloadingConfig(
                torch.device("cpu"), torch.device("cpu"), "block_level", False, False, True, 1))
    except AttributeError as exc:  # diffusers 0.39 asks torch.accelerator for a device that a CPU host lacks
        pytest.skip(f"this diffusers' group offloading needs an accelerator ({exc})")
    before = {t: t.detach().clone() for h in hooks.values() for t in h.group.cpu_param_dict}
    assert len(hooks) > 1 and before
    buffers: list = []

    def allocate(nbytes):
        buffers.append(torch.empty(nbytes, dtype=torch.uint8))
        return buffers[-1]

    _pin_packed(hooks, allocate)
    bases = {b.data_ptr(): b.numel() for b in buffers}
    for hook in hooks.values():
        for tensor, copy in hook.group.cpu_param_dict.items():
            assert torch.equal(copy, before[tensor]) and tensor.data_ptr() == copy.data_ptr()
            assert any(base <= copy.data_ptr() < base + size for base, size in bases.items())
    assert len(buffers) == 1 < len(before) and all(s & (s - 1) == 0 for s in bases.values())  # one for the lot
