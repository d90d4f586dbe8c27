"""The fast listing of a plain image folder: the files `datasets`' imagefolder builder would load, in its order,
found with one `os.walk` instead of its globs (100,000 images: 0.5 s instead of 80 s; `benchmarks/bench_load.py`).

This module is the one place that depends on `datasets`' internals (its split patterns, metadata file names, ignored
files and image extensions) and the one place that decides to fall back: `plain_image_folder` returns None for any
folder whose layout `datasets` would read differently (split names, metadata, archives, a `datasets` version whose
rules were not verified), and the caller then loads the folder with `datasets` itself.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import stat

import datasets
from datasets import data_files as hub_data_files
from datasets.packaged_modules.folder_based_builder.folder_based_builder import FolderBasedBuilder
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from packaging import version

logger = logging.getLogger(__name__)

VERIFIED_IMAGEFOLDER_RULES = "5.2.0"
"""The `datasets` version whose imagefolder file rules `plain_image_folder` follows (older ones go through `datasets`;
`tests/test_data.py` compares the two on the installed version)."""


def _split_pattern_literals() -> re.Pattern | None:
    r"""
    A regex that finds, in a list of relative paths, every path that might match one of the patterns `datasets` tries
    before it settles on "every file is the train split": for each pattern, its longest literal piece (`train`,
    `valid`, `test`, `-of-`, ...), which any matching path must contain. None if a pattern has no literal piece
    (a `datasets` whose rules this cannot screen).
    """
    groups = list(hub_data_files.ALL_DEFAULT_PATTERNS)
    if not groups or groups[-1] != {datasets.Split.TRAIN: ["**"]}:
        return None
    patterns = [pattern.replace("{split}", "*") for pattern in hub_data_files.ALL_SPLIT_PATTERNS]
    patterns += [pattern for group in groups[:-1] for split_patterns in group.values() for pattern in split_patterns]
    literals = set()
    for pattern in patterns:
        pieces = [piece.strip("/") for piece in re.split(r"\[[^\]]*\]|[*?]+", pattern)]
        pieces = [piece for piece in pieces if piece]
        if not pieces:
            return None
        # Of equally long pieces, prefer one with punctuation ("-of-" over "data"): rarer in a plain folder.
        literals.add(max(pieces, key=lambda piece: (len(piece), not piece.isalnum())))
    return re.compile("|".join(re.escape(literal) for literal in sorted(literals)))


def _hidden(name: str) -> bool:
    return name.startswith(".") and set(name) != {"."}


def plain_image_folder(folder: str) -> list[tuple[str, int, int]] | None:
    r"""
    The images that `datasets.load_dataset("imagefolder", data_dir=folder, split="train")` loads, found by one walk
    of the folder: (absolute path, size, modification time in ns) per image, in the order `datasets` gives them.

    `datasets` decides the splits of a folder by globbing it once for each of 66 patterns, then reads every file's
    metadata and hashes the list, on every load: 80 to 100 s and 140 to 180 MiB for 100,000 images on a 2-core CPU
    (`benchmarks/bench_load.py`), before its cache is even looked up. One `os.walk` takes half a second. Its rules are
    applied here as it applies them (files and folders starting with "." and folders starting with "__" skipped,
    `README.md` and the like ignored, images recognised by `ImageFolder.EXTENSIONS`, links to files followed and links
    to folders not, with a warning) where they come down to "every image is the train split". Anything else returns
    None and is left to `datasets`: a path that might name a split (one containing `train`, `test`, `val`, `dev`, `eval`, ...), a metadata
    file, a zip archive, an unreadable entry, a broken link (which the caller refuses).
    """
    literals = _split_pattern_literals()
    if literals is None or version.parse(datasets.__version__) < version.parse(VERIFIED_IMAGEFOLDER_RULES):
        return None
    base = os.path.realpath(folder)
    metadata_names = set(FolderBasedBuilder.METADATA_FILENAMES)
    ignored_names = set(hub_data_files.FILES_TO_IGNORE)
    image_extensions = set(ImageFolder.EXTENSIONS)

    seen, images, errors = [], [], []  # every file that decides the splits; the images among them
    for root, dirs, files in os.walk(base, onerror=errors.append):
        dirs[:] = [name for name in dirs if not _hidden(name) and not name.startswith("__")]
        prefix = os.path.relpath(root, base)
        warn_linked_folders(folder, base, root, dirs)
        for name in files:
            if _hidden(name) or name in ignored_names:
                continue
            relative_path = name if prefix == "." else f"{prefix}/{name}"
            seen.append(relative_path)
            stem, extension = os.path.splitext(name)
            if name in metadata_names or extension.lower() == ".zip":
                return None
            if {extension.lower(), os.path.splitext(stem)[1].lower()} & image_extensions:  # as in "x.png.gz" too
                images.append(relative_path)
    # Any file, image or not, whose path might match a split pattern (`notes_test.txt`) makes `datasets` decide.
    if errors or literals.search("\n".join(seen)):
        return None
    listed = []
    for relative_path in sorted(images):
        path = f"{base}/{relative_path}"
        try:
            path.encode()
            status = os.stat(path)
        except (OSError, UnicodeEncodeError):  # a broken link, a name that is not UTF-8: refused by the caller
            return None
        if stat.S_ISREG(status.st_mode):  # as `datasets`, which skips pipes, sockets and devices
            listed.append((path, status.st_size, status.st_mtime_ns))
    return listed


def image_files(folder: str) -> list[str]:
    r"""
    The relative paths of the files under `folder` that `datasets`' imagefolder builder takes for images (by their
    extension, `ImageFolder.EXTENSIONS`), hidden files and folders and `__*` folders left out as it leaves them out.
    A name that is not valid UTF-8 is kept as Python gives it (with surrogate escapes): see `undecodable`.
    """
    extensions = set(ImageFolder.EXTENSIONS)
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(name for name in dirs if not _hidden(name) and not name.startswith("__"))
        warn_linked_folders(folder, folder, root, dirs)
        prefix = os.path.relpath(root, folder)
        for name in sorted(files):
            stem, extension = os.path.splitext(name)
            if not _hidden(name) and {extension.lower(), os.path.splitext(stem)[1].lower()} & extensions:
                found.append(name if prefix == "." else os.path.join(prefix, name))
    return found


def warn_linked_folders(folder: str, top: str, root: str, dirs: list[str]) -> None:
    """Warn about the links to folders among `dirs` of `root` (walked from `top`, which is --train_data_dir `folder`):
    `datasets` does not follow them, so their images are not trained on."""
    for name in dirs:
        path = os.path.join(root, name)
        if os.path.islink(path):
            _warn_linked_folder(folder, os.path.relpath(path, top), os.readlink(path))


@functools.cache  # once per link, though both listings walk the folder
def _warn_linked_folder(folder: str, relative_path: str, target: str) -> None:
    logger.warning(
        "Skipping %r in --train_data_dir %r: it is a link to the folder %r, which `datasets` does not follow. Move or "
        "copy the images there into the folder (or link each image) to train on them.",
        relative_path,
        folder,
        target,
    )


def broken_links(folder: str, paths: list[str]) -> list[tuple[str, str, str]]:
    r"""
    The `paths` (relative to `folder`, from `image_files`) that are links whose target cannot be read, which
    `datasets` skips without a word: (path, the link's target, why: "does not exist" or "is a loop of links").
    """
    broken = []
    for relative_path in paths:
        path = os.path.join(folder, relative_path)
        if not os.path.islink(path):
            continue
        try:
            os.stat(path)
        except OSError as error:
            why = "is a loop of links" if error.errno == errno.ELOOP else "does not exist"
            broken.append((relative_path, os.readlink(path), why))
    return broken


def undecodable(paths: list[str]) -> list[str]:
    """The `paths` that are not valid UTF-8 (`datasets` stores paths as Arrow strings, which must be UTF-8)."""
    bad = []
    for path in paths:
        try:
            path.encode()
        except UnicodeEncodeError:
            bad.append(path)
    return bad


COMMON_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def accepted_extensions() -> str:
    """The image extensions `datasets` recognises, for messages: the common ones, then how many others."""
    extensions = {extension.lower() for extension in ImageFolder.EXTENSIONS}
    common = [extension for extension in COMMON_EXTENSIONS if extension in extensions]
    others = len(extensions) - len(common)
    return ", ".join(common) + (f" and {others} more that PIL reads (.ppm, .tga, ...)" if others else "")
