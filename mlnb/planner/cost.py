"""The budget planner's cost model: what a placement of a pipeline's weights needs on the GPU and how long it takes
(pure; no torch).

A plan keeps as much of the denoiser resident on the GPU as fits beside the activation reserve and streams the rest
block by block from pinned memory through a GPU ring of two or three times the largest streamed block, each block's
copy prefetched on a copy stream as soon as its bytes in the ring are free.
Text encoders (streamed the same way) and the VAE are on the GPU only while they run, so they never add to the
denoiser's peak. VAE tiling and fp8 storage are chosen only when they are needed to fit or make the plan faster
(:mod:`mlnb.planner.search`).

Memory model (bytes), where "kept" is the denoiser's part that stays on the GPU (other + resident blocks):
    denoise peak = kept + slots × largest streamed block + denoise reserve
    decode peak  = kept + VAE + decode reserve(tile)
    encode peak  = kept + largest text encoder + 64 MiB   (the encoders run one at a time, beside the kept part;
                                                           streamed unit by unit, their slots instead)
and the largest of them must fit the budget less 8%, or less the allocator fragmentation the card measured over a
resident denoising loop of the model when that is more. A plan that offloads the VAE may send some kept blocks
(``Plan.decode_offload``) to their pinned host copy before the decode (:mod:`mlnb.planner.decode_room`); its decode
peak is then max(kept + VAE, kept − those blocks + VAE + decode reserve(tile)), the VAE arriving first.

Time model (seconds per image), from measured card facts (:mod:`mlnb.planner.cards`):
    steps × step + decode + other (+ decode_offload bytes / bandwidth: those blocks copied back once an image)
    step = max(GPU chain, host chain) + streamed units × unit_overhead
The GPU chain (:func:`step_chains`) is the measured resident step for a plan that streams nothing; for one that
streams, the steady state of :func:`schedule_step`, a replay of the streamer's copies (:mod:`mlnb.planner.streaming`)
against the card's block timeline (where each block ran in one resident forward), or without a timeline the resident
step plus every copy (streamed bytes / H2D bandwidth: nothing hidden, an upper bound). The host chain is the host's
time to issue the step: a resident forward's issue time, plus the streamer's host time per streamed unit, plus the
time between forwards; both issue times are measured on the host clock around the denoiser's forwards
(:class:`mlnb.planner.timing.BlockTimer`), and the chain is unknown (0) until then. A launch-bound step is the host
chain however fast the GPU is, and a GPU-bound one the GPU chain however cheap the hooks are. ``unit_overhead`` is
what streamed steps took beyond the larger chain, per unit (the allocator, the copy engine's own pace). decode is
the decode measured in the plan's tiles, or until then the untiled decode times the pixels its tiles cover times
:data:`TILE_TIME_FACTOR`. other is the rest of a ``generate`` call (encoding, moves, the pipeline's own work, the
cleanup) as measured by earlier generations with the encoders on the GPU or offloaded; until then the rest measured
with everything resident, plus (encoder + VAE bytes) / bandwidth for an offloaded plan.

Host RAM (:mod:`.host_ram`): a plan's pinned host copies, and its parts left in the weight files' mapping, whose
copies :func:`mapped_step` charges at the pageable bandwidth.

Until the card has measured them, the activation reserves come from the plain-diffusers peaks in the design notes
(fp16, CFG, 20 steps): SD1.5 512² peaks 0.67 GiB above its weights and SDXL 1024² 0.76 GiB with an fp16 VAE tiled at
512; SDXL's fp32 (upcast) untiled decode at 1024² peaks 5.1 GiB above the weights. They scale with pixels and batch.
The measurements behind the constants here are in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..units import GiB, MiB
from .host_ram import mapped_once_bytes, mapped_once_seconds, with_mapped
from .plan import Plan
from .ring import GROUP_SHARE, ring_layout

__all__ = [
    "Block", "ModelFacts", "CardFacts", "Workload", "Plan", "denoise_reserve", "streamed_denoise_reserve",
    "decode_reserve", "decode_phase", "room_needed", "predict", "schedule_step", "streamed_step", "step_chains",
    "step_time", "plan_step", "stored_cuts", "overlap_measured", "mapped_step", "FP8_STEP_FACTOR", "TILE_TIME_FACTOR", "TILES",
]

# A step with fp8 storage against one in fp16: every layer's weights are upcast before use.
FP8_STEP_FACTOR = 1.88
# A tiled decode takes longer than the untiled one charged the pixels its tiles cover (each tile's seams are blended
# row by row, as diffusers does): the smaller of the factors measured for SD1.5 and SDXL stands in until the card
# has decoded in the plan's tiles.
TILE_TIME_FACTOR = 1.84
_ENCODE_ACTIVATIONS = 64 * MiB
_USABLE = 0.92  # keep 8% of the budget for allocator fragmentation, or what the card measured if that is more
# A tiled decode needs more than its tiles' share of the untiled decode: a part of the decode's memory does not
# shrink with the tile.
TILE_OVERHEAD = 192 * MiB
TILES = (768, 512, 256)  # the VAE tile sizes a plan may choose, largest first
@dataclass(frozen=True)
class Block:
    """A streamable piece of the denoiser (e.g. ``down_blocks.1``), its weight bytes, and where the streamer may
    split it at the ring's end: the offsets of its tensors after the first in its packed layout (empty when unknown:
    the schedule replay then splits it nowhere)."""

    name: str
    nbytes: int
    cuts: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelFacts:
    """Weight bytes of a pipeline, in its runtime dtype.

    Args:
        encoders: bytes of each text encoder.
        vae: bytes of the VAE.
        blocks: the denoiser's streamable blocks in execution order.
        denoiser_other: denoiser bytes outside ``blocks`` (embeddings, in/out convs): always resident.
        bytes_per_param: 2 for fp16/bf16 weights (fp8 storage halves it).
        encoder_slots: when offloaded encoders are streamed unit by unit, the most one holds on the GPU at once:
            its slots, two of its largest unit (one, for an encoder streamed as a single unit), over the encoders;
            None: an offloaded encoder moves to the GPU whole.
        encoder_units: the bytes of each text encoder's streamed units, by encoder (what its pinned host copy is
            packed from); None: each encoder is counted as one unit.
    """

    encoders: dict[str, int]
    vae: int
    blocks: tuple[Block, ...]
    denoiser_other: int
    bytes_per_param: int = 2
    encoder_slots: int | None = None
    encoder_units: dict[str, tuple[int, ...]] | None = None

    @property
    def denoiser(self) -> int:
        return self.denoiser_other + sum(b.nbytes for b in self.blocks)

    @property
    def total(self) -> int:
        return sum(self.encoders.values()) + self.vae + self.denoiser


@dataclass(frozen=True)
class CardFacts:
    """Measured facts about a card for one model and size; ``None`` when not measured yet.

    ``denoise_reserve`` and ``decode_reserve`` are the activation bytes measured above the resident weights (the
    allocator's peak at the end of the denoising loop, and over the untiled decode); when known they replace the
    reserves derived from the design notes' anchors.
    """

    bandwidth: float | None = None  # pinned host-to-device bytes/s
    pageable_bandwidth: float | None = None  # host-to-device bytes/s from pageable memory (mapped weight files)
    step_seconds: float | None = None  # one denoising step, everything resident
    decode_seconds: float | None = None
    denoise_reserve: int | None = None
    decode_reserve: int | None = None  # untiled
    decode_seconds_768: float | None = None  # a decode in tiles of that many pixels
    decode_seconds_512: float | None = None
    decode_seconds_256: float | None = None
    other_seconds: float | None = None  # a generation's time besides its steps and decode, encoders on the GPU
    other_offload_seconds: float | None = None  # the same with the encoders and the VAE offloaded
    # (forward seconds, ((block, start, seconds), ...)): one resident forward, block by block, in the order they ran
    block_timeline: tuple | None = None
    # seconds a streamed step took beyond the larger of its GPU chain and its host time, per streamed unit (what
    # neither chain shows: the allocator, the copy engine's own pace)
    unit_overhead: float | None = None
    # the host's wall time to issue one resident forward of the denoiser (its kernels launched, nothing waited for)
    host_forward_seconds: float | None = None
    # the host's time per streamed unit per forward on top of that (the streamer's hooks, copies and events issued)
    host_unit_seconds: float | None = None
    # the caching allocator's reserved bytes above its allocated peak over a resident denoising loop (fragmentation)
    fragmentation_reserve: int | None = None

    def decode(self, work: "Workload", tile: int | None) -> float | None:
        """Seconds of one decode: measured in these tiles if it has been, else the untiled decode charged the pixels
        the tiles cover, times :data:`TILE_TIME_FACTOR`."""
        measured = getattr(self, f"decode_seconds_{tile}", None) if tile in TILES else None
        if measured is not None:
            return measured
        if self.decode_seconds is None:
            return None
        untiled = tile is None or tile >= max(work.width, work.height)
        share = _tiled_pixels(work, tile) / (work.width * work.height)
        return self.decode_seconds * share * (1.0 if untiled else TILE_TIME_FACTOR)


@dataclass(frozen=True)
class Workload:
    width: int = 1024
    height: int = 1024
    batch: int = 1
    steps: int = 30
    vae_fp32: bool = False  # the VAE decodes in fp32 (SDXL's force_upcast)

    @property
    def mpix(self) -> float:
        return self.width * self.height * self.batch / 2**20


def denoise_reserve(work: Workload) -> int:
    """Activation bytes of the denoising loop (CFG included), never below 0.5 GiB."""
    return int(max(0.5 * GiB, 0.76 * GiB * work.mpix))


def streamed_denoise_reserve(peak: int, start: int, slots: int, work: Workload) -> int | None:
    """The denoising loop's activation bytes as a streamed generation shows them: its peak allocated up to the last
    step, less what was on the GPU when it started (the kept part) and the streamer's slots. The peak may be the
    encoders' phase, so this is an upper bound; it stands in for the anchors' :func:`denoise_reserve` only when it is
    below it, until a resident run measures the reserve itself. None when it says nothing below the anchor."""
    reserve = peak - start - slots
    return reserve if 0 < reserve < denoise_reserve(work) else None


def decode_reserve(work: Workload, tile: int | None) -> int:
    """Activation bytes of the VAE decode, untiled or in ``tile``-pixel tiles (fp32 decode costs twice fp16)."""
    per_mpix = 5.1 * GiB if work.vae_fp32 else 2.55 * GiB
    if tile is None:
        return int(per_mpix * work.mpix)
    one_tile = min(tile * tile / 2**20, work.width * work.height / 2**20)
    return int(per_mpix * one_tile) + TILE_OVERHEAD


def _tiled_pixels(work: Workload, tile: int | None) -> int:
    """Pixels a decode in ``tile``-pixel tiles computes. diffusers' ``tiled_decode`` starts a tile every three
    quarters of a tile, from 0 for as long as the start is inside the image, and cuts each at the image's edge: at
    1024 px in 256 px tiles, 6 tiles a side (the last 64 px wide), not the 5 that cover it."""
    if tile is None or tile >= max(work.width, work.height):
        return work.width * work.height
    stride = int(tile * 0.75)

    def covered(side: int) -> int:
        return sum(min(tile, side - start) for start in range(0, side, stride))

    return covered(work.width) * covered(work.height)


def overlap_measured(compute: float, copies: float, step: float) -> float:
    """The fraction of ``min(compute, copies)`` that a streamed step of ``step`` seconds hid, in [0, 1]: a figure
    for reading a measurement (``scripts/diagnose_streaming.py`` prints it), not part of the time model."""
    shorter = min(compute, copies)
    if shorter <= 0:
        return 0.0
    return max(0.0, min(1.0, (compute + copies - step) / shorter))


def schedule_step(forward: float, blocks, between: float, copies: dict[str, float], slots: int = 2,
                  steps: int = 8, sizes: dict[str, int] | None = None, cuts: dict[str, tuple] | None = None,
                  group_share: float = GROUP_SHARE) -> float:
    """Seconds of one denoising step with the blocks in ``copies`` streamed, replaying the streamer's schedule
    (:mod:`mlnb.planner.streaming`, :mod:`mlnb.planner.ring`) against one measured resident forward.

    Args:
        forward: seconds of the resident forward.
        blocks: ``(name, start, seconds)`` of each block in that forward, in the order they ran (starts from the
            forward's start; the time between blocks is compute outside them: embeddings, convs, norms).
        between: seconds from a forward's end to the next one's start (the scheduler's step).
        copies: seconds of each streamed block's copy.
        slots: the ring holds ``slots`` of the largest streamed block.
        steps: steps replayed; the first (whose copies start with nothing before them) is left out.
        sizes: bytes of each streamed block (the streamer's layout sizes); without them, the copy seconds stand in
            (the same layout when every byte copies at one bandwidth).
        cuts: per streamed block, in bytes with ``sizes``: where a split across the ring's end may fall (a block
            missing from it is not split).
        group_share: the streamer's limit on a group's bytes, as a share of the ring (:data:`.ring.GROUP_SHARE`).

    The streamed blocks sit in the ring at fixed offsets in running order (:func:`.ring.ring_layout`); streamed blocks
    with no other block between them form the streamer's groups. One copy engine moves one unit at a time, in running
    order. A copy starts once the engine is free and the group of the latest earlier block whose bytes it overwrites
    has computed (a block that shares its bytes with no other is copied in the first forward only). A group's first
    block computes once the compute before it and its group's copies are done.
    """
    if steps < 2 or slots < 1:
        raise ValueError(f"schedule_step replays at least 2 steps (the first is left out) through at least 1 slot, "
                         f"got steps={steps}, slots={slots}")
    order = [name for name, _, _ in blocks if name in copies]
    if not order:
        return forward + between
    if sizes is None:  # copy seconds in picoseconds: whole numbers the layout can add up
        sizes = {name: max(1, round(copies[name] * 1e12)) for name in order}
    streamed = [name in copies for name, _, _ in blocks] + [False]
    ring = ring_layout([sizes[name] for name in order], slots * max(sizes[name] for name in order),
                       cuts=cuts and [cuts.get(name, ()) for name in order], group_share=group_share,
                       adjacent=[streamed[i + 1] for i in range(len(blocks)) if streamed[i]])  # the next one streams
    last_of = dict(ring.groups)  # a group's first use in a forward -> its last
    count = len(order)
    done: list[float] = []  # when each use (a streamed block's run, counted across steps) computed
    arrived: dict[int, float] = {}  # use -> when its copy was in
    engine, issued = 0.0, 0  # the copy engine's free time; the next use whose copy is considered

    def arrival(use: int) -> float:
        nonlocal engine, issued
        if not ring.needs_copy(use):  # still in place since its first forward
            return arrived[use % count]
        while issued <= use:
            if ring.needs_copy(issued):
                blocker = ring.blocker(issued)
                engine = max(engine, done[blocker] if blocker is not None else 0.0) + copies[order[issued % count]]
                arrived[issued] = engine
            issued += 1
        return arrived[use]

    clock, starts = 0.0, []
    for _ in range(steps):
        starts.append(clock)
        last_end = 0.0
        for name, start, seconds in blocks:
            clock += max(0.0, start - last_end)
            last_end = start + seconds
            if name in copies and (use := len(done)) % count in last_of:  # a group starts: all its copies in
                clock = max([clock] + [arrival(u) for u in range(use, use + last_of[use % count] - use % count + 1)])
            clock += seconds
            if name in copies:
                done.append(clock)
        clock += max(0.0, forward - last_end) + between
    return (clock - starts[1]) / (steps - 1)


def replayed_step(card: CardFacts, sizes: dict[str, int], streamed, slots: int, fp8: bool,
                  calibrated: bool = True, cuts: dict[str, tuple[int, ...]] | None = None) -> float | None:
    """A step streaming ``streamed`` (of ``sizes`` bytes each) through ``slots``, replayed against the card's block
    timeline (None without one that has every streamed block); a block is split at the ring's end where ``cuts``
    (:func:`stored_cuts`) lets it, as the streamer splits it."""
    if card.block_timeline is None or not card.bandwidth or card.step_seconds is None or not streamed:
        return None
    forward, rows = card.block_timeline
    if not set(streamed) <= {name for name, _, _ in rows}:
        return None
    factor = FP8_STEP_FACTOR if fp8 else 1.0
    between = max(0.0, card.step_seconds - forward)
    rows = [(name, start * factor, seconds * factor) for name, start, seconds in rows]
    step = schedule_step(forward * factor, rows, between, {n: sizes[n] / card.bandwidth for n in streamed}, slots,
                         sizes={n: sizes[n] for n in streamed}, cuts=cuts)
    return step + len(streamed) * (card.unit_overhead or 0.0) if calibrated else step


def step_chains(card: CardFacts, sizes: dict[str, int], streamed, slots: int, fp8: bool,
                cuts: dict[str, tuple[int, ...]] | None = None) -> tuple[float | None, float | None]:
    """``(GPU chain, host chain)``: the seconds one denoising step streaming ``streamed`` (of ``sizes`` bytes each)
    through ``slots`` keeps the GPU busy, and the seconds the host takes to issue it.

    The GPU chain is the resident step for a plan that streams nothing, else the schedule replay against the card's
    block timeline (:func:`replayed_step`), or without a timeline the resident step plus every copy (an upper bound:
    nothing hidden). The host chain is the resident forward's issue time plus the streamer's host time per unit for
    each streamed unit, plus the time between forwards (the scheduler's step, as the GPU measured it: the host
    issues it too); None until the card has measured a forward's issue time. Both None before a step is measured;
    the GPU chain None for a streamed plan without the bandwidth."""
    if card.step_seconds is None:
        return None, None
    between = 0.0
    if card.block_timeline is not None:
        between = max(0.0, card.step_seconds - card.block_timeline[0])
    host = None
    if card.host_forward_seconds is not None:
        host = card.host_forward_seconds + len(streamed) * (card.host_unit_seconds or 0.0) + between
    gpu = card.step_seconds * (FP8_STEP_FACTOR if fp8 else 1.0)
    if streamed:
        gpu = replayed_step(card, sizes, streamed, slots, fp8, calibrated=False, cuts=cuts)
        if gpu is None:
            if not card.bandwidth:
                return None, host
            gpu = card.step_seconds * (FP8_STEP_FACTOR if fp8 else 1.0) + sum(sizes[n] for n in streamed) / card.bandwidth
    return gpu, host


def step_time(card: CardFacts, sizes: dict[str, int], streamed, slots: int, fp8: bool,
              cuts: dict[str, tuple[int, ...]] | None = None) -> float | None:
    """The time model's step: the larger of the GPU chain and the host chain (:func:`step_chains`), plus, per
    streamed unit, what streamed generations measured beyond that (``unit_overhead``); None without a GPU chain."""
    gpu, host = step_chains(card, sizes, streamed, slots, fp8, cuts)
    if gpu is None:
        return None
    step = max(gpu, host or 0.0)
    return step + len(streamed) * (card.unit_overhead or 0.0) if streamed else step


def streamed_step(plan: "Plan", model: ModelFacts, card: CardFacts, calibrated: bool = True) -> float | None:
    """The step ``plan`` is predicted to take by replaying its copies against the card's block timeline; None for a
    plan that streams nothing, or without a timeline. With ``calibrated``, the larger of that replay and the host
    chain, plus the measured ``unit_overhead`` per streamed unit (:func:`step_time`); without it, the replay alone.
    An overhead per unit, not a ratio: a ratio measured on a plan streaming 48 units would also scale the compute of
    a plan streaming two."""
    sizes, _, _ = stored_bytes(model, plan.fp8)
    cuts = stored_cuts(model, plan.fp8) if plan.split_units else None
    if plan.mapped_units:  # the replay of the pinned units, and the mapped ones' copies beside it
        if replayed_step(card, sizes, plan.streamed, plan.slots, plan.fp8, calibrated=False, cuts=cuts) is None:
            return None
        return mapped_step(card, sizes, plan.streamed, plan.slots, plan.fp8, plan.mapped_units, calibrated, cuts)
    replay = replayed_step(card, sizes, plan.streamed, plan.slots, plan.fp8, calibrated=False, cuts=cuts)
    if replay is None or not calibrated:
        return replay
    return step_time(card, sizes, plan.streamed, plan.slots, plan.fp8, cuts)


def seconds_per_image(card: CardFacts, work: Workload, step: float | None, transfer_once: int,
                      tile: int | None = None, decode_offload: int = 0) -> float | None:
    """The time model: seconds of one image of ``step``-second steps (:func:`step_time`) that moves
    ``transfer_once`` bytes once (the offloaded encoders and VAE) and copies ``decode_offload`` bytes of the kept
    part back after the decode sent them to the host; None without a step (or the bandwidth those moves need)."""
    if step is None:
        return None
    seconds = work.steps * step + (card.decode(work, tile) or 0.0)
    if decode_offload:  # copied back for the next image, charged whole (it may hide under the encoders)
        if not card.bandwidth:
            return None
        seconds += decode_offload / card.bandwidth
    other = card.other_offload_seconds if transfer_once else card.other_seconds
    if other is not None:  # measured: encoding, moves, the pipeline's own work, the cleanup
        return seconds + other
    if transfer_once:  # not yet measured with them offloaded: the encoders and VAE copied in, beside the rest
        if not card.bandwidth:
            return None
        seconds += transfer_once / card.bandwidth + (card.other_seconds or 0.0)
    return seconds


def stored_bytes(model: ModelFacts, fp8: bool) -> tuple[dict[str, int], int, int]:
    """Block bytes, other bytes and denoiser bytes as stored (fp8 halves the denoiser)."""
    scale = 0.5 if fp8 else 1.0
    blocks = {b.name: int(b.nbytes * scale) for b in model.blocks}
    other = int(model.denoiser_other * scale)
    return blocks, other, other + sum(blocks.values())


def stored_cuts(model: ModelFacts, fp8: bool) -> dict[str, tuple[int, ...]]:
    """Where each block may be split at the ring's end, in its stored bytes (fp8 halves them, as it halves the
    block)."""
    scale = 0.5 if fp8 else 1.0
    return {b.name: tuple(int(cut * scale) for cut in b.cuts) for b in model.blocks if b.cuts}


def reserves(work: Workload, tile: int | None, card: CardFacts | None) -> tuple[int, int]:
    """Denoise and decode activation bytes: measured on this card when known, else from the anchors."""
    den_res = card.denoise_reserve if card is not None and card.denoise_reserve else denoise_reserve(work)
    if card is not None and card.decode_reserve:
        if tile is None:
            return den_res, card.decode_reserve
        share = min(1.0, tile * tile / (work.width * work.height))
        return den_res, min(card.decode_reserve, int(card.decode_reserve * share) + TILE_OVERHEAD)
    return den_res, decode_reserve(work, tile)


def phase_terms(model: ModelFacts, tile: int | None, work: Workload, card: CardFacts | None) -> tuple[int, int, int]:
    """``(encode, decode, denoise)``: what each phase needs on the GPU besides the denoiser's kept part (the
    denoise term without the streamed blocks' slots)."""
    enc_max = max(model.encoders.values(), default=0)
    if model.encoder_slots:
        enc_max = min(enc_max, model.encoder_slots)  # streamed: the unit computing and the one arriving
    den_res, dec = reserves(work, tile, card)
    return enc_max + _ENCODE_ACTIVATIONS, model.vae + dec, den_res


def decode_phase(decode: int, vae: int, offloaded: int) -> int:
    """What the decode phase needs beside the kept part when ``offloaded`` bytes of it go to the host first: the VAE
    arrives beside the whole kept part, and the decode's activations only once those bytes have left."""
    return max(vae, decode - offloaded) if offloaded else decode


def peak_bytes(strategy: str, model: ModelFacts, fp8: bool, tile: int | None, resident: tuple[str, ...],
               streamed: tuple[str, ...], work: Workload, card: CardFacts | None = None, slots: int = 2,
               decode_offload: tuple[str, ...] = ()) -> int:
    """The memory model: the peak of a placement, the largest of its encode, denoise and decode phases (the
    decode's without the kept blocks ``decode_offload``, which go to the host before it)."""
    blocks, other, denoiser = stored_bytes(model, fp8)
    encode, decode, den_res = phase_terms(model, tile, work, card)
    decode = decode_phase(decode, model.vae, sum(blocks[n] for n in decode_offload))
    if strategy == "resident":
        return model.total - (model.denoiser - denoiser) + max(den_res, decode - model.vae)
    if strategy == "offload encoders and VAE":
        return denoiser + max(encode, den_res, decode)
    res_bytes = other + sum(blocks[n] for n in resident)
    return res_bytes + max(encode, decode, slots * max((blocks[n] for n in streamed), default=0) + den_res)


def plan_step(plan: Plan, model: ModelFacts, card: CardFacts) -> float | None:
    """``plan``'s step by the time model (:func:`step_time`, with its mapped units as :func:`mapped_step` charges
    them)."""
    sizes, _, _ = stored_bytes(model, plan.fp8)
    return mapped_step(card, sizes, plan.streamed, plan.slots, plan.fp8, plan.mapped_units,
                       cuts=stored_cuts(model, plan.fp8) if plan.split_units else None)


def mapped_step(card: CardFacts, sizes: dict[str, int], streamed, slots: int, fp8: bool, mapped=(),
                calibrated: bool = True, cuts: dict[str, tuple[int, ...]] | None = None) -> float | None:
    """The step streaming ``streamed`` with the units ``mapped`` copied from the weight files' mapping: the step of
    the pinned units alone (:func:`step_time`; without ``calibrated``, the bare replay), plus the mapped units'
    copies (:func:`.host_ram.with_mapped`)."""
    left = set(mapped)
    pinned = tuple(n for n in streamed if n not in left)
    if calibrated:
        step = step_time(card, sizes, pinned, slots, fp8, cuts)
    else:
        step = (replayed_step(card, sizes, pinned, slots, fp8, calibrated=False, cuts=cuts) if pinned
                else step_chains(card, sizes, (), slots, fp8)[0])
    return with_mapped(card, step, sum(sizes[n] for n in left), len(left), calibrated)


def predict(plan: Plan, model: ModelFacts, card: CardFacts, work: Workload) -> tuple[int, float | None]:
    """``(peak bytes, seconds per image)`` of ``plan`` for ``work`` (another size, batch or step count than it was
    made for) with ``card``'s current facts, by the same formulas that chose it."""
    peak = peak_bytes(plan.strategy, model, plan.fp8, plan.vae_tile, plan.resident, plan.streamed, work, card,
                      plan.slots, plan.decode_offload)
    seconds = seconds_per_image(card, work, plan_step(plan, model, card), plan.transfer_once_bytes, plan.vae_tile,
                                plan.decode_offload_bytes)
    once = mapped_once_seconds(card, mapped_once_bytes(plan, model))
    return peak, (seconds + once if seconds is not None and once is not None else None)


def room_needed(peak: int, card: CardFacts | None = None) -> int:
    """The free bytes a plan that peaks at ``peak`` needs: the peak and the margin plans keep (8%, or the
    fragmentation the card measured when that is more)."""
    fragmentation = (card.fragmentation_reserve if card is not None else None) or 0
    return math.ceil(max(peak / _USABLE, peak + fragmentation))


def usable_bytes(budget: int, card: CardFacts) -> float:
    """The bytes a plan may allocate at its peak: the budget less 8%, or less the fragmentation the card measured for
    this model's denoising loop when that is more (under a cap, an allocation the allocator has no room to reserve
    makes it free its cache and retry, which synchronizes the device)."""
    return budget - max(budget * (1 - _USABLE), card.fragmentation_reserve or 0)
