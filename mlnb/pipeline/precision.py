"""The compute dtype per card and model family, and the fp32 modules a text encoder keeps in fp16.

:func:`choose_dtype` is the whole policy, pure (no torch):

=========================================  ==================  ==========  ==========  ================
card                                       UNet (SD1.5, SDXL)  SD3, SD3.5  Flux        other transformer
=========================================  ==================  ==========  ==========  ================
no CUDA card (CPU)                         fp32                fp32        fp32        fp32
bf16 in hardware (compute capability 8.0+) fp16                bf16        bf16        bf16
no bf16 in hardware (a T4: 7.5; a V100)    fp16                fp16        fp16        fp16
=========================================  ==================  ==========  ==========  ================

SD3.5 and Flux were trained in bf16, which has fp32's range; fp16 tops out at 65504. They run in fp16 on a card
without bf16 because the libraries keep the overflow-prone parts finite: transformers loads T5's feed-forward output
projection (``wo``) in fp32 (``T5PreTrainedModel._keep_in_fp32_modules``) and clamps T5's hidden states in fp16, and
diffusers clips Flux's residual streams to ±65504 in fp16. :func:`restore_fp32_modules` keeps the first of these true
for an encoder that was cast to fp16 after loading. What still overflows is caught by
:class:`~mlnb.pipeline.finite.FiniteGuard` as a one-line error.

A dtype given explicitly is respected: bf16 on a card that only emulates it (a T4) is said once to be slow, and bf16
on a card that cannot compute it is refused in one line.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from enum import Enum

from ..errors import InvalidArgumentError

logger = logging.getLogger(__name__)

__all__ = [
    "ModelFamily", "model_family", "pipeline_family", "DtypeChoice", "choose_dtype", "say_once", "restore_fp32_modules",
]

_NATIVE_BF16 = (8, 0)  # compute capability from which the tensor cores compute bf16 (Ampere)
_said: set[str] = set()
_said_lock = threading.Lock()


class ModelFamily(str, Enum):
    """What a pipeline's denoiser is, as far as its compute dtype goes."""

    UNET = "unet"  # SD1.5, SD2, SDXL: trained and run in fp16
    SD3 = "sd3"  # SD3 and SD3.5 (MMDiT)
    FLUX = "flux"  # FLUX.1 and its kin
    TRANSFORMER = "transformer"  # another transformer denoiser

    @property
    def label(self) -> str:
        return {"unet": "UNet", "sd3": "SD3", "flux": "Flux", "transformer": "the transformer"}[self.value]


def model_family(index: dict | None) -> ModelFamily:
    """The family of the pipeline a ``model_index.json`` describes: its denoiser's class decides. An index not at
    hand (a hub model not in the cache) or without a denoiser counts as a UNet, which fp16 serves everywhere.

    Args:
        index: the pipeline's ``model_index.json`` as a dict, or None.

    Example:
        ```python
        >>> model_family({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]})
        <ModelFamily.FLUX: 'flux'>
        ```
    """
    if not index:
        return ModelFamily.UNET
    spec = index.get("transformer")
    if "unet" in index or not isinstance(spec, list) or len(spec) != 2 or not spec[1]:
        return ModelFamily.UNET
    name = str(spec[1])
    if name.startswith("SD3"):
        return ModelFamily.SD3
    if name.startswith("Flux"):
        return ModelFamily.FLUX
    return ModelFamily.TRANSFORMER


