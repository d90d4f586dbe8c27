"""What every PIL image mode becomes in the pixel cache: its channel count (`decide_channels`, `to_cache_mode`) and its
bit depth (16-bit scaled to 8, or kept with `preserve_input_precision`; float images refused). The rules, mode by
mode, are in docs/data.md."""

from __future__ import annotations

import io
import logging
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image, ImageCms

from image_data.sources import ImageDataError

logger = logging.getLogger(__name__)

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
GRAYSCALE_MODES = ("L", "1", "LA", "La", "LA;16", *SIXTEEN_BIT_MODES)
FLOAT_MODES = ("F",)
CHANNEL_CHOICES = (1, 3, 4)
# How many images `decide_channels` looks at: the first ones, read lazily (only their headers are decoded).
CHANNEL_SAMPLE_SIZE = 64
MAX_16_BIT = 65535


# What PIL opens a PNG or TIFF of 16 bits a channel as when it has no 16-bit mode for it: the high byte of each value,
# in an 8-bit mode. `stored_mode` names them by what the file stores; the 16-bit grayscale+alpha PNG (colour type 4)
# opens as "RGBA" (its gray replicated), so only the raw mode tells it from colour.
SIXTEEN_BIT_READ_AS_8 = {
    "LA;16": "16 bits per channel of grayscale with alpha (PNG colour type 4), which PIL reads as 8-bit RGBA",
    "RGB;16": "16 bits per colour channel (48-bit RGB), which PIL reads as 8 bits a channel",
    "RGBA;16": "16 bits per colour channel (64-bit RGBA), which PIL reads as 8 bits a channel",
    "CMYK;16": "16 bits per colour channel (64-bit CMYK), which PIL reads as 8 bits a channel",
}
PLANAR_CONFIGURATION, BITS_PER_SAMPLE = 284, 258  # TIFF tags


def _raw_modes(image: Image.Image) -> list[str]:
    return [str(tile.args if not isinstance(tile.args, tuple) else tile.args[0]) for tile in image.tile or []]


def _tiff_bits(image: Image.Image) -> int:
    """The largest BitsPerSample of a TIFF (0 for other formats)."""
    tags = getattr(image, "tag_v2", None)
    bits = tags.get(BITS_PER_SAMPLE) if tags is not None else None
    if bits is None:
        return 0
    return max(bits) if isinstance(bits, tuple) else int(bits)


def stored_mode(image: Image.Image) -> str:
    r"""
    The mode of what an opened, not yet loaded image stores: its PIL mode, except for the files of 16 bits a channel
    that PIL decodes to 8 (the high byte), named by what they store (keys of `SIXTEEN_BIT_READ_AS_8`): "LA;16" (a
    16-bit grayscale+alpha PNG, which PIL opens as "RGBA"), "RGB;16", "RGBA;16", "CMYK;16" (PNG or TIFF). The tiles'
    raw modes and the TIFF tags say so until `load()` forgets the tiles.
    """
    raw_modes = _raw_modes(image)
    if any(raw_mode.startswith("LA;16") for raw_mode in raw_modes):
        return "LA;16"
    if image.mode in ("RGB", "RGBA", "CMYK") and (
        any(";16" in raw_mode for raw_mode in raw_modes) or _tiff_bits(image) > 8
    ):
        return f"{image.mode};16"
    return image.mode


def is_16_bit_colour(image: Image.Image) -> bool:
    """Whether an opened, not yet loaded image stores 16 bits a channel that PIL decodes to 8 (see `stored_mode`)."""
    return stored_mode(image) in SIXTEEN_BIT_READ_AS_8


