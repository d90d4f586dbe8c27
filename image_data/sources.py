"""Where the training images come from: a Hub dataset, a local folder (a plain image folder through
`image_data.folder_listing`'s fast listing), or the embedded digits; the image column; the held-out images of the
evaluation; and the errors that say what is wrong with the data. The uint8 cache and the batches are in
`image_data.pixels`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from typing import Any

import datasets
import numpy as np
import pyarrow
from datasets import Dataset, IterableDataset
from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError
from PIL import Image

from hub_access import forced_offline_mode, offline_mode_requested, work_offline
from image_data.folder_listing import (
    accepted_extensions,
    broken_links,
    image_files,
    plain_image_folder,
    undecodable,
)


class DatasetUnavailableError(RuntimeError):
    """The requested dataset can neither be downloaded nor found locally."""


class ImageDataError(ValueError):
    """The dataset is available but its content cannot be used (missing column, corrupt image, ...)."""


def digits_dataset() -> Dataset:
    r"""
    The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits (1,797 images), no network needed.

    The original values 0..16 are scaled to 0..255 (`round(v * 255 / 16)`) and stored as grayscale ("L") images.

    Returns:
        `datasets.Dataset`: columns `image` (`datasets.Image`, 8x8, mode "L") and `label` (`datasets.ClassLabel`,
        names "0".."9").
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    features = datasets.Features(
        {"image": datasets.Image(mode="L"), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    images = [Image.fromarray(array, mode="L") for array in pixels]
    fingerprint = hashlib.sha256(pixels.tobytes() + digits.target.astype(np.int64).tobytes()).hexdigest()[:32]
    return in_memory_dataset({"image": images, "label": digits.target.tolist()}, features, fingerprint)


def in_memory_dataset(columns: dict[str, list], features: datasets.Features, fingerprint: str) -> Dataset:
    """
    `Dataset.from_dict` with the fingerprint given: from_dict hashes the Arrow table with dill, which fails under
    Python 3.12 with pyarrow 26 ("Can't pickle <class 'MonthDayNano'>", seen on the GPU machine's Python 3.12.3).
    """
    table = datasets.table.InMemoryTable.from_pydict(features.encode_batch(columns), schema=features.arrow_schema)
    return Dataset(table, info=datasets.DatasetInfo(features=features), fingerprint=fingerprint)


def _unavailable_message(name: str, reason: str) -> str:
    return (
        f"Dataset '{name}' is not available: {reason}. Check the name; run once with network access so that "
        "`datasets` caches it; or pass a local folder instead: --train_data_dir for a plain folder of images, or "
        "--dataset_name /path/to/folder for a folder laid out like a Hub dataset repository (data/train-*.parquet)."
    )


def _image_folder_dataset(images: list[tuple[str, int, int]], cache_dir: str | None) -> Dataset:
    r"""
    A memory-mapped `Dataset` with one `image` column of the `images`' paths, cached under a name derived from their
    paths, sizes and modification times: `preprocess_images` then caches the uint8 pixels next to it, and reuses them
    until an image changes, appears or disappears.
    """
    listing = hashlib.sha256()
    for path, size, mtime in images:
        listing.update(f"{path}\0{size}\0{mtime}\n".encode())
    root = os.path.join(cache_dir or datasets.config.HF_DATASETS_CACHE, "ddpm_imagefolder")
    target = os.path.join(root, listing.hexdigest()[:32])
    if not os.path.isdir(target):
        os.makedirs(root, exist_ok=True)
        # Paths as strings: `save_to_disk` would copy the bytes of every file into a column of `datasets.Image`.
        paths = {"image": [path for path, _, _ in images]}
        listed = in_memory_dataset(paths, datasets.Features({"image": datasets.Value("string")}), listing.hexdigest())
        staging = tempfile.mkdtemp(dir=root, prefix=".incomplete-")
        try:
            listed.save_to_disk(staging)
            os.rename(staging, target)  # atomic: readers see a complete folder or none
        except OSError:
            if not os.path.isdir(target):  # rather than another process having written the same listing meanwhile
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return datasets.load_from_disk(target).cast_column("image", datasets.Image())


def _no_images_message(folder: str) -> str:
    return (
        f"No images found in --train_data_dir {folder!r} (nor in its subfolders). Images are recognised by their "
        f"extension: {accepted_extensions()}. Put the images there, or point to the folder that holds them."
    )


def _no_rows_message(name: str, split: str) -> str:
    return (
        f"The split '{split}' of the dataset {name!r} has no rows: its data files hold no examples. Put the images "
        f"in them (a local folder: data/{split}-*.parquet with an image column), or choose a dataset or split that "
        "has images."
    )


def _missing_split_message(name: str, split: str, error: ValueError) -> str:
    """The split `split` of the dataset `name` (--dataset_name) does not exist or has no rows (the `datasets` error)."""
    if "corresponds to no data" in str(error):
        return _no_rows_message(name, split)
    which = "name its data files data/train-*.parquet (training reads the 'train' split)"
    return f"The dataset {name!r} has no split '{split}' ({error}). " + (
        "Choose one of its splits with --eval_split." if split != "train" else which.capitalize() + "."
    )


def _check_image_names(folder: str) -> None:
    r"""
    Refuse a folder with an image whose path is not valid UTF-8, naming it: `datasets` cannot list it; or with an
    image that is a broken link (its target missing, or a loop of links), naming the link and its target: `datasets`
    would skip it without a word.
    """
    paths = image_files(folder)
    broken = broken_links(folder, paths)
    if broken:
        path, target, why = broken[0]
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise ImageDataError(
            f"The image {path!r}{more} in --train_data_dir {folder!r} is a link to {target!r}, which {why}. Remove "
            "the link or fix its target, then run again."
        )
    bad = undecodable(paths)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ImageDataError(
            f"The image {os.fsencode(bad[0])!r}{more} in --train_data_dir {folder!r} has a name that is not valid "
            "UTF-8, which `datasets` cannot store. Rename it (e.g. `convmv -f latin1 -t utf8 -r --notest FOLDER`) or "
            "move it out of the folder, then run again."
        )


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    cache_dir: str | None = None,
    split: str = "train",
    streaming: bool = False,
) -> Dataset | IterableDataset:
    r"""
    Load the training images: a Hub dataset, a local folder, or the embedded digits.

    When `dataset_name` is not a local path and offline mode was not requested, the Hub is probed first (for
    `HUB_PROBE_TIMEOUT` seconds). If it does not answer, the dataset is loaded in offline mode, so a cached copy is still
    used and a missing one fails at once instead of after ~25 s of retries.

    Args:
        dataset_name (`str`, *optional*):
            A Hub dataset id (`uoft-cs/cifar10`) or a local folder laid out like a Hub dataset repository.
        dataset_config_name (`str`, *optional*):
            The dataset configuration, if the dataset has several.
        train_data_dir (`str`, *optional*):
            A folder of images, loaded as the `imagefolder` builder loads it: split folders such as `train/` are
            honoured and subfolder names become labels. A plain folder (see `plain_image_folder`) is listed by one
            walk instead, and its dataset has the `image` column only.
        cache_dir (`str`, *optional*):
            Where `datasets` stores downloads and Arrow files; defaults to the `datasets` cache.
        split (`str`, defaults to `"train"`):
            The split to load. Ignored by the embedded digits, which have only a train split.
        streaming (`bool`, defaults to `False`):
            Return an `IterableDataset` that reads the data lazily (for data larger than the disk cache).

    Returns:
        `datasets.Dataset` or `datasets.IterableDataset` (when `streaming`). With neither `dataset_name` nor
        `train_data_dir`, the embedded digits (`digits_dataset()`).

    Raises:
        `DatasetUnavailableError`: the dataset is not on the Hub, the Hub cannot be reached and no cached copy exists,
        or the local folder does not exist.
        `ImageDataError`: the local folder holds no data files.
        `ValueError`: both `dataset_name` and `train_data_dir` are given.
    """
    if dataset_name is not None and train_data_dir is not None:
        raise ValueError(
            f"Got both --dataset_name ({dataset_name!r}) and --train_data_dir ({train_data_dir!r}); pass only one."
        )
    if dataset_name is None and train_data_dir is None:
        dataset = digits_dataset()
        return dataset.to_iterable_dataset() if streaming else dataset

    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise DatasetUnavailableError(
                f"--train_data_dir {train_data_dir!r} is not a folder. Pass a folder that holds the training images "
                "(directly or in one subfolder per class)."
            )
        images = plain_image_folder(train_data_dir) if split == "train" else None
        if images == []:
            raise ImageDataError(_no_images_message(train_data_dir))
        if images:
            dataset = _image_folder_dataset(images, cache_dir)
            # One shard, as `datasets` streams a folder: the same examples in the same order.
            return dataset.to_iterable_dataset() if streaming else dataset
        _check_image_names(train_data_dir)  # `datasets` fails on a name that is not UTF-8, skips a broken link
        name, load_args, load_kwargs = train_data_dir, ("imagefolder",), {"data_dir": train_data_dir}
    else:
        name, load_args, load_kwargs = dataset_name, (dataset_name, dataset_config_name), {}

    is_local = train_data_dir is not None or os.path.exists(dataset_name)
    offline = not is_local and work_offline()
    try:
        with forced_offline_mode() if offline else contextlib.nullcontext():
            dataset = datasets.load_dataset(
                *load_args, **load_kwargs, cache_dir=cache_dir, split=split, streaming=streaming
            )
        # A stream of an empty split loads; its first batch would end in accelerate's "Batch does not contain any
        # data". Reading its first example (which the run reads next anyway) says so here.
        if streaming and next(iter(dataset.take(1)), None) is None:
            raise ValueError(f'Instruction "{split}" corresponds to no data!')
        return dataset
    except datasets.data_files.EmptyDatasetError as error:
        if train_data_dir is not None:
            raise ImageDataError(_no_images_message(train_data_dir)) from error
        raise ImageDataError(
            f"Found no data files in '{name}' ({error}). Put the images (or data/train-*.parquet files) there, or "
            "point to the folder that holds them."
        ) from error
    except ConnectionError as error:
        reason = "offline mode is on" if offline_mode_requested() else "the Hugging Face Hub cannot be reached"
        raise DatasetUnavailableError(
            _unavailable_message(name, f"{reason} and no cached copy was found ({error})")
        ) from error
    except (DatasetNotFoundError, FileNotFoundError) as error:
        where = "it is not a local folder and no cached copy was found" if offline else "it was not found"
        raise DatasetUnavailableError(_unavailable_message(name, f"{where} ({error})")) from error
    except (DatasetGenerationError, pyarrow.ArrowException) as error:  # a data file that `datasets` cannot read
        cause = error.__cause__ or error
        if "BatchSize must be greater than 0" in str(cause):  # pyarrow on a parquet file of 0 rows
            raise ImageDataError(_no_rows_message(name, split)) from error
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise ImageDataError(
            f"`datasets` cannot read the data files of {name!r} (split '{split}'): {type(cause).__name__}: {detail}. "
            "Check or rewrite those files."
        ) from error
    except (
        ValueError
    ) as error:  # "Unknown split", "Bad split" (streaming), "Instruction 'train' corresponds to no data!"
        no_rows = "corresponds to no data" in str(error)
        if train_data_dir is None:
            if not no_rows and not str(error).startswith(("Unknown split", "Bad split")):
                raise
            raise ImageDataError(_missing_split_message(name, split, error)) from error
        if "split" not in str(error) and not no_rows:
            raise
        if not image_files(train_data_dir):
            raise ImageDataError(_no_images_message(train_data_dir)) from error
        raise ImageDataError(
            f"--train_data_dir {train_data_dir!r} has no split '{split}' ({error}). `datasets` takes the splits of an "
            "image folder from the names in it: a file or folder whose name has 'train', 'test', 'validation', "
            "'valid', 'dev', 'val' or 'eval' between separators ('-', '_', '.', ' ', digits, '/') makes a split "
            "(`train/`, `test/`, `my_test.png`), and the files without one then belong to none. Rename such files, "
            "or put the images to train on in a `train/` subfolder."
        ) from error


def find_image_column(dataset: Dataset | IterableDataset, image_column: str | None = None) -> str:
    r"""
    The name of the column that holds the images.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`):
            The loaded dataset.
        image_column (`str`, *optional*):
            The column to use; by default the first column whose feature is `datasets.Image`.

    Raises:
        `ImageDataError`: `image_column` is not a column, or no column holds images; the message lists the columns.
    """
    features = dataset.features
    if features is None:
        # Streaming datasets without metadata learn their columns from the first example.
        first = next(iter(dataset))
        columns = list(first)
        candidates = [name for name, value in first.items() if isinstance(value, Image.Image)]
    else:
        columns = list(features)
        candidates = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if image_column is not None:
        if image_column not in columns:
            raise ImageDataError(
                f"--image_column {image_column!r} is not a column of the dataset; its columns are {columns}."
            )
        kind = _not_an_image_column(features[image_column] if features is not None else first[image_column])
        if kind is not None:
            others = f"its image columns are {candidates}" if candidates else f"it has no image column ({columns})"
            raise ImageDataError(
                f"--image_column {image_column!r} holds {kind}, not images; {others}. Pass --image_column with a "
                "column of images (a `datasets.Image` feature, or image bytes or file paths)."
            )
        return image_column
    if not candidates:
        raise ImageDataError(
            f"Found no image column (a `datasets.Image` feature) in the dataset; its columns are {columns}. "
            "Name the column that holds the images with --image_column."
        )
    return candidates[0]


def _not_an_image_column(feature_or_value: Any) -> str | None:
    """What a column (its feature, or a streamed example's value) holds if it cannot hold images, else `None`."""
    if isinstance(feature_or_value, datasets.ClassLabel):
        return "class labels"
    if isinstance(feature_or_value, datasets.Value):
        if feature_or_value.dtype in ("string", "large_string", "binary", "large_binary"):
            return None  # file paths or encoded image bytes, which the Image feature decodes
        return f"values of type {feature_or_value.dtype}"
    if isinstance(feature_or_value, (bool, int, float)):
        return f"values of type {type(feature_or_value).__name__}"
    if isinstance(feature_or_value, (datasets.Image, dict, str, bytes, Image.Image)):
        return None  # an Image feature, a {"bytes", "path"} struct, a path, encoded bytes, or a decoded image
    return f"values of type {type(feature_or_value).__name__}"


def held_out_count(config: dict) -> int:
    """How many images at the end of the training split the run with these (public) flags keeps out of training."""
    if config.get("eval_steps") and config.get("eval_split") is None:
        return config["eval_holdout_images"]
    return 0


def split_held_out(dataset: Dataset, count: int) -> tuple[Dataset, Dataset]:
    r"""
    Split the preprocessed training images into those trained on and the last `count`, held out for evaluation.

    The split is by position in the dataset (before any shuffling), so every run and every process holds out the
    same images: for the embedded digits, the last `count` of scikit-learn's 1,797 (the digits feature network was
    not trained on the last 297 either).

    Raises:
        `ImageDataError`: holding out `count` images would leave none to train on.
    """
    if count >= len(dataset):
        raise ImageDataError(
            f"--eval_holdout_images {count} leaves no images to train on: the training split has {len(dataset)}. "
            "Hold out fewer, or evaluate on another split with --eval_split."
        )
    boundary = len(dataset) - count
    return dataset.select(range(boundary)), dataset.select(range(boundary, len(dataset)))
