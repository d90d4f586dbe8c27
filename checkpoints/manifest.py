"""The manifest of a checkpoint: every file's name, size and SHA-256, written last, so that a resume can tell a
checkpoint that is exactly as written from one that was truncated, damaged or altered.

`manifest.json` lists every file of the checkpoint folder (itself excepted). A checkpoint verifies when its manifest
reads, names only plain relative paths inside the folder, and the folder holds exactly those files with those sizes
and digests. The manifest proves integrity, not origin: whoever can write the folder can write a new manifest, which
is why nothing of a checkpoint is ever unpickled with `weights_only=False` either (see checkpoints/checkpointing.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


class ManifestError(ValueError):
    """A checkpoint folder does not match its manifest; the message names the file and says how."""


def file_digest(path: str) -> str:
    """The SHA-256 of the file at `path`, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(folder: str) -> list[str]:
    """The files under `folder` (recursively) as sorted '/'-separated relative paths, the manifest excepted."""
    files = []
    for root, _, names in os.walk(folder):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if relative != MANIFEST_NAME:
                files.append(relative)
    return sorted(files)


def write_manifest(folder: str) -> str:
    """Write `folder/manifest.json` for the files now in `folder`, flushed to disk; returns its path."""
    files = {}
    for relative in list_files(folder):
        path = os.path.join(folder, relative)
        files[relative] = {"size": os.path.getsize(path), "sha256": file_digest(path)}
    path = os.path.join(folder, MANIFEST_NAME)
    with open(path, "w", encoding="utf-8") as file:
        json.dump({"format": MANIFEST_FORMAT, "files": files}, file, indent=2, sort_keys=True)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    return path


def has_manifest(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST_NAME))


def _read_manifest(folder: str) -> dict[str, dict[str, Any]]:
    path = os.path.join(folder, MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as file:
            manifest = json.load(file)
    except FileNotFoundError:
        raise ManifestError(f"{path} is missing") from None
    except (OSError, ValueError) as error:  # ValueError: not JSON, not UTF-8
        raise ManifestError(f"{path} cannot be read ({error})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path} is not a manifest of format {MANIFEST_FORMAT}")
    for relative, entry in files.items():
        parts = relative.split("/")
        if relative.startswith("/") or "\\" in relative or any(part in ("", ".", "..") for part in parts):
            raise ManifestError(f"{path} names '{relative}', which is not a plain path inside the checkpoint")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            raise ManifestError(f"{path} has no size and SHA-256 for '{relative}'")
    return files


def verify_manifest(folder: str) -> None:
    r"""
    Check that `folder` holds exactly the files its manifest lists, with their sizes and SHA-256 digests.

    Raises:
        `ManifestError`: the first mismatch, naming the file: the manifest is missing or unreadable, a file is
            missing, has another size or digest, or is not in the manifest.
    """
    expected = _read_manifest(folder)
    present = list_files(folder)
    for relative, entry in sorted(expected.items()):
        path = os.path.join(folder, *relative.split("/"))
        if not os.path.isfile(path):
            raise ManifestError(f"{path} is missing (it is in the manifest)")
        size = os.path.getsize(path)
        if size != entry["size"]:
            raise ManifestError(f"{path} has {size} bytes, the manifest says {entry['size']} (truncated or altered)")
        if file_digest(path) != entry["sha256"]:
            raise ManifestError(f"{path} does not match the SHA-256 in the manifest (damaged or altered)")
    extra = [relative for relative in present if relative not in expected]
    if extra:
        raise ManifestError(
            f"{os.path.join(folder, extra[0])} is not in the manifest (added after the checkpoint was written, or its entry removed)"
        )
