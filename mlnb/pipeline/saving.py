"""Saving generated images: to a file the user names, or into a folder under names mlnb chooses, never replacing a
file or writing through a link.

A file the user names is refused when something is already there: the user chose that name and may not know it is
taken. In a folder mlnb names the images itself (``mlnb-<seed>-<i>.png``), so a cell run again with the same seed
takes the next free name (``mlnb-<seed>-<i>-1.png``) instead of failing on its own earlier picture. Each file is
created exclusively, so a file or link that appears between the check and the write is not replaced either.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "check_targets", "save_images", "save_new", "save_paths"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def save_paths(path: str | os.PathLike, count: int, seed: int = 0) -> list[Path]:
    """Where :func:`save_images` puts ``count`` images: ``mlnb-<seed>-<i>.png`` in an existing folder (the first
    free name of each is chosen as it is written), else the file name (``name-<i>.png`` for several).

    Raises:
        FileNotFoundError: the parent folder does not exist, or the path is neither a folder nor a file name.
        ValueError: a file name whose extension is not an image format mlnb writes (.png, .jpg, .jpeg, .webp).
    """
    target = Path(path).expanduser()
    if target.is_dir():
        return [target / f"mlnb-{seed}-{i}.png" for i in range(count)]
    if not target.parent.is_dir():
        raise FileNotFoundError(f"folder {str(target.parent)!r} does not exist")
    if target.suffix == "":
        raise FileNotFoundError(f"folder {str(target)!r} does not exist (give a .png path or a folder)")
    if target.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"{str(path)!r} is neither an existing folder nor a .png/.jpg/.webp file name")
    if count == 1:
        return [target]
    return [target.with_name(f"{target.stem}-{i}{target.suffix}") for i in range(count)]


def check_targets(paths: list[Path], overwrite: bool = False) -> None:
    """Refuse to write through a symbolic link (a dangling one too), or onto an existing file unless ``overwrite``.

    Raises:
        FileExistsError: naming the first such path.
        OSError: a path the system refuses to look at (a name too long, no permission).
    """
    for p in paths:
        try:
            mode = os.lstat(p).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        if stat.S_ISLNK(mode):
            raise FileExistsError(f"{str(p)!r} is a symbolic link; mlnb never writes through one, choose another name")
        if not overwrite:
            raise FileExistsError(f"{str(p)!r} exists; mlnb never overwrites, choose another name")


def save_new(image, path: Path, tries: int = 1000) -> Path:
    """Save ``image`` under ``path``'s name, or the first free ``<stem>-<n><suffix>`` beside it: an existing file
    or link of that name is never replaced (the file is created exclusively, so a racing writer cannot either).

    Raises:
        FileExistsError: every name up to ``<stem>-<tries>`` is taken.
        OSError: the file could not be written (a partly written one is removed).
    """
    for n in range(tries + 1):
        candidate = path if n == 0 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        try:
            handle = open(candidate, "xb")
        except FileExistsError:
            continue
        try:
            with handle:
                image.save(handle, format=_format(candidate))
        except BaseException:
            candidate.unlink(missing_ok=True)
            raise
        return candidate
    raise FileExistsError(f"{str(path)!r} and {tries} numbered names beside it exist")


def _format(path: Path) -> str:
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")


def save_images(images: list, path: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> list[Path]:
    """Save images to a file (``name-<i>.png`` for several), or into an existing folder as ``mlnb-<seed>-<i>.png``
    (or, where that name is taken, the first free ``mlnb-<seed>-<i>-<n>.png``).

    A named file is never overwritten unless ``overwrite``; nothing is ever written through a symbolic link. With
    ``overwrite``, a folder's ``mlnb-<seed>-<i>.png`` files are replaced too.

    Returns:
        The paths written, in the order of ``images``.

    Raises:
        FileExistsError: a named target is a symbolic link, or exists and ``overwrite`` is False.
        FileNotFoundError: the parent folder does not exist.
        OSError: the file could not be written.
    """
    paths = save_paths(path, len(images), seed)
    if Path(path).expanduser().is_dir() and not overwrite:
        return [save_new(image, p) for image, p in zip(images, paths)]
    check_targets(paths, overwrite)
    for image, p in zip(images, paths):
        image.save(p)
    return paths
