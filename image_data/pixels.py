"""The uint8 cache and the training batches: images decoded, converted and resized once into a `datasets` cache
(`preprocess_images`, `load_pixels`), read as whole batches from its memory-mapped Arrow column (`PixelBatches`), and
turned into model input on the training device (`images_to_model_input`).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, IterableDataset
from PIL import Image

from image_data.image_modes import (
    CHANNEL_CHOICES,
    CONVERSION_VERSION,
    MAX_16_BIT,
    decide_channels,
    refuse_lost_precision,
    to_cache_array,
    to_cache_mode,
)
from image_data.sources import ImageDataError, find_image_column, load_image_dataset
from pipelines import pixels_to_model_range


def _resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    # torchvision's Resize(int): the short side becomes `resolution`, the long side is scaled and truncated.
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def _decode_image(value: dict[str, Any], row: int, channels: int, preserve_input_precision: bool) -> Image.Image:
    path, data = value.get("path"), value.get("bytes")
    where = f"'{path}' (row {row})" if path else f"at row {row}"
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            refuse_lost_precision(image, preserve_input_precision, where)  # before load(), which forgets the depth
            image.load()
            return to_cache_mode(image, channels, preserve_input_precision, where)
    except ImageDataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageDataError(
            f"Cannot decode the image {where}: {error}. Remove or fix that file, then run again."
        ) from error


def _to_pixels(
    batch: dict[str, list],
    indices: list[int],
    image_column: str,
    resolution: int,
    channels: int,
    preserve_input_precision: bool,
    center_crop: bool,
    seed: int,
    conversion_version: int,  # unused here: it only keys the cache (see image_modes.CONVERSION_VERSION)
) -> dict[str, list[np.ndarray]]:
    pixels = []
    for value, index in zip(batch[image_column], indices, strict=True):
        if value is None:
            raise ImageDataError(f"Row {index} has no image. Remove that row or fill it, then run again.")
        image = _decode_image(value, index, channels, preserve_input_precision)
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
        pixels.append(to_cache_array(image, channels, preserve_input_precision))
    return {"pixels": pixels}


# The name `tempfile.NamedTemporaryFile` gives the file `Dataset.map` writes its cache to, before renaming it.
MAP_TEMPORARY_FILE = re.compile(r"tmp[a-z0-9_]{8}")


@contextlib.contextmanager
def _no_temporary_files_left(dataset: Dataset | IterableDataset):
    r"""
    Remove the temporary files that a failed `Dataset.map` leaves in the cache folder of `dataset`: on a full disk,
    `datasets` (5.x) finalizes its writer again before it removes its temporary file, which fails again and leaves it
    (a half-written cache of the pixels, as large as the disk had room for). Only the files named as `tempfile` names
    them that appeared in that folder during the `map` are removed: the files there before are left alone.
    """
    cache_files = getattr(dataset, "cache_files", None) or []
    folder = os.path.dirname(cache_files[0]["filename"]) if cache_files else None

    def temporary_files() -> set[str]:
        with contextlib.suppress(OSError):
            return {name for name in os.listdir(folder) if MAP_TEMPORARY_FILE.fullmatch(name)}
        return set()

    before = temporary_files() if folder else set()
    try:
        yield
    except BaseException:
        for name in sorted(temporary_files() - before) if folder else []:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
        raise


def preprocess_images(
    dataset: Dataset | IterableDataset,
    image_column: str,
    resolution: int,
    channels: int,
    center_crop: bool = True,
    seed: int = 0,
    num_proc: int | None = None,
    preserve_input_precision: bool = False,
) -> Dataset | IterableDataset:
    r"""
    Decode, resize and crop every image once, into a uint8 `pixels` column of shape (channels, resolution, resolution)
    (uint16 with `preserve_input_precision`).

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
            1 converts the images to grayscale ("L"), 3 to "RGB" (transparency composited on white), 4 to "RGBA";
            see `image_data.image_modes` for each PIL mode, 16-bit and float images.
        center_crop (`bool`, defaults to `True`):
            Crop the center of the resized image; otherwise a random crop chosen once per image.
        seed (`int`, defaults to 0):
            Seed of the random crops.
        num_proc (`int`, *optional*):
            Worker processes for the conversion (not used when streaming).
        preserve_input_precision (`bool`, defaults to `False`):
            Cache uint16 values: 16-bit images as they are, 8-bit ones times 257. Otherwise 16-bit images are scaled
            to 8 bits (`round(value * 255 / 65535)`).

    Returns:
        The dataset with the single column `pixels`, in torch format: a `torch.Tensor` of shape (channels, resolution,
        resolution) per example, uint8 for a `Dataset` and int64 for an `IterableDataset` (whose `with_format` takes
        no dtype). Batch either with `collate_pixels`, which gives uint8.

    Raises:
        `ImageDataError`: a missing image column, or an image that cannot be decoded (the message names its file or
        row).
        `ValueError`: `channels` is not 1, 3 or 4, or `resolution` is not positive.
    """
    if channels not in CHANNEL_CHOICES:
        raise ValueError(f"channels must be 1 (grayscale), 3 (RGB) or 4 (RGBA), got {channels}.")
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}.")
    find_image_column(dataset, image_column)
    dtype = "uint16" if preserve_input_precision else "uint8"
    features = datasets.Features({"pixels": datasets.Array3D(shape=(channels, resolution, resolution), dtype=dtype)})
    fn_kwargs = {
        "image_column": image_column,
        "resolution": resolution,
        "channels": channels,
        "preserve_input_precision": preserve_input_precision,
        "center_crop": center_crop,
        "seed": seed,
        "conversion_version": CONVERSION_VERSION,
    }
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    map_kwargs = {"num_proc": num_proc, "desc": "Decoding and resizing images"} if isinstance(dataset, Dataset) else {}
    with _no_temporary_files_left(dataset):
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
        return dataset.with_format("torch", dtype=getattr(torch, dtype))
    # IterableDataset.with_format takes no tensor options: its torch tensors come out as int64 (`collate_pixels`
    # turns them back into uint8).
    return dataset.with_format("torch")


def load_pixels(
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_data_dir: str | None,
    *,
    resolution: int,
    channels: int | None,
    image_column: str | None = None,
    cache_dir: str | None = None,
    split: str = "train",
    streaming: bool = False,
    center_crop: bool = True,
    seed: int = 0,
    num_proc: int | None = None,
    limit: int | None = None,
    preserve_input_precision: bool = False,
) -> tuple[Dataset | IterableDataset, str]:
    r"""
    The uint8 `pixels` of a dataset split, as the training and evaluation scripts read it: `load_image_dataset`, then
    `find_image_column`, then (after keeping the first `limit` images, if given) `preprocess_images`. `channels=None`
    takes the channel count from the data (`image_data.image_modes.decide_channels`); the result's
    `features["pixels"].shape[0]` says which.

    Returns:
        The preprocessed dataset and the name of the image column it was read from.
    """
    dataset = load_image_dataset(
        dataset_name, dataset_config_name, train_data_dir, cache_dir=cache_dir, split=split, streaming=streaming
    )
    column = find_image_column(dataset, image_column)
    if limit is not None:
        dataset = dataset.take(limit) if streaming else dataset.select(range(min(limit, len(dataset))))
    if channels is None:
        channels, _ = decide_channels(dataset, column)
    pixels = preprocess_images(
        dataset,
        column,
        resolution,
        channels,
        center_crop=center_crop,
        seed=seed,
        num_proc=num_proc,
        preserve_input_precision=preserve_input_precision,
    )
    return pixels, column


def collate_pixels(examples: list[dict[str, torch.Tensor]], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    r"""
    `collate_fn` for a `torch.utils.data.DataLoader` over `preprocess_images`' output: a uint8 batch (B, C, H, W)
    (`dtype=torch.uint16` for a cache built with `preserve_input_precision`: `functools.partial`).

    Streaming datasets give int64 tensors (see `preprocess_images`); the values fit `dtype`, so the cast is exact and
    the batch moves to the training device at one (two) byte(s) a value.
    """
    return torch.stack([example["pixels"] for example in examples]).to(dtype)


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
        self.dtype = np.dtype(dataset.features["pixels"].dtype)
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
        batch = np.empty((len(rows), *self.shape), dtype=self.dtype)
        for chunk in np.unique(chunk_of_row):
            selected = chunk_of_row == chunk
            batch[selected] = views[chunk][rows[selected] - starts[chunk]]
        return torch.from_numpy(batch)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]

    def all(self) -> torch.Tensor:
        """Every image, as one uint8 tensor (N, C, H, W)."""
        return self.__getitems__(list(range(len(self))))


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
            uint8 images of shape (batch, channels, height, width), on the training device; or uint16 ones (a cache
            built with `preserve_input_precision`), scaled by 65535 instead of 255.
        random_flip (`bool`):
            Flip each image horizontally with probability 1/2 (the paper's only augmentation).
        generator (`torch.Generator`, *optional*):
            Source of the per-example coins; torch's global RNG by default. The coins are drawn on the generator's
            device and moved to the images' device.

    Returns:
        `torch.Tensor`: float32, `pixels / 127.5 - 1` (uint16: `pixels / 32767.5 - 1`), same shape and device.
    """
    if pixels_uint8.dtype == torch.uint16:
        images = pixels_uint8.to(torch.float32) / (MAX_16_BIT / 2) - 1.0
    else:
        images = pixels_to_model_range(pixels_uint8)
    if not random_flip:
        return images
    device = generator.device if generator is not None else images.device
    flip = torch.rand(images.shape[0], generator=generator, device=device) < 0.5
    flip = flip.to(images.device).view(-1, *([1] * (images.ndim - 1)))
    return torch.where(flip, images.flip(-1), images)
