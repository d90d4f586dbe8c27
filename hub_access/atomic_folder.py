"""Writing a pipeline folder so that a process killed (or a disk filled) midway leaves the previous one loadable.

An export lives at the top of a folder that also holds other things (train_ddpm.py's `--output_dir`: checkpoints,
logs, samples), so the folder itself cannot be swapped. `atomic_folder` hands out a staging folder inside it; once
the export is completely written there (and flushed to disk), its entries move into place by renames, each atomic:
a component folder that did not exist yet (`unet/`, `scheduler/`) is renamed in whole, an existing one receives its
new files one `os.replace` at a time, and `model_index.json`, which makes the folder a pipeline, comes last. At every
moment each file is either the old one or the new one, complete, and the old and new exports of one run share their
configs, so `DDPMPipeline.from_pretrained` loads. A failure before the renames removes the staging folder and leaves
the previous export untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

STAGING_NAME = ".export.tmp"
INDEX_NAME = "model_index.json"


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file under `path` to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (renames into it) to disk, where the platform can."""
    with contextlib.suppress(OSError):  # some platforms cannot open or sync folders
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _move_in(staged: Path, target: Path) -> None:
    """Move the staged file or folder `staged` to `target` by atomic renames (see the module docstring)."""
    if staged.is_dir() and target.is_dir():
        for child in sorted(staged.iterdir()):
            _move_in(child, target / child.name)
        fsync_dir(target)
    elif staged.is_dir() and target.exists():  # a file where a folder goes: only a hand-made folder holds one
        target.unlink()
        os.rename(staged, target)
    else:
        os.replace(staged, target)


@contextlib.contextmanager
def atomic_folder(directory: str | os.PathLike) -> Iterator[Path]:
    r"""
    Write a pipeline folder into `directory` atomically: yields the staging folder to write into, then moves its
    entries into `directory` (`model_index.json` last). Other entries of `directory` are left alone. If the body
    raises, the staging folder is removed and `directory` is as it was.

    Example:
        >>> with atomic_folder(output_dir) as folder:
        ...     pipeline.save_pretrained(folder)
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / STAGING_NAME
    shutil.rmtree(staging, ignore_errors=True)  # left by a process killed while exporting
    staging.mkdir()
    try:
        yield staging
        fsync_tree(staging)
        entries = sorted(staging.iterdir(), key=lambda entry: entry.name == INDEX_NAME)  # the index last
        for entry in entries:
            _move_in(entry, directory / entry.name)
        fsync_dir(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
