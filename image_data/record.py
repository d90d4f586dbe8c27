"""The record of the training data: what train_ddpm.py writes beside its export (`training_data_record`, with the
images' `data_fingerprint`), and what evaluate_ddpm.py checks against it: the data flags it fills from the record
(`fill_data_flags`), the bit depth, and other data behind the recorded name (its count, its fingerprint). The checks
take the flags as a mapping by their names and raise `pipelines.export.EvaluationInputError`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import datasets
from datasets import Dataset

from hub_access.secrets import is_local_path
from image_data.sources import digits_dataset, find_image_column, load_image_dataset
from pipelines.export import TRAINING_DATA_FILE, EvaluationInputError


def training_data_record(
    *,
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_data_dir: str | None,
    image_column: str,
    resolution: int,
    channels: int,
    preserve_input_precision: bool,
    center_crop: bool,
    random_flip: bool,
    held_out_images: int = 0,
    num_images: int | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    r"""
    What a run trained on, as the export records it (`training_data.json`, the card's `training_data:`) and
    `evaluate_ddpm.py` reads it back: the data flags by their names, and `channels` / `bit_depth` of the cached images.

    Local folders are named by their base name only (no path of this machine is published); a Hub dataset id is kept.
    `source` says which of the four kinds it is (`embedded-digits`, `hub-dataset`, `local-dataset`, `image-folder`).

    `num_images` is the number of images of the split `train` as loaded, before the last `held_out_images` are held
    out (None when not known: `--streaming`). It is what `evaluate_ddpm.py` loads by default (the whole split), so a
    folder of the same base name with another count is other data.

    `fingerprint` is `data_fingerprint` of that split (read again from the `cache_dir` the run used), so that
    `evaluate_ddpm.py` also tells other images of the same name and count; None when the split was streamed
    (`num_images` None).
    """
    fingerprint = None
    if num_images is not None:
        loaded = load_image_dataset(dataset_name, dataset_config_name, train_data_dir, cache_dir=cache_dir)
        fingerprint = data_fingerprint(loaded, find_image_column(loaded, image_column))
    if dataset_name is not None and is_local_path(dataset_name):
        source, dataset_name = "local-dataset", _base_name(dataset_name)
    elif dataset_name is not None:
        source = "hub-dataset"
    elif train_data_dir is not None:
        source, train_data_dir = "image-folder", _base_name(train_data_dir)
    else:
        source = "embedded-digits"
    record = {
        "source": source,
        "dataset_name": dataset_name,
        "dataset_config_name": dataset_config_name,
        "train_data_dir": train_data_dir,
        "image_column": image_column,
        "split": "train",
        "num_images": num_images,
        "fingerprint": fingerprint,
        "resolution": resolution,
        "channels": channels,
        "bit_depth": 16 if preserve_input_precision else 8,
        "center_crop": center_crop,
        "random_flip": random_flip,
    }
    if held_out_images:
        record["held_out_images"] = held_out_images  # the last ones of the split, kept out of training
    return record


FINGERPRINT_OF = "sha256 of each image's encoded bytes, in the split's order"
"""What `data_fingerprint` hashes, as messages name it."""


def data_fingerprint(dataset: Dataset, image_column: str) -> str:
    r"""
    A fingerprint of the images of a (non-streaming) dataset: SHA-256 over the SHA-256 of each image's encoded bytes
    (the file an image folder holds, the bytes a parquet or Arrow file stores), in the dataset's order; the embedded
    digits (in memory, encoded by this machine's PIL) give their own fingerprint, a hash of their pixel values.

    It depends on the images only: not on the folder's path, the working folder, the `datasets` cache, the files'
    modification times, nor on the preprocessing flags. A copy of a folder elsewhere has the fingerprint of the
    original; an image changed, added, removed or reordered changes it. (`Dataset._fingerprint` does not serve for a
    plain folder: `_image_folder_dataset` sets it to the hash of the listing, absolute paths and modification times
    included, so a copy elsewhere differs; for Hub datasets it was not measured.) Reads every image's bytes once: about 1 s for 100 MB on a 2-core CPU, no decoding.
    """
    if not dataset.cache_files and dataset._fingerprint == digits_dataset()._fingerprint:
        return dataset._fingerprint  # the embedded digits: a hash of their pixels and labels
    undecoded = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    combined = hashlib.sha256()
    for batch in undecoded.iter(batch_size=1000):
        for value in batch[image_column]:
            data = value.get("bytes") if isinstance(value, dict) else None
            if data is None:
                with open(value["path"], "rb") as file:
                    data = file.read()
            combined.update(hashlib.sha256(data).digest())
    return combined.hexdigest()[:32]


def _base_name(path: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(os.path.expanduser(path))))


# The checks evaluate_ddpm.py makes against the record ---------------------------------------------------------------
SOURCE_FLAGS = ("dataset_name", "dataset_config_name", "train_data_dir", "image_column", "split", "num_channels")
"""Data flags that describe where the images come from: taken from the record only when no dataset is given."""
PREPROCESSING_FLAGS = ("resolution", "center_crop", "preserve_input_precision")
"""Data flags that describe what the model saw of each image: taken from the record unless given."""
DATA_FLAG_DEFAULTS = {"split": "train", "center_crop": False, "preserve_input_precision": False}
"""The defaults of the data flags that are not None, for an export without a record (before training_data.json)."""


def fill_data_flags(flags: Mapping[str, Any], record: dict | None, pipeline: str) -> tuple[dict[str, Any], list[str]]:
    """
    The data flags the user left unset (None in `flags`), filled from the training record of the export `pipeline`
    (`training_data.json`): where the images come from when no dataset is given, and how they were cropped, sized and
    stored unless given. Without a record, the previous defaults (the embedded digits, split train). Returns the
    values filled, by flag name, and the names of the flags that came from the record.

    Raises:
        `EvaluationInputError`: the record names a local folder (by its base name) that is not in the working folder.
    """
    values = {}
    if record is not None:
        recorded = {name: record.get(name) for name in SOURCE_FLAGS + PREPROCESSING_FLAGS}
        recorded["num_channels"] = record.get("channels")
        recorded["preserve_input_precision"] = record.get("bit_depth") == 16
        dataset_given = flags["dataset_name"] is not None or flags["train_data_dir"] is not None
        names = PREPROCESSING_FLAGS + (() if dataset_given else SOURCE_FLAGS)
        values = {name: recorded[name] for name in names if flags[name] is None}
    from_export = sorted(values)
    for name, default in DATA_FLAG_DEFAULTS.items():
        if values.get(name, flags[name]) is None:
            values[name] = default
    for flag in ("train_data_dir", "dataset_name"):
        if flag in from_export and record.get("source") in ("image-folder", "local-dataset"):
            folder = values[flag]
            if folder is not None and not os.path.isdir(folder):
                raise EvaluationInputError(
                    f"The model was trained on the folder {folder!r} ({TRAINING_DATA_FILE} of --pipeline {pipeline} "
                    f"names it by its base name), which is not in the working folder {os.getcwd()}: pass "
                    f"--{flag} with its path."
                )
    return values, from_export


def describe_data(dataset_name: str | None, train_data_dir: str | None) -> str:
    """The evaluation data as a message names it."""
    if dataset_name is not None:
        return f"--dataset_name {dataset_name}"
    if train_data_dir is not None:
        return f"--train_data_dir {train_data_dir}"
    return "the embedded digits (no --dataset_name or --train_data_dir)"


def check_bit_depth(
    preserve_input_precision: bool, record: dict | None, from_export: list[str], pipeline: str
) -> None:
    """
    Fails when `--preserve_input_precision`, given, contradicts the bit depth the model was trained at (the record's
    `bit_depth`): bits/dim over 65,536 levels of a model trained on 256, or the other way round, measure nothing.
    """
    if record is None or "preserve_input_precision" in from_export or record.get("bit_depth") not in (8, 16):
        return
    trained_bits, asked_bits = record["bit_depth"], 16 if preserve_input_precision else 8
    if asked_bits != trained_bits:
        raise EvaluationInputError(
            f"--preserve_input_precision {preserve_input_precision} asks for {asked_bits}-bit evaluation images, "
            f"but the model was trained on {trained_bits}-bit ones ({TRAINING_DATA_FILE} of --pipeline "
            f"{pipeline}): its bits/dim would count levels it never saw. Leave --preserve_input_precision out."
        )


def check_data_count(
    flags: Mapping[str, Any], record: dict | None, from_export: list[str], count: int, pipeline: str
) -> None:
    """
    Fails when the data the record names (taken from it, not from flags) holds another number of images than the
    model was trained on (the record's `num_images`, the whole split): other data behind the same base name.
    """
    if record is None or "dataset_name" not in from_export or not isinstance(record.get("num_images"), int):
        return  # the data was given by flags, or an older record without the count
    if flags["split"] != record.get("split", "train") or record["num_images"] == count:
        return
    train_data_dir, dataset_name = flags["train_data_dir"], flags["dataset_name"]
    folder = train_data_dir if train_data_dir is not None else dataset_name
    where = f"'{os.path.abspath(folder)}'" if record.get("source") in ("image-folder", "local-dataset") else folder
    if train_data_dir is not None:
        what_to_pass = "the folder it was trained on with --train_data_dir (a dataset with --dataset_name)"
    else:
        what_to_pass = "the dataset it was trained on with --dataset_name (a plain folder with --train_data_dir)"
    raise EvaluationInputError(
        f"The model was trained on {record['num_images']} images of split '{flags['split']}' of {folder!r} "
        f"({TRAINING_DATA_FILE} of --pipeline {pipeline}), but {where} has {count}: other data of the same "
        f"name. Pass {what_to_pass}."
    )


def same_name_as_recorded(flags: Mapping[str, Any], record: dict | None, from_export: list[str]) -> bool:
    """Whether the evaluation data goes by the name the training record gives its data: taken from the record, or
    given by flags that name the same kind of source with the same (base) name, configuration and split."""
    if record is None or flags["split"] != record.get("split", "train"):
        return False
    if "dataset_name" in from_export:
        return True
    source, dataset_name, train_data_dir = record.get("source"), flags["dataset_name"], flags["train_data_dir"]
    if source == "image-folder":
        return (
            dataset_name is None
            and train_data_dir is not None
            and (_base_name(train_data_dir) == record.get("train_data_dir"))
        )
    if train_data_dir is not None or dataset_name is None:
        return False
    if source == "local-dataset":
        return is_local_path(dataset_name) and _base_name(dataset_name) == record.get("dataset_name")
    return source == "hub-dataset" and (dataset_name, flags["dataset_config_name"]) == (
        record.get("dataset_name"),
        record.get("dataset_config_name"),
    )


def check_data_fingerprint(
    flags: Mapping[str, Any], record: dict, fingerprint: str, pipeline: str, allow_other_data: bool = False
) -> None:
    """
    Fails when the data evaluated under the recorded name (see `same_name_as_recorded`) has another fingerprint
    (`data_fingerprint`) than the record's, unless `allow_other_data`: other images of the same name (and count),
    which metrics.json would report as the training data.
    """
    if allow_other_data or fingerprint == record["fingerprint"]:
        return
    train_data_dir, dataset_name = flags["train_data_dir"], flags["dataset_name"]
    if train_data_dir is not None:
        where, name = f"--train_data_dir '{os.path.abspath(train_data_dir)}'", train_data_dir
        what_to_pass = "--train_data_dir with the folder it was trained on (or a copy of it)"
    elif dataset_name is not None:
        local = is_local_path(dataset_name)
        where = f"--dataset_name '{os.path.abspath(dataset_name) if local else dataset_name}'"
        name = dataset_name
        what_to_pass = "--dataset_name with the dataset it was trained on"
    else:
        where, name = "the embedded digits of this machine's scikit-learn", "embedded digits"
        what_to_pass = "--dataset_name or --train_data_dir with the data it was trained on"
    raise EvaluationInputError(
        f"The model was trained on images with fingerprint {record['fingerprint']} ({TRAINING_DATA_FILE} of "
        f"--pipeline {pipeline}), but {where} (split '{flags['split']}') has fingerprint {fingerprint} "
        f"({FINGERPRINT_OF}): other images under the name {name!r}. Pass {what_to_pass}, or add --allow_other_data "
        "to evaluate these images anyway."
    )
