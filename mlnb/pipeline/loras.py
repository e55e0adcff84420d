"""A LoRA as the user gives it: a typed spec, the weights file it names, and that file checked against a pipeline.

Everything here runs before a LoRA touches a pipeline, and each failure is one line that names the LoRA: a scale
that is not a finite number, a missing file, a folder that holds no weights file or several, a pickle file without
``allow_pickle`` (pickle can run code when loaded, the rule mlnb keeps for models), a hub id with no hub, a corrupt
file, a file that is not a LoRA, and a LoRA for another architecture (the first module it targets that the pipeline
lacks, or whose shape differs). :mod:`.adapters` applies the checked LoRAs.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidArgumentError, ModelLoadError, ModelNotFoundError, OfflineError, UnsafeWeightsError

__all__ = ["LoraSpec", "LoraFile", "LoraWeights", "parse_loras", "resolve_lora", "read_lora", "check_lora"]

_SAFE = ".safetensors"
_PICKLE = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _scale(value, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"LoRA {source!r}: scale must be a number, got {value!r}")
    scale = float(value)
    if not math.isfinite(scale):
        raise InvalidArgumentError(f"LoRA {source!r}: scale must be a finite number, got {value!r}")
    return scale


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA as the user asked for it: where it is and how strongly it applies.

    Args:
        source: a ``.safetensors`` file, a folder holding one, or a hub id (``org/name``).
        scale: the adapter's weight (1 applies it as trained, 0 leaves the image as without it); a finite number.

    Example:
        ```python
        >>> LoraSpec.parse("styles/ink.safetensors:0.7")
        LoraSpec(source='styles/ink.safetensors', scale=0.7)
        ```
    """

    source: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise InvalidArgumentError(f"a LoRA is a file, a folder or a hub id, got {self.source!r}")
        object.__setattr__(self, "scale", _scale(self.scale, self.source))

    @classmethod
    def parse(cls, value) -> LoraSpec:
        """A spec from what a user writes: a path or hub id (``str`` or ``os.PathLike``), ``(path, scale)``, the
        magic's ``PATH[:SCALE]`` or a ``LoraSpec``.

        In ``PATH[:SCALE]`` the scale is what follows the last ``:`` when that is a number and the whole text is
        not an existing path, so Windows drive letters (``C:\\loras\\ink.safetensors``) and paths with ``:`` in
        them stay paths. A number that is not finite (``nan``, ``inf``) is refused, and so is a text after a
        weights file's name that is not a number (``ink.safetensors:strong``).
        """
        if isinstance(value, LoraSpec):
            return value
        if isinstance(value, tuple):
            if len(value) != 2:
                raise InvalidArgumentError(f"a LoRA given as a tuple is (path, scale), got {value!r}")
            source, scale = value
            if not isinstance(source, (str, os.PathLike)):
                raise InvalidArgumentError(f"a LoRA's path is a str or a path, got {source!r}")
            return cls(os.fspath(source).strip(), scale)
        if isinstance(value, os.PathLike):
            return cls(os.fspath(value).strip())
        if isinstance(value, str):
            return cls(*_split_scale(value.strip()))
        raise InvalidArgumentError(
            f"a LoRA is a path, a hub id, (path, scale) or 'PATH:SCALE', got {type(value).__name__} {value!r}"
        )

    def __str__(self) -> str:
        """As the magic takes it back: ``PATH`` at scale 1, ``PATH:SCALE`` otherwise."""
        return self.source if self.scale == 1 else f"{self.source}:{self.scale:g}"


def _split_scale(text: str) -> tuple[str, float]:
    head, sep, tail = text.rpartition(":")
    if not sep or not head or Path(text).expanduser().exists():
        return text, 1.0
    if len(head) == 1 and head.isalpha():  # a drive letter: ``C:`` ...
        return text, 1.0
    try:
        scale = float(tail)
    except ValueError:
        names_a_file = head.lower().endswith((_SAFE,) + _PICKLE) or Path(head).expanduser().exists()
        if names_a_file and not any(c in tail for c in "/\\"):
            raise InvalidArgumentError(
                f"LoRA {text!r}: the scale after ':' must be a finite number, got {tail!r}"
            ) from None
        return text, 1.0
    if not math.isfinite(scale):
        raise InvalidArgumentError(f"LoRA {head!r}: scale must be a finite number, got {tail!r}")
    return head, scale


