"""What only a CUDA GPU shows: offloads really move weights, peaks order by level, the monitor's peak and cleanup
on real CUDA memory, and SDXL in fp16 with ``force_upcast`` at ultra. Skipped without CUDA (see conftest)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

import mlnb
from mlnb.levels import OptimizationLevel
from mlnb.monitor import MemoryMonitor
from mlnb.pipeline import unload_all
from mlnb.units import GiB, MiB, format_bytes

pytestmark = pytest.mark.gpu

L = OptimizationLevel


@pytest.fixture(scope="module")
def cuda():
    """The real CUDA device, current for the module; nothing cached before or after."""
    import torch

    from mlnb.device import CudaDevice, use_device

    device = CudaDevice(torch.cuda.current_device())
    with use_device(device):
        unload_all(device)
        yield device
        unload_all(device)


# ---------------------------------------------------------------------------------------------------------------
# The monitor on real CUDA memory


def test_device_info_reads_the_card(cuda):
    """On a GPU the torch figures are filled; NVML figures are there, or its error says why not."""
    info = cuda.info()
    assert info.available and info.kind == "cuda"
    assert info.total_bytes > 0 and 0 < info.free_bytes <= info.total_bytes
    assert info.compute_capability is not None
    assert info.nvml_used_bytes is not None or info.nvml_error


def test_monitor_peak_covers_a_known_allocation(cuda):
    """A 512 MiB tensor made and dropped inside the block is in the peak."""
    import torch

    with MemoryMonitor(cuda) as mon:
        block = torch.ones(512 * MiB, dtype=torch.uint8, device=cuda.torch_device)
        del block
    report = mon.report
    assert report.gpu
    assert report.peak_allocated >= report.start_allocated + 512 * MiB
    assert report.end_allocated < report.start_allocated + 512 * MiB


def test_monitor_exit_returns_reserved_memory(cuda):
    """A big tensor freed inside the block stays reserved by the caching allocator until the monitor's closing
    cleanup, which gives it back to the driver."""
    import torch

    with MemoryMonitor(cuda) as mon:
        block = torch.ones(512 * MiB, dtype=torch.uint8, device=cuda.torch_device)
        del block
        reserved_inside = torch.cuda.memory_reserved(cuda.index)
    reserved_after = torch.cuda.memory_reserved(cuda.index)
    assert reserved_inside >= 512 * MiB
    assert reserved_after <= reserved_inside - 512 * MiB
    assert mon.report.freed >= 512 * MiB
    assert mon.report.cleanup == ("gc_collect", "cuda_cache_clear")


def test_a_generation_monitor_leaves_the_cache_to_the_release_which_gives_it_back(cuda):
    """With ``defer`` the block ends with its cache still reserved (no clear on the critical path); the deferred
    release then gives it back, within a second, to 64 MiB of what is allocated."""
    import time

    import torch

    from mlnb.monitor import release

    release.release_now()
    with MemoryMonitor(cuda, collect="if_needed", defer=True) as mon:
        block = torch.ones(512 * MiB, dtype=torch.uint8, device=cuda.torch_device)
        del block
    ended = time.perf_counter()
    assert mon.report.deferred and mon.report.cleanup == () and mon.report.cached >= 512 * MiB
    assert release.wait_idle(5.0) and time.perf_counter() - ended <= 1.0 + release.IDLE_DELAY
    reserved, allocated = torch.cuda.memory_reserved(cuda.index), torch.cuda.memory_allocated(cuda.index)
    assert reserved - allocated <= 64 * MiB
    assert release.last_release().freed >= 512 * MiB


def test_the_release_thread_lets_the_notebook_run_while_it_empties_the_cache(cuda, capsys):
    """The deferred release empties the cache in a background thread after a cell ends. If torch held the GIL
    through ``empty_cache`` (or the synchronize and ``ipc_collect`` beside it), the next cell's Python would stall for
    the whole release (about 0.3 s for SDXL's cache). The main thread ticks through the release: its longest gap stays
    far below the release's own time."""
    import time

    import torch

    from mlnb.monitor import release

    release.release_now()
    # about 6 GiB cached in segments of many sizes, as a decode and a denoising loop leave them
    blocks = [torch.empty(size, dtype=torch.uint8, device=cuda.torch_device)
              for size in [200 * MiB] * 24 + [20 * MiB] * 40 + [2 * MiB] * 200]
    del blocks
    torch.cuda.synchronize(cuda.index)
    release.request(cuda, baseline=None, collect=False)
    ticks = [time.perf_counter()]
    while not (release.last_release() is not None and release.last_release().ended > ticks[0]):
        ticks.append(time.perf_counter())  # pure Python: it needs the GIL to run
        if ticks[-1] - ticks[0] > 10:
            pytest.fail("the release did not run within 10 s")
    done = release.last_release()
    began = done.ended - done.seconds
    during = [b - a for a, b in zip(ticks, ticks[1:]) if b >= began and a <= done.ended]
    longest = max(during, default=0.0)
    with capsys.disabled():
        print(f"\nrelease {done.seconds * 1e3:.1f} ms ({format_bytes(done.freed or 0)} freed); the main thread's "
              f"longest pause during it {longest * 1e3:.1f} ms")
    if done.seconds < 0.05:
        pytest.skip(f"the release took {done.seconds * 1e3:.1f} ms: too short to tell a held GIL from a released one")
    assert longest < max(0.02, 0.25 * done.seconds)


def test_nested_monitors_on_the_global_peak_counter(cuda):
    """torch has one peak counter per device: the inner monitor resets it, the outer still sees the 1 GiB spike
    from before the inner, and the inner sees only its own 256 MiB."""
    import torch

    with MemoryMonitor(cuda) as outer:
        big = torch.ones(GiB, dtype=torch.uint8, device=cuda.torch_device)
        del big
        with MemoryMonitor(cuda) as inner:
            small = torch.ones(256 * MiB, dtype=torch.uint8, device=cuda.torch_device)
            del small
    assert outer.report.peak_allocated >= outer.report.start_allocated + GiB
    assert inner.report.peak_allocated >= inner.report.start_allocated + 256 * MiB
    assert inner.report.peak_allocated < inner.report.start_allocated + GiB


# ---------------------------------------------------------------------------------------------------------------
# A mid-size SD-like model: big enough that weights dominate the peak, small enough to build in seconds


@dataclass(frozen=True)
class MidModel:
    folder: Path
    unet_bytes: int  # fp16
    largest_param_bytes: int  # fp16, over all components: what one prefetched leaf can add


def build_mid_sd(folder: Path, tokenizer_folder: Path) -> MidModel:
    """A random-weight StableDiffusionPipeline, SD1.5's layout at reduced width: a ~140M-parameter UNet, ~26M
    text encoder, ~21M VAE (native 256 px), saved in fp16."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
    vocab = len(tokenizer)
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        cross_attention_dim=512,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=(64, 128, 256, 256),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=256,
        force_upcast=False,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
            max_position_embeddings=77, projection_dim=512,
            bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
        )
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(folder)
    modules = (unet, vae, text_encoder)
    return MidModel(
        folder=folder,
        unet_bytes=sum(p.numel() for p in unet.parameters()) * 2,
        largest_param_bytes=max(p.numel() for m in modules for p in m.parameters()) * 2,
    )


@pytest.fixture(scope="module")
def mid_sd(tmp_path_factory, tiny_sd):
    return build_mid_sd(tmp_path_factory.mktemp("mid-sd") / "sd", tiny_sd / "tokenizer")


@dataclass(frozen=True)
class LevelRun:
    peak: int
    location: dict[str, str]
    result: object


@pytest.fixture(scope="module")
def level_runs(cuda, mid_sd):
    """Each level on the mid model, fp16, 256x256, 4 steps, same seed; the second generation is the measured one
    (the first lets group offloading record its execution order and CUDA libraries set up their workspaces)."""
    runs: dict[L, LevelRun] = {}
    for level in (L.ULTRA, L.AGGRESSIVE, L.BALANCED, L.NONE):
        managed = mlnb.load_pipeline(mid_sd.folder, level=level, dtype="fp16", device=cuda)
        managed.generate("warm-up", seed=0, steps=1, width=256, height=256)
        result = managed.generate("a watercolor fox", seed=1, steps=4, width=256, height=256)
        runs[level] = LevelRun(result.memory.peak_allocated, managed.weights_location(), result)
    unload_all(cuda)
    return runs


def test_levels_apply_their_offloads_on_cuda(level_runs):
    """On CUDA each level's offload really runs (it was skipped on the CPU)."""
    assert level_runs[L.BALANCED].result.techniques.is_applied("model_cpu_offload")
    aggressive = level_runs[L.AGGRESSIVE].result.techniques
    assert aggressive["group_offload"].applied and aggressive["group_offload"].label == "group offload leaf"
    ultra = level_runs[L.ULTRA].result.techniques
    assert ultra["group_offload"].applied and ultra["group_offload"].label == "group offload leaf+stream"
    assert ultra.is_applied("fp8_storage") and ultra.is_applied("cuda_cache_clear")
    assert not any(level_runs[L.NONE].result.techniques[t].applied for t in ("model_cpu_offload", "group_offload"))
    for run in level_runs.values():
        assert run.result.images[0].size == (256, 256)


def test_peak_orders_by_level(level_runs, mid_sd):
    """Peak allocated: none > balanced > aggressive, and ultra no higher than aggressive (allowing for the one
    leaf a CUDA stream prefetches ahead)."""
    peak = {level: run.peak for level, run in level_runs.items()}
    assert peak[L.NONE] > peak[L.BALANCED] > peak[L.AGGRESSIVE], peak
    assert peak[L.ULTRA] <= peak[L.AGGRESSIVE] + 2 * mid_sd.largest_param_bytes, peak


def test_no_offload_keeps_weights_on_the_gpu(level_runs, cuda):
    """At none every component lives on the GPU."""
    location = level_runs[L.NONE].location
    assert set(location.values()) == {cuda.torch_device}, location


def test_model_offload_moves_the_unet_and_puts_it_back(level_runs, mid_sd):
    """Balanced: the UNet went to the GPU (the peak holds all its weights) and is back on the CPU afterwards."""
    run = level_runs[L.BALANCED]
    assert run.location["unet"] == "cpu", run.location
    assert run.peak >= mid_sd.unet_bytes


@pytest.mark.parametrize("level", [L.AGGRESSIVE, L.ULTRA], ids=lambda lv: lv.value)
def test_group_offload_keeps_weights_on_the_cpu(level_runs, mid_sd, level):
    """Aggressive and ultra: the UNet's weights stay on the CPU and are never all on the GPU at once."""
    run = level_runs[level]
    assert run.location["unet"] == "cpu", run.location
    assert run.location["text_encoder"] == "cpu", run.location
    assert run.peak < mid_sd.unet_bytes


def test_sdxl_fp16_with_force_upcast_runs_at_ultra(cuda, tiny_sdxl):
    """SDXL in fp16 with force_upcast at ultra. Below compute capability 8.0 the VAE stays resident on the GPU
    (group offloading would crash on the fp32 upcast) and comes back in fp16; from 8.0 it decodes in bf16, is not
    upcast, and is group-offloaded like the rest. Either way the rest is offloaded and a generation completes."""
    import torch

    native = cuda.info().native_bf16
    managed = mlnb.load_pipeline(tiny_sdxl, level="ultra", dtype="fp16", device=cuda)
    try:
        group = managed.techniques["group_offload"]
        assert group.applied and ("VAE kept on GPU" in group.detail) is not native
        result = managed.generate("a watercolor fox", seed=1, steps=2, width=64, height=64)
        assert result.images[0].size == (64, 64)
        location = managed.weights_location()
        assert location["vae"] == ("cpu" if native else cuda.torch_device), location
        assert location["unet"] == "cpu", location
        assert managed.pipe.vae.dtype == (torch.bfloat16 if native else torch.float16)
        assert result.memory.gpu and result.memory.peak_allocated > 0
    finally:
        managed.unload()


def test_sdxl_vae_decodes_in_bf16_where_the_card_computes_it_within_a_few_levels_of_the_fp32_decode(cuda, tiny_sdxl):
    import numpy as np
    import torch

    if not cuda.info().native_bf16:
        pytest.skip("compute capability below 8.0: diffusers' fp32 upcast stays")
    managed = mlnb.load_pipeline(tiny_sdxl, level="none", dtype="fp16", device=cuda)
    try:
        assert managed.pipe.vae.dtype == torch.bfloat16
        call = dict(seed=3, steps=2, width=128, height=128)
        bf16 = np.asarray(managed.generate("a watercolor fox", **call).images[0], dtype=np.float64)
        assert managed.pipe.vae.dtype == torch.bfloat16  # not upcast by the pipeline
        managed.pipe.vae.to(torch.float16)  # diffusers' own way: cast to fp32 for each decode
        fp32 = np.asarray(managed.generate("a watercolor fox", **call).images[0], dtype=np.float64)
        assert managed.pipe.vae.dtype == torch.float16
        assert bf16.std() > 0 and np.abs(bf16 - fp32).max() <= 8 and np.abs(bf16 - fp32).mean() < 1.0
    finally:
        managed.unload()


def test_a_planned_sdxl_vae_on_a_card_without_bf16_is_cast_to_fp32_on_the_card(cuda, tiny_sdxl, monkeypatch, tmp_path):
    """As on a T4: a plan that offloads the fp16 SDXL VAE copies it from its pinned region at the decode and casts it
    to fp32 there; the image is within 2 levels of diffusers' own upcast decode."""
    import dataclasses

    import numpy as np
    import torch

    from mlnb.device import DeviceInfo
    from mlnb.planner import search

    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))
    monkeypatch.setattr(DeviceInfo, "native_bf16", property(lambda self: False))
    call = dict(seed=5, steps=2, width=128, height=128)
    plain = mlnb.load_pipeline(tiny_sdxl, level="none", dtype="fp16", device=cuda)
    try:
        assert plain.pipe.vae.dtype == torch.float16
        reference = np.asarray(plain.generate("a watercolor fox", **call).images[0], dtype=np.float64)
    finally:
        plain.unload()
    real = search.plan_for_budget
    monkeypatch.setattr(search, "plan_for_budget", lambda *a, **k: dataclasses.replace(
        real(*a, **k), strategy="offload encoders and VAE", offload_encoders_vae=True))
    planned = mlnb.load_pipeline(tiny_sdxl, budget="8GiB", dtype="fp16", device=cuda)
    try:
        vae = planned.pipe.vae
        assert hasattr(vae, "_mlnb_whole") and not vae.config.force_upcast
        image = np.asarray(planned.generate("a watercolor fox", **call).images[0], dtype=np.float64)
        on_card = next(vae.parameters()).device.type == torch.device(cuda.torch_device).type
        assert vae.dtype == torch.float32 and on_card  # cast on the card, and there until the next image starts
        assert image.std() > 0 and np.abs(image - reference).max() <= 2
    finally:
        planned.unload()


