"""Host RAM while a budget plan is loaded and placed: the host holds what it pins plus a small constant, also when the
files hold another dtype than the one asked for (measured as the process's resident memory, sampled while it runs;
the GPU stood in for by the meta device and page-locked buffers by anonymous maps, as in
``scripts/host_ram_standin.py``)."""

from __future__ import annotations

import shutil
import sys
import threading

import pytest
import torch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

MiB = 2**20


def _resident() -> dict[str, int]:
    found = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                found[key] = int(rest.split()[0]) * 1024
    return found


class _Peak:
    """The peak of the process's resident memory while the block runs, sampled every millisecond."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_resident().values()))
            self._stop.wait(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, sum(_resident().values()))


@pytest.fixture(scope="module")
def wide_sd_fp16(tiny_sd, tmp_path_factory):
    """The tiny SD pipeline with a UNet of SD's 320/640 channels (about 130 MiB in fp16), saved in fp16."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    folder = tmp_path_factory.mktemp("wide") / "wide-sd-fp16"
    pipe = DiffusionPipeline.from_pretrained(tiny_sd)
    with torch.device("meta"):  # no initialisation: the values do not matter here, and a CPU is slow at it
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        )
    pipe.unet = unet.to_empty(device="cpu")
    for tensor in list(pipe.unet.parameters()) + list(pipe.unet.buffers()):
        tensor.data.fill_(0.01)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "unet", ignore_errors=True)
    pipe.unet.save_pretrained(folder / "unet", safe_serialization=True)
    return folder


def _stand_in():
    import mmap

    from mlnb.device import CopyStreams, CpuDevice

    class PinnedStandIn(CpuDevice, CopyStreams):  # the CPU, as its own copy streams with mapped host buffers
        def streams(self) -> CopyStreams:
            return self

        def host_buffer(self, nbytes: int):
            return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)

    return PinnedStandIn()


def _load_and_place(folder, monkeypatch):
    """Read ``folder`` as fp32 and place it with a plan that streams about half the UNet; (peak growth of the
    resident memory, pinned bytes, the UNet's fp32 bytes)."""
    import gc

    from fakes import tiny_stream_budget
    from mlnb.pipeline.mapped import read_pipeline
    from mlnb.planner import CardFacts, Workload, apply_plan, model_facts, plan_for_budget
    from mlnb.planner.host_memory import give_back_host_memory

    gc.collect()
    give_back_host_memory()
    start = _resident()
    with _Peak() as peak:
        pipe = read_pipeline(folder, torch.float32)
        budget = tiny_stream_budget(pipe, monkeypatch, max_block=8 * MiB)
        facts = model_facts(pipe)
        budget = facts.denoiser_other + sum(b.nbytes for b in facts.blocks) // 2 + (budget - facts.denoiser_other)
        plan = plan_for_budget(budget, facts, CardFacts(), Workload(64, 64, 1, 2))
        assert plan.strategy == "stream" and plan.offload_encoders_vae
        apply_plan(pipe, plan, "meta", use_stream=False, ctx_device=_stand_in())
    pinned = _resident()["RssShmem"] - start["RssShmem"]
    unet = sum(t.numel() * 4 for t in pipe.unet.parameters())
    assert plan.streamed_bytes < 0.7 * unet  # the kept part is a fair share
    return peak.peak - sum(start.values()), pinned, unet


def test_a_plan_placed_from_the_mapping_holds_its_pinned_bytes_plus_a_constant(wide_sd_fp16, monkeypatch):
    """fp16 files read as fp32: each part is cast as it is placed. The host peak is the pinned copies (streamed units,
    encoders, VAE) plus a small constant, not the model cast whole on the host first (which costs the whole UNet in
    fp32 plus its file's pages)."""
    from mlnb.planner.pinning import BIN_BYTES

    grown, pinned, unet = _load_and_place(wide_sd_fp16, monkeypatch)
    assert pinned > 0
    # the constant: one pinned buffer filled before its sources go back, and the pages read between two releases
    assert grown <= pinned + BIN_BYTES + 32 * MiB, (grown / MiB, pinned / MiB, unet / MiB)


def _file_rss(name: str) -> int:
    """The resident bytes of this process's mappings of files whose path ends with ``name``."""
    total, inside = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split(None, 1)[0]
            if not head.endswith(":"):  # a mapping's header: its range, flags and path
                inside = line.rstrip().endswith(name)
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


class _FilePeak(_Peak):
    """The peak of the resident pages of the mapped UNet file while the block runs."""

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _file_rss("unet/diffusion_pytorch_model.safetensors"))
            self._stop.wait(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _file_rss("unet/diffusion_pytorch_model.safetensors"))


def test_units_streamed_from_the_mapping_hold_about_one_unit_of_its_pages(wide_sd_fp16, monkeypatch):
    """With no host RAM to pin, every streamed UNet unit is copied from its file's mapping at every step (fp16 files
    cast to fp32 on the way) and its pages leave the process after each copy: over two images the UNet file's
    resident pages stay about one unit's, not the streamed bytes (which each step reads in full)."""
    import gc

    from fakes import generate_64, tiny_stream_budget
    from mlnb.pipeline.mapped import read_pipeline
    from mlnb.planner import CardFacts, Workload, apply_plan, model_facts, plan_for_budget
    from mlnb.planner.host_memory import give_back_host_memory

    pipe = read_pipeline(wide_sd_fp16, torch.float32)
    budget = tiny_stream_budget(pipe, monkeypatch, max_block=8 * MiB)
    facts = model_facts(pipe)
    budget = facts.denoiser_other + sum(b.nbytes for b in facts.blocks) // 4 + (budget - facts.denoiser_other)
    plan = plan_for_budget(budget, facts, CardFacts(), Workload(64, 64, 1, 2), host=0)
    assert plan.mapped_units == plan.streamed and plan.pinned_bytes == 0
    apply_plan(pipe, plan, "cpu", use_stream=False)
    gc.collect()
    give_back_host_memory()
    sizes = {b.name: b.nbytes for b in facts.blocks}
    largest = max(sizes[n] for n in plan.streamed) // 2  # fp16 in the file
    streamed = sum(sizes[n] for n in plan.streamed) // 2
    assert streamed > 6 * largest
    with _FilePeak() as peak:
        for _ in range(2):
            generate_64(pipe)
    assert peak.peak <= 2 * largest + 2 * MiB, (peak.peak / MiB, largest / MiB, streamed / MiB)
