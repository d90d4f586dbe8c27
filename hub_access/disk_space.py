"""Telling a full disk from other write failures, and measuring what a folder needs, for errors that say so.

A full disk reaches Python in several disguises: an `OSError` with `errno.ENOSPC` (or `EDQUOT`, a quota), a
safetensors error whose text carries the OS error ("No space left on device", "StorageFull"), or torch's zip writer
failing an internal check when its last write came up short (`RuntimeError: [enforce fail at inline_container.cc:672]
. unexpected pos 319104 vs 318996`), which names no cause at all: that one counts as a full disk only if the disk has
less room left than the write needed.
"""

from __future__ import annotations

import errno
import os
import shutil

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("no space left on device", "storagefull", "disk quota exceeded", "not enough space")
SHORT_WRITE_TEXTS = ("inline_container", "unexpected pos", "pytorchstreamwriter failed", "file write failed")


class DiskFullError(RuntimeError):
    """A write failed because the disk holding its folder is full; the message says how much was needed."""


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and the errors it was raised from or during."""
    found = []
    while error is not None and error not in found:
        found.append(error)
        error = error.__cause__ or error.__context__
    return found


def is_disk_full(error: BaseException, folder: str | os.PathLike | None = None, needed: int = 0) -> bool:
    r"""
    Whether `error` (or an error in its chain) says the disk is full. A short write of torch's zip writer, which says
    nothing of its cause, counts when the disk of `folder` has less than `needed` bytes free.
    """
    for link in _chain(error):
        if isinstance(link, DiskFullError):
            return True
        if isinstance(link, OSError) and link.errno in DISK_FULL_ERRNOS:
            return True
        text = str(link).lower()
        if any(marker in text for marker in DISK_FULL_TEXTS):
            return True
        if folder is not None and any(marker in text for marker in SHORT_WRITE_TEXTS):
            return free_bytes(folder) < max(needed, 1)
    return False


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes free to this user on the disk of `folder` (or of its nearest existing parent)."""
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def folder_bytes(folder: str | os.PathLike) -> int:
    """The size of the files under `folder` (0 if it does not exist)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                continue
    return total


def format_bytes(count: float) -> str:
    """`1.2 MB`, `870 KB`, `3.4 GB`: decimal units, as `df -H` and file managers show them."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit in ("bytes", "KB") else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message, with its type."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
