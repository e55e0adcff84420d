"""Reading a pipeline so that its weights stay in the safetensors files' mapping until they are placed.

``from_pretrained`` maps each safetensors file and, when the file holds the dtype asked for, every weight is a view of
the mapping: reading the pipeline costs no host RAM, and placing it (:mod:`mlnb.planner.apply`) reads each part once,
on its way to the GPU or to its pinned region, giving the pages back as it goes. When the files hold another dtype
(a bf16 model read as fp16 for a card without bf16, fp32 files read as fp16), ``from_pretrained`` casts on the host:
the whole model is copied into new memory before anything is placed. :func:`read_pipeline` reads such a component in
its files' dtype instead and defers the cast (:mod:`mlnb.planner.deferred`), so that each part is cast as it is
placed. A pipeline that is not placed by a plan (a level, or a CPU) is cast on the host part by part before it is
used (:func:`materialize_all`), its pages given back as they are read.

A component whose class keeps some weights in fp32 (``_keep_in_fp32_modules``: T5's feed-forward output in fp16) is
read in the dtype asked for, as before, so those weights come out as the library makes them. Hub ids are read as
before too: their files are not known until ``from_pretrained`` downloads them.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import struct
from pathlib import Path

from ..planner.deferred import defer, materialize
from ..planner.host_memory import GiveBackEvery, give_back_host_memory
from . import files

logger = logging.getLogger(__name__)

__all__ = ["safetensors_dtype", "dtypes_to_defer", "read_pipeline", "materialize_all"]

_FLOAT_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
_HEADER_LIMIT = 100 * 2**20  # a safetensors header larger than this is not one


def _header(path: Path) -> dict:
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > _HEADER_LIMIT:
            raise ValueError(f"{path}: not a safetensors file")
        return json.loads(fh.read(length))


def safetensors_dtype(folder: str | os.PathLike, variant: str | None = None):
    """The floating dtype that holds most of the bytes of a component folder's safetensors files (``torch.float16``,
    ``torch.bfloat16`` or ``torch.float32``), or None: no such file, an unreadable header, or most bytes in another
    dtype (fp8, integers)."""
    import torch

    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    paths = sorted(p for p in Path(folder).glob("*.safetensors")
                   if p.name.endswith(suffix) and (variant or p.name.count(".") == 1))
    counts: dict[str, int] = {}
    for path in paths:
        try:
            header = _header(path)
        except (OSError, ValueError, struct.error):
            return None
        for name, entry in header.items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            start, end = entry.get("data_offsets", (0, 0))
            counts[entry.get("dtype")] = counts.get(entry.get("dtype"), 0) + end - start
    if not counts:
        return None
    top = max(counts, key=counts.get)
    return getattr(torch, _FLOAT_NAMES[top]) if top in _FLOAT_NAMES else None


def _keeps_fp32(spec) -> bool:
    """Whether the component class ``[library, class]`` of a ``model_index.json`` keeps weights in fp32 (or is not
    found: read as before)."""
    try:
        cls = getattr(importlib.import_module(spec[0]), spec[1])
    except Exception:
        return True
    return bool(getattr(cls, "_keep_in_fp32_modules", None) or getattr(cls, "_keep_in_fp32_modules_strict", None))


def dtypes_to_defer(folder: str | os.PathLike, dtype, given=(), variant: str | None = None) -> dict:
    """``{component: its files' dtype}`` for the components of a local pipeline whose safetensors files hold another
    floating dtype than ``dtype``, read in their own dtype and cast as they are placed; the components in ``given``
    (passed as objects) are not read."""
    index = files.read_model_index(folder)
    found = {}
    for name, spec in index.items():
        if name.startswith("_") or name in given or not isinstance(spec, list) or len(spec) != 2 or None in spec:
            continue
        own = safetensors_dtype(Path(folder) / name, variant)
        if own is not None and own != dtype and not _keeps_fp32(spec):
            found[name] = own
    return found


def read_pipeline(model: str | os.PathLike, dtype, allow_pickle: bool = False, **kwargs):
    """:func:`mlnb.pipeline.files.load_diffusers_pipeline`, with the components whose files hold another dtype than
    ``dtype`` read in their files' dtype, their casts deferred to placement (:mod:`mlnb.planner.deferred`): sizes,
    dtypes and the plan are those of ``dtype``. Place it with a plan, or call :func:`materialize_all` first."""
    source, is_local = files.resolve_model(model)
    own = {}
    if is_local and dtype is not None:
        files.check_components(source, given=kwargs)  # a damaged config is one line before its header is read
        own = dtypes_to_defer(source, dtype, given=kwargs, variant=kwargs.get("variant"))
    if not own:
        return files.load_diffusers_pipeline(source, dtype=dtype, allow_pickle=allow_pickle, **kwargs)
    pipe = files.load_diffusers_pipeline(source, dtype=dict(own, default=dtype), allow_pickle=allow_pickle, **kwargs)
    deferred = 0
    for name, file_dtype in own.items():
        module = getattr(pipe, name, None)
        if module is not None:
            deferred += defer(module, lambda _, tensor, f=file_dtype: dtype if tensor.dtype == f else None)
    logger.debug("read %s with %d bytes left in the files' mapping, cast as placed: %s", source, deferred,
                 ", ".join(f"{n} ({files.dtype_name(d)} on disk)" for n, d in own.items()))
    return pipe


def materialize_all(pipe) -> int:
    """Cast every deferred weight of ``pipe`` into host memory, part by part, giving the mapped pages read back as
    they add up; returns the bytes cast (0 for a pipeline read without deferring)."""
    import torch

    done = 0
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            done += materialize(module, "cpu", each_part=GiveBackEvery())
    if done:
        give_back_host_memory()
    return done
