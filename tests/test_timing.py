"""Step timing and the per-card timing cache the planner predicts time from (pure, and with a fake device)."""

from __future__ import annotations

import json

import pytest

from mlnb.device import Device
from mlnb.planner import StepTimer, Workload, card_facts, record_measured
from mlnb.planner.cards import cache_path
from mlnb.testing import FakeDevice

KEY = "UNet2DConditionModel-2567463684-float16"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))
    return tmp_path


def test_step_timer_median_skips_the_first_step_and_waits_for_the_device_once_at_the_end():
    ticks = iter([10.0, 10.5, 10.9, 11.4, 12.6])  # steps end at 10.0, 10.5, 10.9, 11.4; images at 12.6
    calls = []

    def clock():
        calls.append("mark")
        return next(ticks)

    timer = StepTimer(lambda: calls.append("sync"), clock=clock)
    assert timer.step_seconds is None and timer.decode_seconds is None
    for _ in range(4):
        timer.mark()
    timer.finish()
    assert timer.step_seconds == pytest.approx(0.5)  # median of 0.5, 0.4, 0.5
    assert timer.decode_seconds == pytest.approx(1.2)
    assert calls == ["mark"] * 5 + ["sync"]  # marks are queued; the one wait comes after the last


def test_step_timer_on_a_device_reads_its_marks_with_the_device():
    class Marks(FakeDevice):
        count = 0

        def timing_mark(self):
            self.count += 1
            return self.count

        def seconds_between(self, start, end):
            return 0.25 * (end - start)

    device = Marks()
    timer = StepTimer.on(device)
    timer.mark(), timer.mark(), timer.mark()
    timer.finish()
    assert timer.step_seconds == pytest.approx(0.25) and timer.decode_seconds == pytest.approx(0.25)
    assert device.synchronize_calls == 1
    cpu = StepTimer.on(Device())
    cpu.mark(), cpu.mark()
    cpu.finish()
    assert 0 <= cpu.step_seconds < 1 and 0 <= cpu.decode_seconds < 1  # the host clock where compute is synchronous


def test_one_step_gives_no_step_time():
    ticks = iter([1.0, 2.0])
    timer = StepTimer(lambda: None, clock=lambda: next(ticks))
    timer.mark()
    timer.finish()
    assert timer.step_seconds is None and timer.decode_seconds == pytest.approx(1.0)


def test_recorded_timing_is_found_exactly_and_scaled_to_other_sizes(cache):
    device = FakeDevice(name="Card A")
    work = Workload(1024, 1024, 1, 20)
    assert card_facts(device, KEY, work).step_seconds is None  # not measured yet: no time prediction
    record_measured(device, KEY, work, step_seconds=0.07, decode_seconds=0.3)
    facts = card_facts(device, KEY, work)
    assert (facts.step_seconds, facts.decode_seconds) == (0.07, 0.3)
    assert facts.bandwidth == 12e9  # measured once and cached beside it
    half = card_facts(device, KEY, Workload(1024, 512, 1, 20))
    assert half.step_seconds == pytest.approx(0.035) and half.decode_seconds == pytest.approx(0.15)
    assert card_facts(device, "another-model", work).step_seconds is None
    assert card_facts(FakeDevice(name="Card B"), KEY, work).step_seconds is None  # per card
    stored = json.loads(cache_path().read_text())
    # with the precision its decode ran in (fp16 here; SDXL's upcast VAE decodes in fp32)
    assert stored["Card A"]["measured"][KEY]["1024x1024x1"] == {"step_seconds": 0.07, "decode_seconds": 0.3,
                                                                "vae_fp32": False}


def test_a_run_without_a_decode_time_keeps_the_one_stored(cache):
    device = FakeDevice()
    work = Workload(512, 512, 1, 20)
    record_measured(device, KEY, work, step_seconds=0.02, decode_seconds=0.1)
    record_measured(device, KEY, work, step_seconds=0.025, decode_seconds=None)
    facts = card_facts(device, KEY, work)
    assert (facts.step_seconds, facts.decode_seconds) == (0.025, 0.1)


def test_an_unreadable_cache_is_treated_as_empty(cache):
    cache_path().parent.mkdir(parents=True, exist_ok=True)
    cache_path().write_text("{not json")
    device = FakeDevice()
    assert card_facts(device, KEY, Workload()).step_seconds is None
    record_measured(device, KEY, Workload(), step_seconds=0.05)
    assert card_facts(device, KEY, Workload()).step_seconds == 0.05