def pipeline_family(pipe) -> ModelFamily:
    """The :class:`ModelFamily` of a loaded pipeline, from its denoiser's class."""
    if getattr(pipe, "unet", None) is not None:
        return ModelFamily.UNET
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return ModelFamily.UNET
    return model_family({"transformer": ["diffusers", type(transformer).__name__]})


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a pipeline loads in, and why.

    Attributes:
        dtype: ``"fp16"``, ``"bf16"`` or ``"fp32"``.
        reason: one line saying why (logged at DEBUG).
        warning: a line to say once to the user (a slow choice), or None.
    """

    dtype: str
    reason: str
    warning: str | None = None


def choose_dtype(family: ModelFamily, *, cuda: bool, compute_capability: tuple[int, int] | None = None,
                 bf16_works: bool = True, requested: str | None = None, card: str = "this card") -> DtypeChoice:
    """The compute dtype for a model ``family`` on a card (the table in this module's docstring).

    Args:
        family: the pipeline's :class:`ModelFamily`.
        cuda: whether compute runs on a CUDA card (False: the CPU).
        compute_capability: the card's; 8.0 and up compute bf16 in hardware.
        bf16_works: whether torch computes bf16 on the card at all (emulated below 8.0).
        requested: ``"fp16"``, ``"bf16"`` or ``"fp32"`` as the user gave it, or None for the default.
        card: the card's name, for the lines.

    Raises:
        InvalidArgumentError: bf16 requested on a CUDA card that cannot compute it.

    Example:
        ```python
        >>> choose_dtype(ModelFamily.FLUX, cuda=True, compute_capability=(7, 5)).dtype
        'fp16'
        ```
    """
    native = cuda and compute_capability is not None and tuple(compute_capability) >= _NATIVE_BF16
    where = f"{card} (compute capability {'.'.join(map(str, compute_capability))})" if compute_capability else card
    if requested is not None:
        if requested not in ("fp16", "bf16", "fp32"):
            raise InvalidArgumentError(f"unknown dtype {requested!r}: use fp16, bf16 or fp32")
        if requested == "bf16" and cuda and not native:
            if not bf16_works:
                raise InvalidArgumentError(f"dtype bf16: {where} cannot compute bf16; use dtype='fp16'")
            return DtypeChoice("bf16", "bf16 as requested", (
                f"dtype bf16 on {where}: it has no bf16 in hardware and torch emulates it, several times slower "
                "than fp16; dtype='fp16' (the default here) is faster"))
        return DtypeChoice(requested, f"{requested} as requested")
    if not cuda:
        return DtypeChoice("fp32", "fp32 on the CPU (fp16 and bf16 matmuls are slow there)")
    if family is ModelFamily.UNET:
        return DtypeChoice("fp16", "fp16: UNet pipelines are trained and run in fp16")
    if native:
        return DtypeChoice("bf16", f"bf16: {family.label} was trained in bf16 and {where} computes it in hardware")
    return DtypeChoice("fp16", f"fp16: {where} has no bf16 in hardware; the libraries' fp16 safeguards hold "
                               f"{family.label} finite, and the finiteness guard names a step that is not")


def say_once(choice: DtypeChoice) -> None:
    """Log ``choice``'s warning as a warning the first time it comes up in this process, at DEBUG after."""
    if choice.warning is None:
        logger.debug("dtype %s", choice.reason)
        return
    with _said_lock:
        first = choice.warning not in _said
        _said.add(choice.warning)
    logger.log(logging.WARNING if first else logging.DEBUG, "%s", choice.warning)


def restore_fp32_modules(pipe) -> list[str]:
    """Put back in fp32 the modules a component's class keeps in fp32 when loaded in fp16 (transformers'
    ``_keep_in_fp32_modules``, e.g. T5's ``wo``), where a component reached the pipeline cast to fp16 after loading
    (passed in as ``text_encoder_3=...``, or ``.to(torch.float16)``). T5's forward casts its input to ``wo``'s dtype,
    so the fp32 copy computes without further change. Returns ``component.module`` for each module restored.

    Args:
        pipe: a diffusers pipeline.
    """
    import torch

    restored = []
    for name, component in getattr(pipe, "components", {}).items():
        keep = getattr(component, "_keep_in_fp32_modules", None)
        if not keep or not isinstance(component, torch.nn.Module) or getattr(component, "dtype", None) != torch.float16:
            continue
        for path, module in component.named_modules():
            if path.rsplit(".", 1)[-1] not in keep:
                continue
            if any(p.dtype == torch.float16 for p in module.parameters(recurse=False)):
                module.to(torch.float32)
                restored.append(f"{name}.{path}")
    if restored:
        logger.info("kept in fp32 as the model declares (overflows fp16): %s", _summary(restored))
    return restored


def _summary(names: list[str]) -> str:
    return ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")