def refuse_lost_precision(image: Image.Image, preserve_input_precision: bool, where: str) -> None:
    r"""
    Refuse, before `load()`, an image that PIL would decode wrongly: a TIFF of 16 bits a channel with its channels in
    separate planes (PlanarConfiguration 2), whose planes PIL reads as 8-bit ones (other pixels, without an error);
    and, with `preserve_input_precision`, an image of 16 bits a channel that PIL reads as 8 (see `stored_mode`).
    """
    bits = _tiff_bits(image)  # 0 unless a TIFF
    if bits > 8 and len(image.getbands()) > 1 and image.tag_v2.get(PLANAR_CONFIGURATION) == 2:
        raise ImageDataError(
            f"The image {where} is a TIFF of {bits} bits per channel stored in separate planes "
            "(PlanarConfiguration 2), which PIL decodes into wrong pixels. Save it with interleaved channels "
            "(e.g. `tiffcp -p contig IN OUT`) or as PNG, then run again."
        )
    kind = stored_mode(image)
    if preserve_input_precision and kind in SIXTEEN_BIT_READ_AS_8:
        if kind == "LA;16":
            keep = (
                "it keeps 16 bits for grayscale images without alpha (modes I;16 and I). Composite the images on "
                "white into 16-bit grayscale without alpha, or run without --preserve_input_precision (8 bits, alpha "
                "composited on white)."
            )
        else:
            keep = (
                "it keeps 16 bits for grayscale images (modes I;16 and I). Convert the images to 16-bit grayscale, "
                "or run without --preserve_input_precision (8 bits a channel)."
            )
        raise ImageDataError(
            f"The image {where} has {SIXTEEN_BIT_READ_AS_8[kind]}, so --preserve_input_precision cannot keep them: "
            + keep
        )


def natural_channels(mode: str) -> int:
    """1 for grayscale modes (with or without alpha, any bit depth; `stored_mode`'s "LA;16" too), 3 for every other
    mode (RGBA included)."""
    return 1 if mode in GRAYSCALE_MODES else 3


def has_transparency(image: Image.Image) -> bool:
    """Whether the image has an alpha channel or a transparency key (a palette's or a tRNS colour)."""
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def sixteen_bit_values(image: Image.Image, where: str) -> np.ndarray:
    """The values of a 16-bit grayscale image as a uint16 (H, W) array; "I" images must hold values in 0..65535."""
    values = np.asarray(image)
    if values.dtype != np.uint16:
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > MAX_16_BIT:
            raise ImageDataError(
                f"The image {where} has mode '{image.mode}' with values {low}..{high}, outside 16 bits (0..65535): "
                "convert it to 8- or 16-bit, then run again."
            )
        values = values.astype(np.uint16)
    return values.astype(np.uint16, copy=False)


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


# Part of the pixel cache's fingerprint: bump it whenever what an image becomes changes, so no cache built by an
# older conversion is reused (datasets fingerprints `_to_pixels` by its own code, not by the functions it calls).
CONVERSION_VERSION = 2  # 2: embedded ICC profiles applied
ICC_MODES = ("RGB", "RGBA", "CMYK")  # the colour modes whose embedded profile is applied
SRGB = ImageCms.createProfile("sRGB")