# ---------------------------------------------------------------------------------------------------------------
# The budget planner under a real cap


def test_budget_plan_streams_part_of_the_unet_and_stays_under_its_cap(cuda, mid_sd, level_runs, tmp_path, monkeypatch):
    """A budget that holds the reserve and about 40% of the UNet: the plan keeps part resident, streams the rest,
    and the card (capped to the budget) never reserves more than the budget; the prediction is not below the
    measured peak (at 256² the 0.5 GiB minimum reserve is generous). The image is the unoffloaded one: streamed
    weights are complete before they are used (a prefetch racing the compute would change it)."""
    import numpy as np

    from mlnb.planner import streamer_of, streamers_of

    # The budget is sized from the anchors' reserves: a fresh card-facts cache, without the activations that the
    # level runs measured (smaller ones would let the whole UNet stay resident).
    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))
    budget = int((0.5 * GiB + 100 * MiB + 0.4 * mid_sd.unet_bytes) / 0.92)
    unload_all(cuda)
    cuda.set_memory_cap(budget)
    try:
        managed = mlnb.load_pipeline(mid_sd.folder, budget=budget, dtype="fp16", device=cuda)
        plan = managed.plan
        assert plan.strategy == "stream" and plan.streamed and plan.resident, plan
        assert "+" in managed.weights_location()["unet"]  # part on the GPU, part on the CPU
        managed.generate("warm-up", seed=0, steps=1, width=256, height=256)
        streamer = streamer_of(managed.pipe)  # the copies now overlap compute on a copy stream
        assert streamer.stream is not None and streamer.chained and len(streamer.order) == len(plan.streamed)
        assert all(s.chained and s.stream is not None for s in streamers_of(managed.pipe))  # the text encoder too
        host = [c for s in streamers_of(managed.pipe) for c in s.host_copies()]
        assert host and all(c.is_pinned() for c in host)  # packed page-locked views, not pageable originals
        assert managed.pipe.vae._mlnb_whole.unit.region.is_pinned()  # an SD VAE: one pinned region, copied whole
        result = managed.generate("a watercolor fox", seed=1, steps=4, width=256, height=256)
        assert result.images[0].size == (256, 256)
        reference = np.asarray(level_runs[L.NONE].result.images[0], dtype=np.float32)
        assert np.abs(np.asarray(result.images[0], dtype=np.float32) - reference).mean() < 2.0
        assert result.memory.peak_reserved <= budget
        assert result.predicted_peak >= result.memory.peak_allocated
        assert "predicted" in result.report_line()
    finally:
        cuda.set_memory_cap(None)
        unload_all(cuda)