def test_a_decode_reserve_measured_in_fp32_is_halved_for_a_bf16_decode_and_kept_halved_when_one_is_timed(cache):
    """SDXL's VAE decodes in fp32 under plain diffusers (the bench's baseline) and in bf16 under mlnb on a card that
    computes bf16: the same activations in half the bytes. Times are used as measured until a bf16 decode is."""
    device = FakeDevice()
    fp32, bf16 = Workload(1024, 1024, 1, 20, vae_fp32=True), Workload(1024, 1024, 1, 20)
    record_measured(device, KEY, fp32, step_seconds=0.07, decode_seconds=0.17, decode_reserve=5 * 2**30)
    assert card_facts(device, KEY, fp32).decode_reserve == 5 * 2**30
    facts = card_facts(device, KEY, bf16)
    assert (facts.decode_reserve, facts.decode_seconds, facts.step_seconds) == (5 * 2**29, 0.17, 0.07)
    assert card_facts(device, KEY, Workload(512, 512, 1, 20)).decode_reserve == 5 * 2**29 // 4  # scaled too
    record_measured(device, KEY, bf16, decode_seconds_256=0.09)  # a tiled bf16 decode, no untiled reserve
    assert card_facts(device, KEY, bf16).decode_reserve == 5 * 2**29  # now stored in bf16's bytes
    assert card_facts(device, KEY, fp32).decode_reserve == 5 * 2**30
    record_measured(device, KEY, bf16, decode_reserve=2 * 2**30)  # measured in bf16: used as it is
    assert card_facts(device, KEY, bf16).decode_reserve == 2 * 2**30
    untagged = Workload(512, 512, 1, 20)
    cards = json.loads(cache_path().read_text())
    cards[device.name]["measured"]["old"] = {"512x512x1": {"decode_reserve": 2**30}}  # stored before the tag
    cache_path().write_text(json.dumps(cards))
    assert card_facts(device, "old", untagged).decode_reserve == 2**30


def test_step_timer_callback_marks_then_hands_on_the_step():
    ticks = iter([1.0, 1.5])
    timer = StepTimer(lambda: None, clock=lambda: next(ticks))
    seen = []
    callback = timer.callback(seen.append)
    kwargs = {"latents": object()}
    assert callback(None, 0, 999, kwargs) is kwargs and callback(None, 1, 998, kwargs) is kwargs
    assert seen == [0, 1] and timer.step_seconds == pytest.approx(0.5)
    assert StepTimer(lambda: None, clock=lambda: 0.0).callback()(None, 0, 1, kwargs) is kwargs