def to_srgb(image: Image.Image, where: str) -> Image.Image:
    """An RGB / RGBA / CMYK `image` with an embedded ICC profile, converted through it to sRGB (alpha kept)."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ICC_MODES:
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        colour = image.convert("RGB") if image.mode == "RGBA" else image
        converted = ImageCms.profileToProfile(
            colour, source, SRGB, renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC, outputMode="RGB"
        )
    except (ImageCms.PyCMSError, OSError, ValueError) as error:
        logger.warning("Ignoring the ICC profile of the image %s, which LittleCMS cannot use: %s", where, error)
        return image
    if image.mode == "RGBA":
        converted.putalpha(image.getchannel("A"))
    return converted


def to_cache_mode(image: Image.Image, channels: int, preserve_input_precision: bool, where: str) -> Image.Image:
    r"""
    Convert a decoded image to what the cache is built from, before resizing and cropping.

    Returns:
        A PIL image of mode "L" (`channels` 1), "RGB" (3) or "RGBA" (4), 8 bits; or, for a 16-bit image with
        `preserve_input_precision`, a single-channel "F" image holding the 16-bit values (0..65535), which
        `to_cache_array` replicates to `channels`.

    Raises:
        `ImageDataError`: a float ("F") image, or an "I" image with values outside 0..65535 (the message names `where`
        and the mode).
    """
    if channels not in CHANNEL_CHOICES:
        raise ValueError(f"channels must be one of {CHANNEL_CHOICES}, got {channels}.")
    mode = image.mode
    if mode in FLOAT_MODES:
        raise ImageDataError(
            f"The image {where} has mode '{mode}' (32-bit float), which has no agreed range of values to scale: "
            "convert it to an 8- or 16-bit image (e.g. PNG or TIFF), then run again."
        )
    if mode in SIXTEEN_BIT_MODES:
        values = sixteen_bit_values(image, where)
        if preserve_input_precision:
            return Image.fromarray(values.astype(np.float32), mode="F")
        # value * 255 / 65535 rounded; exact in integers (no value lies half-way: 65535 = 255 * 257 and 257 is odd).
        eight_bit = (values.astype(np.uint32) * 255 + MAX_16_BIT // 2) // MAX_16_BIT
        image = Image.fromarray(eight_bit.astype(np.uint8), mode="L")
        mode = "L"
    image = to_srgb(image, where)
    if channels == 4:
        return image.convert("RGBA")
    if has_transparency(image):
        image = _composite_on_white(image)
    return image.convert("L" if channels == 1 else "RGB")


def to_cache_array(image: Image.Image, channels: int, preserve_input_precision: bool) -> np.ndarray:
    r"""
    A resized and cropped image from `to_cache_mode` as the cache stores it: (channels, H, W), uint8, or uint16 with
    `preserve_input_precision` (16-bit images as they are, 8-bit ones times 257).
    """
    if image.mode == "F":
        values = np.clip(np.rint(np.asarray(image, dtype=np.float32)), 0, MAX_16_BIT).astype(np.uint16)[None]
        if channels == 1:
            return values
        planes = [values] * 3 + ([np.full_like(values, MAX_16_BIT)] if channels == 4 else [])
        return np.concatenate(planes)
    array = np.asarray(image, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    if preserve_input_precision:
        return array.astype(np.uint16) * 257
    return array


def _image_mode(value: Any, row: int) -> str | None:
    """The `stored_mode` of an undecoded `datasets.Image` value (or a PIL image's mode), from its header only; None if
    unreadable."""
    if isinstance(value, Image.Image):
        return value.mode
    if not isinstance(value, dict):
        return None
    import io

    path, data = value.get("path"), value.get("bytes")
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            return stored_mode(image)
    except (OSError, ValueError, SyntaxError, TypeError):
        return None  # the decoding step names the broken file


def decide_channels(dataset, image_column: str, sample_size: int = CHANNEL_SAMPLE_SIZE) -> tuple[int, Counter]:
    r"""
    The channel count of a dataset's model: 1 when most of the first `sample_size` images are grayscale, else 3.

    Only the images' headers are read. Ties go to 3 (RGB keeps what a grayscale conversion would lose). A mixed
    sample is logged with its modes.

    Returns:
        The channel count (1 or 3) and the `Counter` of the sampled images' modes.
    """
    import datasets

    sample = dataset.cast_column(image_column, datasets.Image(decode=False))
    if isinstance(sample, datasets.Dataset):
        rows = sample.select(range(min(sample_size, len(sample))))[image_column]
    else:
        rows = [example[image_column] for example in sample.take(sample_size)]
    modes = Counter(mode for row, value in enumerate(rows) if (mode := _image_mode(value, row)) is not None)
    gray = sum(count for mode, count in modes.items() if natural_channels(mode) == 1)
    color = sum(modes.values()) - gray
    channels = 1 if gray > color else 3
    summary = ", ".join(f"{count} {mode}" for mode, count in modes.most_common())
    if gray and color:
        logger.warning(
            "Mixed image modes in the first %d images (%s): training a %d-channel model (the majority; ties go to "
            "RGB). Pass --num_channels to choose.",
            sum(modes.values()),
            summary,
            channels,
        )
    else:
        logger.info("Image modes of the first %d images: %s: %d channel(s)", sum(modes.values()), summary, channels)
    return channels, modes


def channels_of_data(
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_data_dir: str | None,
    *,
    image_column: str | None = None,
    cache_dir: str | None = None,
    split: str = "train",
    streaming: bool = False,
    sample_size: int = CHANNEL_SAMPLE_SIZE,
) -> int:
    """`decide_channels` of a dataset given as the training flags give it (loaded as `load_pixels` loads it)."""
    from image_data.sources import find_image_column, load_image_dataset

    dataset = load_image_dataset(
        dataset_name, dataset_config_name, train_data_dir, cache_dir=cache_dir, split=split, streaming=streaming
    )
    channels, _ = decide_channels(dataset, find_image_column(dataset, image_column), sample_size)
    return channels