def test_a_capped_streamed_loop_never_makes_the_allocator_retry(cuda, mid_sd, tmp_path, monkeypatch):
    """Expandable segments on (where the build supports them), the ring allocated once an image: over the steps
    after the first, the allocator under the plan's cap never frees its cache to retry an allocation (each retry
    synchronizes the device)."""
    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))
    unload_all(cuda)
    expandable = cuda.use_expandable_segments()
    assert expandable == bool(cuda.expandable_segments())
    budget = int((0.5 * GiB + 100 * MiB + 0.4 * mid_sd.unet_bytes) / 0.92)
    cuda.set_memory_cap(budget)
    try:
        managed = mlnb.load_pipeline(mid_sd.folder, budget=budget, dtype="fp16", device=cuda)
        assert managed.plan.strategy == "stream"
        managed.generate("warm-up", seed=0, steps=2, width=256, height=256)
        result = managed.generate("a watercolor fox", seed=1, steps=6, width=256, height=256)
        assert result.allocator_in_steps.get("num_alloc_retries") == 0, result.allocator_in_steps
        assert result.memory.peak_reserved <= budget
    finally:
        cuda.set_memory_cap(None)
        unload_all(cuda)


def test_units_streamed_through_a_cuda_ring_compute_what_they_compute_at_rest(cuda):
    """A copy stream, events made once and reused, each copy issued as its bytes free: ten steps of units streamed
    through a kept ring give the unstreamed outputs exactly (a copy racing the compute that reads its bytes would
    not)."""
    import torch

    from mlnb.planner import stream_units

    torch.manual_seed(0)
    width = 1024  # large enough that copies take longer than launching the kernels that read them
    units = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(8)).half()
    resident = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(8)).half().to(cuda.torch_device)

    class Chain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.units, self.resident = units, resident

        def forward(self, x):
            for unit, keep in zip(self.units, self.resident):
                x = torch.tanh(keep(unit(x)))
            return x

    model = Chain()
    x = torch.randn(64, width, dtype=torch.half, device=cuda.torch_device)
    units.to(cuda.torch_device)
    expected = [model(x * (i + 1)) for i in range(10)]
    units.to("cpu")
    copies = cuda.streams()
    made = []
    new_event = copies.new_event
    copies.new_event = lambda: made.append(1) or new_event()
    try:
        streamer = stream_units(model, [f"units.{i}" for i in range(8)], torch.device(cuda.torch_device), copies,
                                copies.copy_stream(), copies.host_buffer, keep_slots=True, slots=3)
        with torch.no_grad():
            model(x)  # records the order
            got = [model(x * (i + 1)) for i in range(10)]
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert len(made) == 16  # two a unit, once
        streamer.release()
        assert streamer.units_on_device() == ()
    finally:
        del copies.new_event