def parse_loras(loras) -> tuple[LoraSpec, ...]:
    """The specs of a ``loras=`` argument: None, one LoRA, or a list of them (see :meth:`LoraSpec.parse`).

    Raises:
        InvalidArgumentError: a LoRA that does not parse, or the same source twice.
    """
    if loras is None:
        return ()
    one = isinstance(loras, (str, os.PathLike, LoraSpec)) or (
        isinstance(loras, tuple) and len(loras) == 2 and isinstance(loras[1], numbers.Real)
        and not isinstance(loras[1], bool)
    )
    specs = (LoraSpec.parse(loras),) if one else tuple(LoraSpec.parse(v) for v in loras)
    seen: set[str] = set()
    for spec in specs:
        if spec.source in seen:
            raise InvalidArgumentError(f"LoRA {spec.source!r} is given twice: give it once, with the scale you want")
        seen.add(spec.source)
    return specs


@dataclass(frozen=True)
class LoraFile:
    """A spec's weights file on this machine (a hub LoRA once downloaded).

    Args:
        spec: what the user asked for.
        path: the weights file (absolute).
        pickle: the file is a pickle file (read only with ``allow_pickle``).
    """

    spec: LoraSpec
    path: Path
    pickle: bool = False

    @property
    def identity(self) -> tuple[str, int, int]:
        """The file as it is now (path, size, modification time): a file changed on disk is another LoRA."""
        stat = self.path.stat()
        return str(self.path), stat.st_size, stat.st_mtime_ns

    @property
    def shown(self) -> str:
        """The LoRA as the user named it, for messages."""
        return self.spec.source


def _pickle_refusal(what: str) -> UnsafeWeightsError:
    return UnsafeWeightsError(
        f"{what}; pickle can run code when loaded: pass allow_pickle=True (%%generate --allow-pickle) only if you "
        "trust this LoRA"
    )


def _weights_in(folder: Path, shown: str, allow_pickle: bool) -> tuple[Path, bool]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for suffixes, pickled in (((_SAFE,), False), (_PICKLE, True)):
        found = [p for p in files if p.name.lower().endswith(suffixes)]
        if len(found) == 1:
            if pickled and not allow_pickle:
                raise _pickle_refusal(f"LoRA {shown!r} holds a pickle file ({found[0].name}) and no safetensors file")
            return found[0], pickled
        if found:
            names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
            raise InvalidArgumentError(
                f"LoRA folder {shown!r} holds {len(found)} weights files ({names}): give the file, "
                f"e.g. {shown}/{found[0].name}"
            )
    raise ModelNotFoundError(f"LoRA folder {shown!r} holds no .safetensors file")


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith(("/", "./", "../", "~", "\\", "."))
        or "\\" in text
        or text.lower().endswith((_SAFE,) + _PICKLE)
        or (len(text) > 1 and text[1] == ":")
        or not _HUB_ID.match(text)
    )


def resolve_lora(spec: LoraSpec, allow_pickle: bool = False) -> LoraFile:
    """Find the weights file of ``spec``: the file itself, the one weights file in a folder, or a hub repository's
    one weights file (downloaded, or from the cache when offline).

    Args:
        spec: the LoRA.
        allow_pickle: accept a pickle file (``.bin``, ``.pt``, ``.ckpt``, ...) when there is no safetensors file.

    Raises:
        ModelNotFoundError: no such file, folder or hub repository, or a folder without weights.
        UnsafeWeightsError: only a pickle file, and ``allow_pickle`` was not given.
        InvalidArgumentError: a file that is not a weights file, or a folder holding several.
        OfflineError: a hub id while the hub cannot be reached and the LoRA is not in the cache.
    """
    text = spec.source
    path = Path(text).expanduser()
    if path.is_file():
        name = path.name.lower()
        if name.endswith(_PICKLE):
            if not allow_pickle:
                raise _pickle_refusal(f"LoRA {text!r} is a pickle file")
            return LoraFile(spec, path.resolve(), pickle=True)
        if not name.endswith(_SAFE):
            raise InvalidArgumentError(f"LoRA {text!r} is not a weights file: give a .safetensors file")
        return LoraFile(spec, path.resolve())
    if path.is_dir():
        found, pickled = _weights_in(path, text.rstrip("/\\"), allow_pickle)
        return LoraFile(spec, found.resolve(), pickle=pickled)
    if _looks_like_path(text):
        raise ModelNotFoundError(f"no LoRA file or folder at {text!r}")
    found, pickled = _weights_in(_hub_snapshot(text, allow_pickle), text, allow_pickle)
    return LoraFile(spec, found, pickle=pickled)


