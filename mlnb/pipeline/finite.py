"""``FiniteGuard``: a generation whose latents or decoded image hold NaN or inf stops with one line that names the
model, the dtype, the step and what to load instead, rather than returning a black image.

fp16 tops out at 65504. A model trained in bf16 (SD3.5, Flux) that overflows fp16 on a card without bf16, a VAE that
overflows in fp16, or weights damaged on disk all end the same way: NaN spreads through the latents and the decoded
image is black. The guard watches the latents at the end of every denoising step (through the pipeline's
``callback_on_step_end``) and the VAE decoder's output (a forward hook).

On a CUDA card the guard never waits for the GPU at a step: each step folds "is anything non-finite" into a flag
that stays on the device (a reduction and two element-wise kernels), and the host reads it twice, at the first step
(an overflow there stops a generation before its other steps run) and after the call, when the step timer has
synchronized the device anyway. On the CPU the flag is read at every step, at no cost.
"""

from __future__ import annotations

import contextlib
import logging

from ..errors import NonFiniteOutputError
from .precision import ModelFamily

logger = logging.getLogger(__name__)

__all__ = ["FiniteGuard", "non_finite_message"]

_NONE = 2**30  # the flag's value while every step so far was finite (no step has this index)


def non_finite_message(model: str, family: ModelFamily, dtype: str, step: int | None, steps: int, *,
                       cuda: bool, native_bf16: bool, card: str) -> str:
    """The one line a non-finite generation raises.

    Args:
        model: the model as loaded (hub id or folder).
        family: its :class:`~mlnb.pipeline.precision.ModelFamily`.
        dtype: ``"fp16"``, ``"bf16"`` or ``"fp32"``.
        step: the 0-based denoising step whose latents were first non-finite; None when the latents stayed finite
            and the VAE's decode was not.
        steps: the denoising steps the call runs.
        cuda: whether it ran on a CUDA card.
        native_bf16: whether that card computes bf16 in hardware.
        card: the card's name.
    """
    where = (f"at denoising step {step + 1} of {steps}" if step is not None
             else "in the VAE decode (the latents were finite)")
    if dtype == "fp32":
        advice = "fp32 does not overflow, so its weights or inputs hold NaN or inf (a damaged file or LoRA?)"
    elif dtype == "fp16" and cuda and not native_bf16:
        advice = (f"the {card} has no bf16, so it ran in fp16, which overflows past 65504; "
                  "load with dtype='fp32' (twice the memory) or use a card with bf16")
    elif dtype == "fp16" and cuda:
        advice = "load with dtype='bf16', which this card computes (fp32's range in 16 bits)"
    else:
        advice = "load with dtype='fp32'"
    return f"{family.label} {model!r} in {dtype} produced NaN or inf {where}: {advice}; the pipeline stays loaded"


class FiniteGuard:
    """Watches one generation for non-finite latents and decoded images (see the module's docstring).

    Args:
        model: the model's name, for the message.
        family: its model family.
        dtype: its compute dtype name (``"fp16"``, ``"bf16"``, ``"fp32"``).
        device: the mlnb device it runs on (its facts are read only to word an error).
        steps: the denoising steps the call runs.

    Example:
        ```python
        >>> guard = FiniteGuard(model, ModelFamily.FLUX, "fp16", device, steps=20)
        >>> with guard.watching(pipe):
        ...     images = pipe(prompt, callback_on_step_end=guard.callback()).images
        >>> guard.check()  # raises NonFiniteOutputError where the call overflowed
        ```
    """

    def __init__(self, model: str, family: ModelFamily, dtype: str, device, steps: int) -> None:
        self.model, self.family, self.dtype, self.device, self.steps = model, family, dtype, device, steps
        self._first_bad = None  # on the latents' device: the first non-finite step's index, or _NONE
        self._decode_bad = None  # on the decoder's device: whether any decoded tile was non-finite
        self._read_each_step = not device.is_cuda

    def callback(self, then=None):
        """A diffusers ``callback_on_step_end`` that folds the step's latents into the flag, then calls ``then``
        (the user's own callback), whose returned tensors the pipeline uses."""

        def on_step_end(pipe, step, timestep, callback_kwargs):
            latents = callback_kwargs.get("latents")
            if latents is not None:
                self.step(step, latents)
            if then is not None:
                return then(pipe, step, timestep, callback_kwargs)
            return callback_kwargs

        return on_step_end

    def step(self, step: int, latents) -> None:
        """Fold step ``step``'s latents into the flag; read it on the host at the first step (and at every step on
        the CPU).

        Raises:
            NonFiniteOutputError: the flag says a step so far was non-finite.
        """
        import torch

        bad = torch.isfinite(latents).logical_not().any()
        here = bad.long().mul(step - _NONE).add(_NONE)  # step where non-finite, _NONE where finite: no host copy
        self._first_bad = here if self._first_bad is None else torch.minimum(self._first_bad, here)
        if step == 0 or self._read_each_step:
            self._raise_if_bad(decode=False)

    @contextlib.contextmanager
    def watching(self, pipe):
        """Hook ``pipe``'s VAE decoder for the block: each output (a whole image, or a tile) folds into the decode
        flag."""
        decoder = getattr(getattr(pipe, "vae", None), "decoder", None)
        handle = decoder.register_forward_hook(self._decoded) if hasattr(decoder, "register_forward_hook") else None
        try:
            yield self
        finally:
            if handle is not None:
                handle.remove()

    def _decoded(self, module, args, output) -> None:
        import torch

        sample = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        if not torch.is_tensor(sample):
            return
        bad = torch.isfinite(sample).logical_not().any()
        self._decode_bad = bad if self._decode_bad is None else self._decode_bad.logical_or(bad)

    def check(self) -> None:
        """After the call (the device synchronized): raise if any step's latents or the decode were non-finite.

        Raises:
            NonFiniteOutputError: naming the model, the dtype, the first non-finite step (or the decode) and what to
                load instead.
        """
        self._raise_if_bad(decode=True)

    def _raise_if_bad(self, decode: bool) -> None:
        first = int(self._first_bad) if self._first_bad is not None else _NONE
        if first != _NONE:
            self._raise(first)
        if decode and self._decode_bad is not None and bool(self._decode_bad):
            self._raise(None)

    def _raise(self, step: int | None) -> None:
        info = self.device.info()
        message = non_finite_message(self.model, self.family, self.dtype, step, self.steps, cuda=self.device.is_cuda,
                                     native_bf16=info.native_bf16, card=info.name)
        logger.debug("%s", message)
        raise NonFiniteOutputError(message)