def test_a_budget_load_unloads_another_model_whose_weights_are_in_its_room(cuda, mid_sd, tiny_sdxl, tmp_path,
                                                                            monkeypatch):
    """Real CUDA memory: another model's resident weights leave less free than the plan needs (the card capped so);
    the load unloads that model, and its memory comes back to the card."""
    from mlnb.pipeline import cache
    from mlnb.planner import room_needed

    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))
    unload_all(cuda)
    probe = mlnb.load_pipeline(tiny_sdxl, budget=2 * GiB, dtype="fp16", device=cuda)
    needed = room_needed(probe.plan.predicted_peak)
    probe.unload()
    other = mlnb.load_pipeline(mid_sd.folder, level="none", dtype="fp16", device=cuda)
    held = cache.gpu_bytes(other)
    assert held >= mid_sd.unet_bytes
    cuda.set_memory_cap(cuda.snapshot().reserved + needed - held // 2)
    try:
        assert cuda.free_bytes() < needed
        planned = mlnb.load_pipeline(tiny_sdxl, budget=2 * GiB, dtype="fp16", device=cuda)
        assert not other.loaded and planned.loaded
        assert cuda.free_bytes() >= needed - cache.gpu_bytes(planned)
    finally:
        cuda.set_memory_cap(None)
        unload_all(cuda)


def test_a_resident_generation_times_its_blocks_and_a_three_slot_plan_gives_the_same_image(cuda, mid_sd, level_runs,
                                                                                         tmp_path, monkeypatch):
    """On CUDA the step timer's events and the block timer's give a timeline inside the step, cached for the card;
    a plan streamed through three slots (forced here) keeps the budget and the unoffloaded image."""
    import dataclasses

    import numpy as np

    from mlnb.planner import Workload, card_facts, search, streamer_of

    monkeypatch.setenv("MLNB_CACHE", str(tmp_path / "resident"))
    unload_all(cuda)
    resident = mlnb.load_pipeline(mid_sd.folder, level="none", dtype="fp16", device=cuda)
    resident.generate("warm-up", seed=0, steps=2, width=256, height=256)
    result = resident.generate("a watercolor fox", seed=1, steps=4, width=256, height=256)
    card = card_facts(cuda, resident.model_key, Workload(256, 256, 1, 4), measure=False)
    forward, rows = card.block_timeline
    assert 0 < sum(seconds for _, _, seconds in rows) <= forward <= 1.5 * result.step_seconds
    assert [start for _, start, _ in rows] == sorted(start for _, start, _ in rows)
    unload_all(cuda)
    # A fresh cache for the plan: with the reserves measured above (small at 256²) the whole UNet would fit.
    monkeypatch.setenv("MLNB_CACHE", str(tmp_path / "planned"))
    real = search.plan_for_budget
    monkeypatch.setattr(search, "plan_for_budget", lambda *a, **k: dataclasses.replace(real(*a, **k), slots=3))
    budget = int((0.5 * GiB + 100 * MiB + 0.4 * mid_sd.unet_bytes) / 0.92)
    cuda.set_memory_cap(budget)
    try:
        managed = mlnb.load_pipeline(mid_sd.folder, budget=budget, dtype="fp16", device=cuda)
        assert managed.plan.slots == 3 and managed.plan.strategy == "stream"
        managed.generate("warm-up", seed=0, steps=2, width=256, height=256)
        assert streamer_of(managed.pipe).slot_count == 3 and streamer_of(managed.pipe).chained
        streamed = managed.generate("a watercolor fox", seed=1, steps=4, width=256, height=256)
        reference = np.asarray(level_runs[L.NONE].result.images[0], dtype=np.float32)
        assert np.abs(np.asarray(streamed.images[0], dtype=np.float32) - reference).mean() < 2.0
        assert streamed.memory.peak_reserved <= budget
    finally:
        cuda.set_memory_cap(None)
        unload_all(cuda)
