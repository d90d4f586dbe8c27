"""Telling a full disk from other write failures, measuring what a folder needs, for errors that say so, and whether a
folder a script writes can take its files (`output_folder_problem`: no file in the way, writable, room enough).

A full disk reaches Python in several disguises: an `OSError` with `errno.ENOSPC` (or `EDQUOT`, a quota), a
safetensors error whose text carries the OS error ("No space left on device", "StorageFull"), or torch's zip writer
failing an internal check when its last write came up short (`RuntimeError: [enforce fail at inline_container.cc:672]
. unexpected pos 319104 vs 318996`), which names no cause at all: that one counts as a full disk only if the disk has
less room left than the write needed.
"""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import tempfile

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


def file_in_the_way(path: str | os.PathLike) -> str | None:
    """The first existing non-folder on the way to `path` (itself included), or None; links are followed first, as
    the OS follows them (`link/..` is the link target's parent)."""
    current = os.path.realpath(path)
    while True:
        if os.path.lexists(current) and not os.path.isdir(current):
            return current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def nearest_existing(path: str | os.PathLike) -> str:
    """`path` with links followed, or its nearest existing parent: the folder a new file under `path` goes in."""
    current = os.path.realpath(path)
    while not os.path.exists(current) and os.path.dirname(current) != current:
        current = os.path.dirname(current)
    return current


def unwritable(path: str | os.PathLike) -> str | None:
    """
    Why this process cannot create `path` or write in it, or None: the nearest existing folder on the way to it (itself
    included) must take new files. `os.access` asks the kernel, so a read-only file system counts for root too (a
    mode bit does not stop root, and does not count here); nothing is written.
    """
    current = nearest_existing(path)
    if os.access(current, os.W_OK | os.X_OK):
        return None
    if os.statvfs(current).f_flag & os.ST_RDONLY:
        return f"'{current}' is on a read-only file system"
    return f"this user ({_user()}) may not create files in '{current}' (its permissions or attributes)"


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


PROBE_BYTES = 4096
"""What the probe of `output_folder_problem(probe=True)` writes (and removes): a few KB, so a full disk shows."""


def output_folder_problem(
    flag: str, path: str, *, needed_bytes: int = 0, contents: str = "its files", probe: bool = False
) -> str | None:
    """
    The one-line error, naming `flag`, when the folder `path` (created later if missing) cannot take what a script
    writes there, or None. Creates nothing; checked in this order:
    - `path` is a link to nothing, or it (or a folder on its way) is a file;
    - its nearest existing folder does not take new files (`unwritable`: permissions, a read-only file system);
    - with `probe`, writing `PROBE_BYTES` there for real fails (a full disk, a quota; the probe file is removed);
    - its disk has fewer than `needed_bytes` free, the least that `contents` (as the message names them) take.
    """
    if os.path.islink(path) and not os.path.exists(path):
        return (
            f"{flag} '{path}' is a link to '{os.readlink(path)}', which does not exist: create its target, or pass "
            "another folder."
        )
    blocking = file_in_the_way(path)
    if blocking is not None:
        what = "is a file" if os.path.realpath(path) == blocking else f"lies under '{blocking}', which is a file"
        return f"{flag} '{path}' {what}, not a folder: pass a folder's path (it is created)."
    why = unwritable(path)
    if why is not None:
        return f"{flag} '{path}' cannot be written: {why}. Make it writable, or pass a folder you can write."
    existing = nearest_existing(path)
    if probe:
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".probe-") as written:
                written.write(b"\0" * PROBE_BYTES)
                written.flush()
                os.fsync(written.fileno())
        except OSError as error:
            if is_disk_full(error):
                return (
                    f"{flag} '{path}': the disk of '{existing}' is full ({first_line(error)}; "
                    f"{format_bytes(free_bytes(existing))} free). Free space there, or pass another {flag}."
                )
            return (
                f"{flag} '{path}' cannot be written: writing in '{existing}' failed ({first_line(error)}). Make it "
                "writable, or pass a folder you can write."
            )
    free = free_bytes(existing)
    if free < needed_bytes:
        return (
            f"{flag} '{path}': its disk has {format_bytes(free)} free, but {contents} take more than "
            f"{format_bytes(needed_bytes)}. Free space there, or pass another {flag}."
        )
    return None