def test_activation_reserves_are_recorded_scaled_and_checked(cache):
    device = FakeDevice()
    work = Workload(1024, 1024, 1, 20)
    record_measured(device, KEY, work, step_seconds=0.07, denoise_reserve=800 * 2**20, decode_reserve=5 * 2**30)
    facts = card_facts(device, KEY, work)
    assert (facts.denoise_reserve, facts.decode_reserve) == (800 * 2**20, 5 * 2**30)
    quarter = card_facts(device, KEY, Workload(512, 512, 1, 20))
    assert (quarter.denoise_reserve, quarter.decode_reserve) == (200 * 2**20, 5 * 2**30 // 4)
    with pytest.raises(ValueError, match="unknown measurement"):
        record_measured(device, KEY, work, peak=1)


def test_step_timer_reserves_are_the_peaks_above_the_weights():
    ticks = iter([1.0, 2.0, 3.0])
    peaks = iter([7_000, 7_800])
    timer = StepTimer(lambda: None, clock=lambda: next(ticks), peak=lambda: next(peaks))
    timer.mark()
    timer.mark()
    timer.finish()
    assert timer.denoise_peak == 7_800
    assert timer.reserves(start_allocated=7_000, final_peak=12_000) == (800, 5_000)  # the decode set a new peak
    assert timer.reserves(start_allocated=7_000, final_peak=7_800) == (800, None)  # the decode needed less
    assert timer.reserves(start_allocated=None, final_peak=12_000) == (None, None)
    assert StepTimer(lambda: None).reserves(7_000, 12_000) == (None, None)  # no peak readings


def test_host_times_are_the_same_at_every_size_and_a_zero_per_unit_is_a_figure(cache):
    device = FakeDevice()
    work = Workload(1024, 1024, 1, 20)
    record_measured(device, KEY, work, step_seconds=0.07, host_forward_seconds=0.02, host_unit_seconds=0.0001)
    record_measured(device, KEY, work, host_unit_seconds=0.0)  # hooks that cost nothing replace an earlier figure
    assert card_facts(device, KEY, work).host_unit_seconds == 0.0
    quarter = card_facts(device, KEY, Workload(512, 512, 1, 20))
    assert quarter.step_seconds == pytest.approx(0.07 / 4)  # the GPU's time scales with the pixels
    assert (quarter.host_forward_seconds, quarter.host_unit_seconds) == (0.02, 0.0)  # a launch's does not
    record_measured(device, KEY, work, host_forward_seconds=0.0)  # no time to issue a forward is no measurement
    assert card_facts(device, KEY, work).host_forward_seconds == 0.02


def test_a_cards_file_with_the_retired_overlap_and_no_host_times_loads_and_drops_it_when_written(cache):
    device = FakeDevice()
    work = Workload(1024, 1024, 1, 20)
    old = {"step_seconds": 0.07, "overlap": 0.34, "unit_overhead": 0.0004}
    cache_path().write_text(json.dumps({"Fake GPU": {"bandwidth": 5e10, "measured": {KEY: {"1024x1024x1": old}}}}))
    facts = card_facts(device, KEY, work)
    assert (facts.step_seconds, facts.unit_overhead, facts.bandwidth) == (0.07, 0.0004, 5e10)
    assert facts.host_forward_seconds is None and not hasattr(facts, "overlap")
    record_measured(device, KEY, work, host_forward_seconds=0.03)
    stored = json.loads(cache_path().read_text())["Fake GPU"]["measured"][KEY]["1024x1024x1"]
    assert stored == {"step_seconds": 0.07, "unit_overhead": 0.0004, "host_forward_seconds": 0.03}
    with pytest.raises(ValueError, match="unknown measurement"):
        record_measured(device, KEY, work, overlap=0.5)


def test_block_timer_times_each_forward_s_issue_on_the_host_but_the_first_and_the_marked_one():
    """The host clock at the denoiser's pre- and post-forward hooks, nothing waited for: the first forward (set-up)
    and the one marked block by block (its marks are host work too) are left out; the median of the rest."""
    import torch

    from mlnb.planner import BlockTimer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    durations = iter([9.0, 8.0, 0.3, 0.1, 0.2])  # seconds each forward takes on the host
    now = [0.0]

    def clock():
        return now[0]

    def forward_taking(seconds):
        def pre(module, args):
            now[0] += seconds  # after the timer's pre-hook: inside the timed interval
        return pre

    blocks = {"0": model[0], "1": model[1]}
    with BlockTimer(FakeDevice(), model, blocks, forward=1, clock=clock) as timed:
        for seconds in durations:
            handle = model[0].register_forward_pre_hook(forward_taking(seconds))
            model(torch.ones(1, 4))
            handle.remove()
    assert timed.host_forward_seconds == pytest.approx(0.2)  # forwards 2, 3, 4
    assert timed.timeline() is not None
    with BlockTimer(FakeDevice(), model, None, clock=clock) as host_only:
        for seconds in (9.0, 0.5, 0.7, 0.4):
            handle = model[0].register_forward_pre_hook(forward_taking(seconds))
            model(torch.ones(1, 4))
            handle.remove()
        assert not model[0]._forward_pre_hooks and len(model._forward_pre_hooks) == 1  # the denoiser's alone
    assert host_only.host_forward_seconds == pytest.approx(0.5) and host_only.timeline() is None
    assert BlockTimer(FakeDevice(), model, None).host_forward_seconds is None  # nothing ran


def test_a_block_timeline_is_stored_read_back_and_scaled_with_the_pixels(cache):
    device = FakeDevice()
    work = Workload(1024, 1024, 1, 20)
    timeline = (0.064, (("down_blocks.0", 0.001, 0.01), ("mid_block", 0.02, 0.03)))
    record_measured(device, KEY, work, step_seconds=0.067, block_timeline=timeline)
    assert card_facts(device, KEY, work).block_timeline == timeline
    quarter = card_facts(device, KEY, Workload(512, 512, 1, 20)).block_timeline
    assert quarter[0] == pytest.approx(0.016) and quarter[1][1] == ("mid_block", 0.005, 0.0075)
    record_measured(device, KEY, work, step_seconds=0.068, block_timeline=None)  # not timed this time: kept
    assert card_facts(device, KEY, work).block_timeline == timeline
    record_measured(device, KEY, work, unit_overhead=0.0009)
    assert card_facts(device, KEY, Workload(512, 512, 1, 20)).unit_overhead == 0.0009  # per unit: not scaled
    record_measured(device, KEY, work, unit_overhead=0.0)  # nothing beyond the replay is a figure too
    assert card_facts(device, KEY, work).unit_overhead == 0.0
    stored = json.loads(cache_path().read_text())["Fake GPU"]["measured"][KEY]["1024x1024x1"]
    assert stored["block_timeline"] == [0.064, [["down_blocks.0", 0.001, 0.01], ["mid_block", 0.02, 0.03]]]
    stored["block_timeline"] = "garbled"
    cache_path().write_text(json.dumps({"Fake GPU": {"measured": {KEY: {"1024x1024x1": stored}}}}))
    assert card_facts(device, KEY, work, measure=False).block_timeline is None  # unreadable: not used


def test_step_timer_fragmentation_is_the_reserved_peak_above_the_allocated_one_over_the_loop():
    peaks, reserved = iter([7_000, 7_800]), iter([8_000, 9_000])
    timer = StepTimer(lambda: None, clock=lambda: 0.0, peak=lambda: next(peaks), reserved=lambda: next(reserved))
    assert timer.fragmentation is None
    timer.mark(), timer.mark()
    assert timer.fragmentation == 1_200
    assert StepTimer.on(FakeDevice()).fragmentation is None  # nothing read before a mark


def test_step_timer_first_seconds_run_from_the_call_s_start_to_the_first_step_s_end():
    ticks = iter([5.0, 5.8, 6.0])  # the call starts at 5.0; steps end at 5.8 and 6.0
    timer = StepTimer(lambda: None, clock=lambda: next(ticks))
    assert timer.first_seconds is None
    timer.begin()
    assert timer.first_seconds is None  # no step yet
    timer.mark(), timer.mark()
    assert timer.first_seconds == pytest.approx(0.8) and timer.step_seconds == pytest.approx(0.2)


def test_doctor_says_what_the_planner_has_measured_on_the_card(cache):
    from mlnb.cli import doctor_report
    from mlnb.device import use_device

    with use_device(FakeDevice(name="Card A")) as device:
        assert "nothing measured on Card A" in dict(doctor_report())["planner facts"]
        record_measured(device, KEY, Workload(1024, 1024, 1, 20), step_seconds=0.07,
                        block_timeline=(0.06, (("mid_block", 0.0, 0.06),)))
        record_measured(device, KEY, Workload(512, 512, 1, 20), step_seconds=0.02)
        card_facts(device, KEY, Workload())  # measures and caches the bandwidth
        line = dict(doctor_report())["planner facts"]
    assert "12.0 GB/s" in line and "step time for 2 model size(s), block timeline for 1" in line
    with use_device(Device()):
        assert dict(doctor_report())["planner facts"] == "no GPU: plans are shown, not timed"


@pytest.mark.parametrize("capability, bf16, decode", [((8, 9), "in hardware", "bf16"), ((7, 5), "emulated", "fp32")])
def test_doctor_says_whether_the_card_computes_bf16_and_so_how_sdxl_s_vae_decodes(cache, capability, bf16, decode):
    from mlnb.cli import doctor_report
    from mlnb.device import use_device

    with use_device(FakeDevice(compute_capability=capability)):
        rows = dict(doctor_report())
    assert rows["GPU"].endswith(f"bf16 {bf16}") and rows["SDXL VAE decode"].startswith(decode)


def test_the_card_facts_file_is_read_once_over_many_generations_and_predictions(tiny_sd, clean_cache, cache,
                                                                               monkeypatch):
    """A planned generation on a CUDA card asks for the card facts several times (its prediction, what it learns,
    what it records): the file is read from disk once, kept in memory and written through, and read again only when
    something else changes it on disk."""
    import pathlib

    import mlnb

    reads = []
    read_text = pathlib.Path.read_text

    def counting(self, *args, **kwargs):
        if self.name == "cards.json":
            reads.append(self)
        return read_text(self, *args, **kwargs)

    device = FakeDevice(cuda_like=True)  # measurements are recorded on a CUDA card only
    cache_path().write_text(json.dumps({device.name: {"bandwidth": 12e9}}))  # from an earlier session
    monkeypatch.setattr(pathlib.Path, "read_text", counting)
    managed = mlnb.load_pipeline(tiny_sd, budget="3GiB", device=device)
    work = Workload(64, 64, 1, 2)
    for _ in range(3):
        result = managed.generate("a fox", steps=2, width=64, height=64, seed=1)
        managed.predict(work)
    assert result.predicted_seconds is not None  # the step times recorded are used, from memory
    learnt = card_facts(device, managed.model_key, work, measure=False).step_seconds
    assert learnt > 0 and len(reads) == 1
    with open(cache_path()) as fh:  # written through: on disk as in memory
        assert json.load(fh)[device.name]["measured"][managed.model_key]["64x64x1"]["step_seconds"] == learnt
    cards = {device.name: {"measured": {managed.model_key: {"64x64x1": {"step_seconds": 12.5}}}}, "another": {}}
    cache_path().write_text(json.dumps(cards))  # another process recorded something
    assert card_facts(device, managed.model_key, work, measure=False).step_seconds == 12.5 and len(reads) == 2
