"""A model's files: finding them, reading what they say, and reading the pipeline from them safely (safetensors only
unless the user opts in, never remote code by default).

Every failure becomes one line that says what to do: a missing folder, a folder that is not a pipeline, pickle-only
weights, a corrupt file, a hub id with no network. A ``model_index.json`` or a component's ``*config.json`` that is
not UTF-8, not JSON or not a JSON object, and a component folder the index names but the folder lacks, are each one
line naming the file, before diffusers reads anything.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import os
import sys
from pathlib import Path

from ..device import Device
from ..errors import InvalidArgumentError, ModelLoadError, ModelNotFoundError, OfflineError, UnsafeWeightsError
from ..monitor import release_exception_frames
from ..notices import install as install_library_notices
from .precision import choose_dtype, model_family, restore_fp32_modules, say_once

logger = logging.getLogger(__name__)

__all__ = [
    "resolve_model",
    "read_json_object",
    "read_model_index",
    "check_components",
    "weight_files",
    "check_local_weights",
    "pickle_only_components",
    "reads_pickle",
    "pipeline_parameters",
    "parameters_of",
    "parse_dtype",
    "dtype_name",
    "load_dtype",
    "model_index",
    "load_diffusers_pipeline",
]

_SAFE = (".safetensors",)
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false",
               type(None): "null"}
_DAMAGED = "save the pipeline again (pipe.save_pretrained) or download it again"
_PICKLE = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_NETWORK_HINTS = (
    "offline", "connection", "resolve", "network", "couldn't connect", "could not connect", "max retries",
    "name or service not known", "temporary failure", "timed out", "localentrynotfound", "cannot find the requested files",
)


def resolve_model(model: str | os.PathLike) -> tuple[str, bool]:
    """``(source, is_local)``: a local folder (absolute path) or a hub id.

    Raises:
        ModelNotFoundError: a path that does not exist, or a folder without ``model_index.json``.
    """
    text = os.fspath(model).strip()
    if not text:
        raise ModelNotFoundError("no model given: pass a hub id (org/name) or a local diffusers folder")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{text!r} is a folder but not a diffusers pipeline (no model_index.json); "
                "save one with pipe.save_pretrained(folder)"
            )
        folder = str(path.resolve())
        read_model_index(folder)
        return folder, True
    if path.is_file():
        raise ModelNotFoundError(
            f"{text!r} is a single file; mlnb loads diffusers pipeline folders or hub ids (org/name)"
        )
    looks_like_path = (
        text.startswith(("/", "./", "../", "~", "\\"))
        or text.count("/") > 1
        or text.lower().endswith(_SAFE + _PICKLE)
        or (len(text) > 1 and text[1] == ":")
    )
    if looks_like_path:
        raise ModelNotFoundError(f"no model folder at {text!r}")
    return text, False


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object a model's file holds.

    Args:
        path: the file (``model_index.json``, a component's ``config.json``...).

    Raises:
        ModelLoadError: one line naming the file: it cannot be read, is not UTF-8, not JSON, or not a JSON object.
    """
    shown = repr(os.fspath(path))
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelLoadError(
            f"{shown} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position {exc.start}); {_DAMAGED}"
        ) from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {shown}: {exc.strerror or exc}") from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ModelLoadError(f"{shown} is not valid JSON ({exc}); {_DAMAGED}") from None
    if not isinstance(value, dict):
        kind = _JSON_KINDS.get(type(value), type(value).__name__)
        raise ModelLoadError(f"{shown} is not a JSON object (it holds {kind}); {_DAMAGED}")
    return value


def read_model_index(folder: str | os.PathLike) -> dict:
    """A local pipeline's ``model_index.json``, as a dict (one line naming the file when it is damaged)."""
    return read_json_object(Path(folder) / "model_index.json")


def _components(index: dict) -> list[str]:
    """The components a ``model_index.json`` names with a library and a class (``[null, null]`` is none)."""
    return [name for name, spec in index.items()
            if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2 and None not in spec]


