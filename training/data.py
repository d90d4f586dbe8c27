"""Training data for train_ddpm.py: loading, and the uint8 image cache.

Images are decoded, resized and cropped once with PIL and stored by `datasets` as uint8 arrays (Arrow files,
memory-mapped, reused on the next run through the `datasets` cache). Scaling to [-1, 1] and random flips happen per
batch on the training device with torch ops (`images_to_model_input`), so no per-sample Python transform runs in the
training loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, IterableDataset
from datasets import data_files as hub_data_files
from datasets.exceptions import DatasetNotFoundError
from datasets.packaged_modules.folder_based_builder.folder_based_builder import FolderBasedBuilder
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from packaging import version
from PIL import Image

from hub_access import forced_offline_mode, offline_mode_requested, work_offline

VERIFIED_IMAGEFOLDER_RULES = "5.2.0"
"""The `datasets` version whose imagefolder file rules `plain_image_folder` follows (older ones go through `datasets`;
`tests/test_data.py` compares the two on the installed version)."""


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


def plain_image_folder(folder: str) -> list[tuple[str, int, int]] | None:
    r"""
    The images that `datasets.load_dataset("imagefolder", data_dir=folder, split="train")` loads, found by one walk
    of the folder: (absolute path, size, modification time in ns) per image, in the order `datasets` gives them.

    `datasets` decides the splits of a folder by globbing it once for each of 66 patterns, then reads every file's
    metadata and hashes the list, on every load: 80 to 100 s and 140 to 180 MiB for 100,000 images on a 2-core CPU
    (`benchmarks/bench_load.py`), before its cache is even looked up. One `os.walk` takes half a second. Its rules are
    applied here as it applies them (files and folders starting with "." and folders starting with "__" skipped,
    `README.md` and the like ignored, images recognised by `ImageFolder.EXTENSIONS`, links to files followed and links
    to folders not) where they come down to "every image is the train split". Anything else returns None and is left to
    `datasets`: a path that might name a split (one containing `train`, `test`, `val`, `dev`, `eval`, ...), a metadata
    file, a zip archive, an unreadable entry.
    """
    literals = _split_pattern_literals()
    if literals is None or version.parse(datasets.__version__) < version.parse(VERIFIED_IMAGEFOLDER_RULES):
        return None
    base = os.path.realpath(folder)
    metadata_names = set(FolderBasedBuilder.METADATA_FILENAMES)
    ignored_names = set(hub_data_files.FILES_TO_IGNORE)
    image_extensions = set(ImageFolder.EXTENSIONS)

    def hidden(name: str) -> bool:
        return name.startswith(".") and set(name) != {"."}

    seen, images, errors = [], [], []  # every file that decides the splits; the images among them
    for root, dirs, files in os.walk(base, onerror=errors.append):
        dirs[:] = [name for name in dirs if not hidden(name) and not name.startswith("__")]
        prefix = os.path.relpath(root, base)
        for name in files:
            if hidden(name) or name in ignored_names:
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
        except (OSError, UnicodeEncodeError):  # a broken link, a name that is not UTF-8
            return None
        if stat.S_ISREG(status.st_mode):  # as `datasets`, which skips pipes, sockets and devices
            listed.append((path, status.st_size, status.st_mtime_ns))
    return listed


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
        if images:
            dataset = _image_folder_dataset(images, cache_dir)
            # One shard, as `datasets` streams a folder: the same examples in the same order.
            return dataset.to_iterable_dataset() if streaming else dataset
        name, load_args, load_kwargs = train_data_dir, ("imagefolder",), {"data_dir": train_data_dir}
    else:
        name, load_args, load_kwargs = dataset_name, (dataset_name, dataset_config_name), {}

    is_local = train_data_dir is not None or os.path.exists(dataset_name)
    offline = not is_local and work_offline()
    try:
        with forced_offline_mode() if offline else contextlib.nullcontext():
            return datasets.load_dataset(
                *load_args, **load_kwargs, cache_dir=cache_dir, split=split, streaming=streaming
            )
    except datasets.data_files.EmptyDatasetError as error:
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
    except ValueError as error:  # "Unknown split", "Instruction 'train' corresponds to no data!"
        if train_data_dir is None or ("split" not in str(error) and "corresponds to no data" not in str(error)):
            raise
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
        return image_column
    if not candidates:
        raise ImageDataError(
            f"Found no image column (a `datasets.Image` feature) in the dataset; its columns are {columns}. "
            "Name the column that holds the images with --image_column."
        )
    return candidates[0]


def _resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    # torchvision's Resize(int): the short side becomes `resolution`, the long side is scaled and truncated.
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def _decode_image(value: dict[str, Any], row: int, mode: str) -> Image.Image:
    path, data = value.get("path"), value.get("bytes")
    where = f"'{path}' (row {row})" if path else f"at row {row}"
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            return image.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageDataError(
            f"Cannot decode the image {where}: {error}. Remove or fix that file, then run again."
        ) from error


def _to_pixels(
    batch: dict[str, list],
    indices: list[int],
    image_column: str,
    resolution: int,
    mode: str,
    center_crop: bool,
    seed: int,
) -> dict[str, list[np.ndarray]]:
    pixels = []
    for value, index in zip(batch[image_column], indices, strict=True):
        if value is None:
            raise ImageDataError(f"Row {index} has no image. Remove that row or fill it, then run again.")
        image = _decode_image(value, index, mode)
        size = _resized_size(*image.size, resolution)
        if size != image.size:
            image = image.resize(size, resample=Image.BILINEAR)
        width, height = image.size
        if center_crop:
            # torchvision's CenterCrop rounding.
            top, left = int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0))
        else:
            rng = np.random.default_rng([seed, index])
            top = int(rng.integers(0, height - resolution + 1))
            left = int(rng.integers(0, width - resolution + 1))
        image = image.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(image, dtype=np.uint8)
        pixels.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    return {"pixels": pixels}


def preprocess_images(
    dataset: Dataset | IterableDataset,
    image_column: str,
    resolution: int,
    channels: int,
    center_crop: bool = True,
    seed: int = 0,
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    r"""
    Decode, resize and crop every image once, into a uint8 `pixels` column of shape (channels, resolution, resolution).

    This is what diffusers' `train_unconditional.py` does per sample and per step with torchvision's `Resize`
    (bilinear, short side to `resolution`) and `CenterCrop` / `RandomCrop`, done once with PIL and cached by `datasets`.
    A random crop (`center_crop=False`) is chosen once per image, from `seed` and the row index, rather than anew
    every epoch: the two differ only for non-square images, since a square image resized to `resolution` has a single
    possible crop.

    Datasets with Arrow files on disk (Hub, local folders) get the result cached next to them and memory-mapped, so a
    later run with the same arguments reuses it; in-memory datasets (the embedded digits) keep it in memory.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`):
            The loaded dataset; streaming datasets are processed lazily, as they are read.
        image_column (`str`):
            The column that holds the images (see `find_image_column`).
        resolution (`int`):
            Side of the square output images.
        channels (`int`):
            1 converts the images to grayscale ("L"), 3 to "RGB".
        center_crop (`bool`, defaults to `True`):
            Crop the center of the resized image; otherwise a random crop chosen once per image.
        seed (`int`, defaults to 0):
            Seed of the random crops.
        num_proc (`int`, *optional*):
            Worker processes for the conversion (not used when streaming).

    Returns:
        The dataset with the single column `pixels`, in torch format: a `torch.Tensor` of shape (channels, resolution,
        resolution) per example, uint8 for a `Dataset` and int64 for an `IterableDataset` (whose `with_format` takes
        no dtype). Batch either with `collate_pixels`, which gives uint8.

    Raises:
        `ImageDataError`: a missing image column, or an image that cannot be decoded (the message names its file or
        row).
        `ValueError`: `channels` is not 1 or 3, or `resolution` is not positive.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}.")
    find_image_column(dataset, image_column)
    features = datasets.Features({"pixels": datasets.Array3D(shape=(channels, resolution, resolution), dtype="uint8")})
    fn_kwargs = {
        "image_column": image_column,
        "resolution": resolution,
        "mode": "L" if channels == 1 else "RGB",
        "center_crop": center_crop,
        "seed": seed,
    }
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    map_kwargs = {"num_proc": num_proc, "desc": "Decoding and resizing images"} if isinstance(dataset, Dataset) else {}
    dataset = dataset.map(
        _to_pixels,
        batched=True,
        with_indices=True,
        fn_kwargs=fn_kwargs,
        remove_columns=dataset.column_names,
        features=features,
        **map_kwargs,
    )
    if isinstance(dataset, Dataset):
        return dataset.with_format("torch", dtype=torch.uint8)
    # IterableDataset.with_format takes no tensor options: its torch tensors come out as int64 (`collate_pixels`
    # turns them back into uint8).
    return dataset.with_format("torch")


def load_pixels(
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_data_dir: str | None,
    *,
    resolution: int,
    channels: int,
    image_column: str | None = None,
    cache_dir: str | None = None,
    split: str = "train",
    streaming: bool = False,
    center_crop: bool = True,
    seed: int = 0,
    num_proc: int | None = None,
    limit: int | None = None,
) -> tuple[Dataset | IterableDataset, str]:
    r"""
    The uint8 `pixels` of a dataset split, as the training and evaluation scripts read it: `load_image_dataset`, then
    `find_image_column`, then (after keeping the first `limit` images, if given) `preprocess_images`.

    Returns:
        The preprocessed dataset and the name of the image column it was read from.
    """
    dataset = load_image_dataset(
        dataset_name, dataset_config_name, train_data_dir, cache_dir=cache_dir, split=split, streaming=streaming
    )
    column = find_image_column(dataset, image_column)
    if limit is not None:
        dataset = dataset.take(limit) if streaming else dataset.select(range(min(limit, len(dataset))))
    pixels = preprocess_images(
        dataset, column, resolution, channels, center_crop=center_crop, seed=seed, num_proc=num_proc
    )
    return pixels, column


def held_out_images(config: dict) -> int:
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


def collate_pixels(examples: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    r"""
    `collate_fn` for a `torch.utils.data.DataLoader` over `preprocess_images`' output: a uint8 batch (B, C, H, W).

    Streaming datasets give int64 tensors (see `preprocess_images`); the values are 0..255, so the cast is exact and
    the batch moves to the training device at one byte a value.
    """
    return torch.stack([example["pixels"] for example in examples]).to(torch.uint8)


class PixelBatches(torch.utils.data.Dataset):
    r"""
    The `pixels` of `preprocess_images`' (non-streaming) output, served a whole batch at a time.

    A `DataLoader` calls `__getitems__` with a batch's indices; the rows are gathered with numpy from zero-copy views
    of the memory-mapped Arrow chunks into one new uint8 array, the batch: 0.07 ms for 128 random images of 3x32x32
    on a 2-core CPU, against 10.6 ms for `datasets`' per-batch torch formatting of the `Array3D` column, and it
    allocates nothing but the batch: Arrow's `take` went through its memory pool, which kept what it freed
    (72 MiB of anonymous memory after one pass over 10,000 such images). Use it with
    `collate_fn=collate_pixel_batch`.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.shape = tuple(dataset.features["pixels"].shape)
        self._views = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getstate__(self) -> dict:
        # DataLoader workers get the dataset (memory-mapped again), not copies of the views' pages.
        return {**self.__dict__, "_views": None}

    def _chunk_views(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None] | None:
        """Per Arrow chunk, a (rows, C, H, W) numpy view of its values; chunk starts; the row mapping of a view."""
        table = getattr(getattr(self.dataset, "data", None), "table", None)
        if not isinstance(table, pa.Table) or not hasattr(self.dataset, "_indices"):
            return None  # a `datasets` without these internals: the public path below
        views = []
        for chunk in table.column("pixels").chunks:
            storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
            values = storage.flatten().flatten().flatten()  # honours offsets: zero-copy, no nulls in pixels
            views.append(values.to_numpy(zero_copy_only=True).reshape(len(chunk), *self.shape))
        starts = np.cumsum([0] + [len(view) for view in views])
        mapping = (
            None if self.dataset._indices is None else self.dataset._indices.column(0).to_numpy().astype(np.int64)
        )
        return views, starts, mapping

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        if self._views is None:
            self._views = self._chunk_views() or False
        if self._views is False:
            return self.dataset[indices]["pixels"]
        views, starts, mapping = self._views
        rows = np.asarray(indices, dtype=np.int64)
        if mapping is not None:  # a shuffled or selected view: map to the rows of the table
            rows = mapping[rows]
        chunk_of_row = np.searchsorted(starts, rows, side="right") - 1
        batch = np.empty((len(rows), *self.shape), dtype=np.uint8)
        for chunk in np.unique(chunk_of_row):
            selected = chunk_of_row == chunk
            batch[selected] = views[chunk][rows[selected] - starts[chunk]]
        return torch.from_numpy(batch)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]


def collate_pixel_batch(batch: torch.Tensor) -> torch.Tensor:
    """`collate_fn` for [`PixelBatches`]: the batch is already one uint8 tensor (B, C, H, W)."""
    return batch


def images_to_model_input(
    pixels_uint8: torch.Tensor, random_flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""
    Turn a batch of cached uint8 images into model input: float32 in [-1, 1], optionally flipped left-right.

    Args:
        pixels_uint8 (`torch.Tensor`):
            uint8 images of shape (batch, channels, height, width), on the training device.
        random_flip (`bool`):
            Flip each image horizontally with probability 1/2 (the paper's only augmentation).
        generator (`torch.Generator`, *optional*):
            Source of the per-example coins; torch's global RNG by default. The coins are drawn on the generator's
            device and moved to the images' device.

    Returns:
        `torch.Tensor`: float32, `pixels / 127.5 - 1`, same shape and device.
    """
    images = pixels_uint8.to(torch.float32) / 127.5 - 1.0
    if not random_flip:
        return images
    device = generator.device if generator is not None else images.device
    flip = torch.rand(images.shape[0], generator=generator, device=device) < 0.5
    flip = flip.to(images.device).view(-1, *([1] * (images.ndim - 1)))
    return torch.where(flip, images.flip(-1), images)