def _hub_offline() -> bool:
    import sys

    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    return bool(getattr(sys.modules.get("huggingface_hub.constants"), "HF_HUB_OFFLINE", False))


def _hub_snapshot(repo: str, allow_pickle: bool) -> Path:
    """The local folder of hub repository ``repo``'s weights files: from the cache, else downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    patterns = [f"*{_SAFE}"] + ([f"*{s}" for s in _PICKLE] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass  # not in the cache
    if _hub_offline():
        raise OfflineError(
            f"LoRA {repo!r} is neither a local file nor in the Hugging Face cache, and HF_HUB_OFFLINE is set "
            "(offline): download it where there is network and give the file"
        )
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"no LoRA {repo!r} on the Hugging Face Hub") from None
    except Exception as exc:
        raise OfflineError(
            f"cannot reach the Hugging Face Hub for LoRA {repo!r} (offline?): download it where there is network "
            f"and give the file ({_one_line(exc)})"
        ) from None


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def read_lora(file: LoraFile) -> dict:
    """The tensors of a LoRA file, read on the CPU (a pickle file with ``torch.load(weights_only=True)``).

    Raises:
        ModelLoadError: a file that does not read, or holds no tensors.
    """
    import torch

    try:
        if file.pickle:
            tensors = torch.load(file.path, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            tensors = load_file(file.path)
    except Exception as exc:
        raise ModelLoadError(f"could not read LoRA {file.shown!r}: {_one_line(exc)}") from None
    if not isinstance(tensors, dict) or not tensors or not all(torch.is_tensor(t) for t in tensors.values()):
        raise ModelLoadError(f"LoRA {file.shown!r} holds no tensors")
    return tensors


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA read and checked for one pipeline.

    Args:
        file: where it was read from.
        tensors: its tensors as read (keys of CLIP text encoders as this transformers names their modules), which
            ``pipe.load_lora_weights`` converts as it does a file.
        targets: per component, the module each adapter pair modifies and its ``(lora_A, lora_B)`` tensors, in the
            keys peft uses for that module.
    """

    file: LoraFile
    tensors: dict = field(repr=False)
    targets: dict = field(repr=False)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.targets)

    @property
    def nbytes(self) -> int:
        """Bytes of the file's tensors as stored."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


_KOHYA_TEXT = {"text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}


def _for_flat_clip(pipe, tensors: dict) -> dict:
    """``tensors`` with the ``text_model`` level taken out of the keys of a text encoder that has none.

    CLIP text models of transformers 5 have no ``text_model`` level, and LoRA files name it
    (``text_encoder.text_model.encoder...``, kohya's ``lora_te_text_model_encoder...``). diffusers 0.42 strips it
    from the first form when it loads; 0.39 does not and fails with an IndexError.
    """
    renames = []
    for name, kohya in _KOHYA_TEXT.items():
        model = getattr(pipe, name, None)
        if model is not None and not hasattr(model, "text_model"):
            renames += [(f"{name}.text_model.", f"{name}.")] + [(f"{k}text_model_", k) for k in kohya]
    if not renames:
        return tensors
    renamed = {}
    for key, tensor in tensors.items():
        old, new = next(((o, n) for o, n in renames if key.startswith(o)), ("", ""))
        renamed[new + key[len(old):]] = tensor
    return renamed


def _peft_keys(component: str, state: dict) -> dict:
    """``state`` (one component's keys, prefix removed) in peft's key format, converted as diffusers converts it
    when it loads the LoRA into that component."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if component.startswith("text_encoder"):
        return convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    if "lora_A" not in next(iter(state)):
        state = convert_unet_state_dict_to_peft(state)
    return state


def _mismatch(file: LoraFile, pipe, what: str) -> ModelLoadError:
    return ModelLoadError(
        f"LoRA {file.shown!r} does not fit this {type(pipe).__name__}: {what} (a LoRA for another model?)"
    )


def _check_pair(file: LoraFile, pipe, where: str, module, a, b) -> None:
    import torch

    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if isinstance(base, torch.nn.Linear):
        fits = a.ndim == 2 and b.ndim == 2 and a.shape[1] == base.in_features and b.shape[0] == base.out_features
        wanted = f"{base.in_features}→{base.out_features} features"
    elif isinstance(base, torch.nn.Conv2d):
        fits = a.ndim == 4 and b.ndim == 4 and a.shape[1] == base.in_channels and b.shape[0] == base.out_channels
        wanted = f"{base.in_channels}→{base.out_channels} channels"
    else:
        raise _mismatch(file, pipe, f"{where} is a {type(base).__name__}, which the LoRA cannot adapt")
    if not fits or a.shape[0] != b.shape[1]:
        got = f"{tuple(a.shape)} and {tuple(b.shape)}"
        raise _mismatch(file, pipe, f"{where} takes {wanted}, the LoRA's A and B are {got}")


def check_lora(pipe, file: LoraFile, tensors: dict) -> LoraWeights:
    """Check a LoRA's tensors against ``pipe`` before anything is loaded into it.

    Each adapted module must exist in the component the key names (``unet``, ``text_encoder``, ...), be a linear
    or convolution layer, and take the features the LoRA's A matrix reads and give those its B matrix writes.

    Args:
        pipe: a diffusers pipeline with LoRA support (``load_lora_weights``).
        file: where the tensors come from (for the messages).
        tensors: the file's tensors (:func:`read_lora`).

    Raises:
        ModelLoadError: the tensors are not a LoRA diffusers reads, or the first module that does not fit.
        InvalidArgumentError: the pipeline takes no LoRAs.
    """
    loadable = tuple(getattr(type(pipe), "_lora_loadable_modules", ()) or ())
    if not hasattr(pipe, "load_lora_weights") or not loadable:
        raise InvalidArgumentError(f"{type(pipe).__name__} does not take LoRAs")
    tensors = _for_flat_clip(pipe, tensors)
    unet = getattr(pipe, "unet", None)
    kwargs = {"unet_config": unet.config} if unet is not None else {}
    try:
        out = type(pipe).lora_state_dict(dict(tensors), **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"LoRA {file.shown!r} is not a LoRA diffusers reads: {_one_line(exc)}") from None
    state_dict = out[0] if isinstance(out, tuple) else out  # SD3's and Flux's loaders return the dict alone
    odd = next((k for k in state_dict if "lora" not in k), None)
    if odd is not None or not state_dict:
        raise ModelLoadError(f"{file.shown!r} is not a LoRA: its key {odd!r} names no LoRA layer")
    by_component: dict[str, dict] = {}
    for key, tensor in state_dict.items():
        component, _, rest = key.partition(".")
        if component not in loadable or getattr(pipe, component, None) is None:
            raise _mismatch(file, pipe, f"its key {key!r} is for a {component!r}, which this pipeline has not")
        by_component.setdefault(component, {})[rest] = tensor
    targets: dict[str, dict] = {}
    for component, state in by_component.items():
        model = getattr(pipe, component)
        modules = dict(model.named_modules())
        peft_state = _peft_keys(component, state)
        pairs: dict[str, tuple] = {}
        for key, a in peft_state.items():
            if not key.endswith(".lora_A.weight"):
                continue
            path = key[: -len(".lora_A.weight")]
            b = peft_state.get(f"{path}.lora_B.weight")
            where = f"{component}.{path}"
            if b is None:
                raise ModelLoadError(f"LoRA {file.shown!r} has an A matrix for {where} and no B matrix")
            if path not in modules:
                raise _mismatch(file, pipe, f"it adapts {where}, which this pipeline has not")
            _check_pair(file, pipe, where, modules[path], a, b)
            pairs[path] = (a, b)
        if pairs:
            targets[component] = pairs
    if not targets:
        raise ModelLoadError(f"LoRA {file.shown!r} holds no A and B matrices diffusers can apply")
    return LoraWeights(file, tensors, targets)