def check_components(folder: str | os.PathLike, given=()) -> None:
    """Refuse a local pipeline whose index names a component folder it lacks, or whose component's
    ``*config.json`` is damaged (not UTF-8, not JSON or not an object); the components in ``given`` (passed to
    ``from_pretrained`` as objects) are not read from the folder.

    Raises:
        ModelLoadError: one line naming the folder or the file.
    """
    root = Path(folder)
    for name in _components(read_model_index(root)):
        if name in given:
            continue
        sub = root / name
        if not sub.is_dir():
            raise ModelLoadError(
                f"{str(sub)!r} is missing: {str(root / 'model_index.json')!r} names the component {name!r}; {_DAMAGED}"
            )
        for config in sorted(sub.glob("*config.json")):
            read_json_object(config)


def weight_files(folder: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """``{component/file: (size, modification time in ns)}`` for a local pipeline's weight files (safetensors and
    pickle), what the cache compares to notice weights changed on disk; unreadable entries are left out."""
    root, found = Path(folder), {}
    for path in sorted(root.glob("*/*")):
        if path.name.endswith(_SAFE + _PICKLE):
            try:
                stat = path.stat()
            except OSError:
                continue
            found[f"{path.parent.name}/{path.name}"] = (stat.st_size, stat.st_mtime_ns)
    return found


def pickle_only_components(folder: str | os.PathLike) -> list[str]:
    """``component/file`` for each component of a local pipeline whose weights are pickle files only (no
    safetensors beside them), in ``model_index.json``'s order."""
    root = Path(folder)
    index = read_model_index(root)
    found = []
    for name, spec in index.items():
        sub = root / name
        if name.startswith("_") or not sub.is_dir() or not isinstance(spec, list):
            continue
        files = sorted(p.name for p in sub.iterdir() if p.is_file())
        pickled = [f for f in files if f.endswith(_PICKLE)]
        if pickled and not any(f.endswith(_SAFE) for f in files):
            found.append(f"{name}/{pickled[0]}")
    return found


def check_local_weights(folder: str | os.PathLike, allow_pickle: bool) -> None:
    """Refuse a local pipeline whose weights are pickle-only unless ``allow_pickle``.

    Raises:
        UnsafeWeightsError: naming the first pickle-only component and the ``allow_pickle`` opt-in.
    """
    pickled = [] if allow_pickle else pickle_only_components(folder)
    if pickled:
        raise UnsafeWeightsError(
            f"{pickled[0]} is a pickle file and there are no safetensors weights; pickle can run code "
            "when loaded: pass allow_pickle=True (%%generate --allow-pickle) only if you trust this model"
        )


def reads_pickle(source: str, is_local: bool, allow_pickle: bool) -> bool:
    """Whether loading ``source`` may have read pickle weights: only with ``allow_pickle``, and for a local folder
    only when a component has no safetensors (diffusers prefers them); a hub model's files are not known here."""
    return allow_pickle and (not is_local or bool(pickle_only_components(source)))


def model_index(source: str, is_local: bool, from_pretrained_kwargs: dict, fetch: bool = False) -> dict | None:
    """The ``model_index.json`` of ``source``: a local folder's, or a hub model's already in the Hugging Face cache.
    With ``fetch``, a hub model's index that is not in the cache is downloaded (that one small file, which
    ``from_pretrained`` would download first anyway). None when that file is not at hand or is damaged (the load says
    so)."""
    if is_local:
        index_file = Path(source) / "model_index.json"
    else:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        where = dict(revision=from_pretrained_kwargs.get("revision"), cache_dir=from_pretrained_kwargs.get("cache_dir"))
        try:
            cached = try_to_load_from_cache(source, "model_index.json", **where)
            if not isinstance(cached, str) and fetch:
                cached = hf_hub_download(source, "model_index.json", token=from_pretrained_kwargs.get("token"),
                                         **where)
        except Exception:  # offline, or a name the hub would refuse: from_pretrained says so in its own words
            return None
        if not isinstance(cached, str):
            return None
        index_file = Path(cached)
    try:
        return read_json_object(index_file)
    except ModelLoadError:
        return None


def pipeline_parameters(index: dict | None, from_pretrained_kwargs: dict) -> set[str] | None:
    """What the pipeline class a ``model_index.json`` names (``index``, from :func:`model_index`) takes besides
    ``from_pretrained``'s own arguments (its components, such as ``scheduler``, and its optional settings). None when
    that file is not at hand, or names a class diffusers does not have (a custom pipeline)."""
    if from_pretrained_kwargs.get("custom_pipeline") is not None:
        return None
    if index is None:
        return None
    import diffusers

    pipeline_class = getattr(diffusers, str(index.get("_class_name")), None)
    if not isinstance(pipeline_class, type):
        return None
    return parameters_of(pipeline_class) | {name for name in index if not name.startswith("_")}


def parameters_of(pipeline_class: type) -> set[str]:
    """The keyword arguments a pipeline class's ``__init__`` takes: its components and its optional settings."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name for name, p in inspect.signature(pipeline_class.__init__).parameters.items()
            if name != "self" and p.kind in kinds}


def parse_dtype(dtype):
    """``"fp16"``, ``"float16"``, ``"bf16"``, ``"fp32"`` or a ``torch.dtype`` -> ``torch.dtype``."""
    import torch

    allowed = (torch.float16, torch.bfloat16, torch.float32)
    if dtype is None or dtype in allowed:
        return dtype
    if isinstance(dtype, torch.dtype):
        raise InvalidArgumentError(f"dtype {dtype} is not one mlnb runs: use fp16, bf16 or fp32")
    names = {
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    }
    try:
        return names[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise InvalidArgumentError(f"unknown dtype {dtype!r}: use fp16, bf16 or fp32") from None


def load_dtype(dtype, device: Device, index: dict | None = None):
    """The ``torch.dtype`` a pipeline loads in: ``dtype`` as given, checked against the card, else the default for
    the card and the model family its ``model_index.json`` names (:func:`~mlnb.pipeline.precision.choose_dtype`:
    fp32 on a CPU; bf16 for SD3.5 and Flux on a card that computes bf16 in hardware; fp16 otherwise). A slow choice
    (bf16 asked of a card that only emulates it) is said once.

    Args:
        dtype: None, ``"fp16"``, ``"bf16"``, ``"fp32"`` (and their long names) or a ``torch.dtype``.
        device: the mlnb device the pipeline runs on.
        index: the pipeline's ``model_index.json``, or None when it is not at hand (counted as a UNet).

    Raises:
        InvalidArgumentError: an unknown dtype, or bf16 on a card that cannot compute it.
    """
    requested = parse_dtype(dtype)
    info = device.info() if device.is_cuda else None
    capability = info.compute_capability if info is not None else None
    choice = choose_dtype(
        model_family(index), cuda=device.is_cuda, compute_capability=capability,
        bf16_works=info is None or info.supports_bf16 or capability is None,  # unknown: let torch say
        requested=dtype_name(requested) if requested is not None else None,
        card=info.name if info is not None else "the CPU",
    )
    say_once(choice)
    return parse_dtype(choice.dtype)


def dtype_name(dtype) -> str:
    """``torch.float16`` -> ``"fp16"``; ``torch.bfloat16`` -> ``"bf16"``."""
    return str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float", "fp")


@contextlib.contextmanager
def quiet_hf_progress():
    """Hide diffusers'/transformers' loading and saving bars for the block (mlnb shows its own progress)."""
    toggles = []
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            mod = importlib.import_module(module)
            enabled = getattr(mod, "is_progress_bar_enabled", None)
            if enabled is not None and enabled():
                mod.disable_progress_bar()
                toggles.append(mod)
        except Exception:
            continue
    try:
        yield
    finally:
        for mod in toggles:
            mod.enable_progress_bar()


def _dtype_keyword() -> str:
    """Newer diffusers take ``dtype`` (``torch_dtype`` warns); 0.39 knows only ``torch_dtype``."""
    from diffusers.pipelines import pipeline_utils

    return "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"


def _is_network_error(exc: BaseException) -> bool:
    """True when ``exc`` or any exception it was raised from is a network or offline-mode failure.

    diffusers wraps the hub's ``OfflineModeIsEnabled``/connection error in a generic ``OSError`` ("not cached
    locally"), so the cause has to be looked at too.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).lower()
        if any(h in type(exc).__name__.lower() or h in text for h in _NETWORK_HINTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as it is now: huggingface_hub reads it once, at import, and notebooks often set it later."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class _NoEmptyFp32Warning(logging.Filter):
    """Drops diffusers' warning that a model has modules to keep in fp32 when the list it names is empty. An SDXL
    pipeline casts its VAE to fp32 and back at every decode on a card without bf16 (a T4), and diffusers then warns
    twice an image about ``[]``. The warning that names modules still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


_EMPTY_FP32_WARNING = _NoEmptyFp32Warning()


class _PickleNotices(logging.Filter):
    """While a load that accepts pickle runs, diffusers' two lines per pickle-only component (an "error" that it
    found no safetensors file, then "defaulting to unsafe serialization") become one mlnb line naming the
    components; the component is the last part of the path each "error" names."""

    def __init__(self) -> None:
        super().__init__()
        self.components: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith("Defaulting to unsafe serialization"):
            return False
        if text.startswith("An error occurred while trying to fetch ") and "safetensors" in text:
            path = text[len("An error occurred while trying to fetch "):].split(": ", 1)[0]
            self.components.append(Path(path).name or path)
            return False
        return True

    @contextlib.contextmanager
    def collected(self, active: bool):
        logger_ = logging.getLogger("diffusers.models.modeling_utils")
        if active:
            logger_.addFilter(self)
        try:
            yield
        finally:
            logger_.removeFilter(self)


def load_diffusers_pipeline(model: str | os.PathLike, dtype=None, allow_pickle: bool = False, **kwargs):
    """``DiffusionPipeline.from_pretrained`` with mlnb's safety rules and one-line errors.

    Args:
        model: hub id or local folder.
        dtype: torch dtype for the weights.
        allow_pickle: accept pickle (``.bin``/``.ckpt``) weights. Off by default: pickle can run code.
        **kwargs: passed to ``from_pretrained`` (``variant``, ``revision``, ...). ``trust_remote_code`` stays
            False unless given here explicitly.
    """
    logging.getLogger("diffusers.models.modeling_utils").addFilter(_EMPTY_FP32_WARNING)  # once: filters are a set
    install_library_notices()  # a first load's notices (torchvision) as one line at most
    source, is_local = resolve_model(model)
    if is_local:
        check_local_weights(source, allow_pickle)
        check_components(source, given=kwargs)
    from diffusers import DiffusionPipeline

    kwargs.setdefault("trust_remote_code", False)
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    offline = not is_local and _hub_offline()
    if offline:  # cache only: no hub round trip, and no multi-line "Couldn't connect to the Hub" warning first
        kwargs.setdefault("local_files_only", True)
    pickled = _PickleNotices()
    try:
        with quiet_hf_progress(), pickled.collected(allow_pickle):
            pipe = DiffusionPipeline.from_pretrained(source, **{_dtype_keyword(): dtype}, **kwargs)
    except (MemoryError, KeyboardInterrupt) as exc:
        release_exception_frames(exc)
        raise
    except Exception as exc:
        # The loader's frames hold the components loaded before the failure, and the one-line error below keeps
        # them alive (as its __context__) until the next error replaces sys.last_value: free them now.
        release_exception_frames(exc)
        text = str(exc).lower()
        if offline and _is_network_error(exc):
            raise OfflineError(
                f"{source!r} is neither a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE is set "
                "(offline): download it where there is network and give the local folder, "
                "e.g. --model /content/models/name"
            ) from None
        if not is_local and _is_network_error(exc):
            raise OfflineError(
                f"cannot reach the Hugging Face Hub for {source!r} (offline?): download it where there is network "
                "and give the local folder, e.g. --model /content/models/name"
            ) from None
        if not allow_pickle and "safetensors" in text and ("not found" in text or "could not find" in text or "no such" in text):
            raise UnsafeWeightsError(
                f"{source!r} has no safetensors weights; pickle can run code when loaded: pass allow_pickle=True "
                "(%%generate --allow-pickle) only if you trust this model"
            ) from None
        if not is_local and ("not found" in text or "404" in text or "repository" in text):
            raise ModelNotFoundError(f"no model {source!r} on the Hugging Face Hub ({_one_line(exc)})") from None
        raise ModelLoadError(f"could not load {source!r}: {_one_line(exc)}") from None
    install_library_notices()  # on the logger of the pipeline's module too, which the load imported
    if pickled.components:
        logger.warning("read pickle weights (allow_pickle): %s", ", ".join(pickled.components))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    restore_fp32_modules(pipe)  # a component given already cast to fp16 (T5's wo overflows there)
    return pipe
