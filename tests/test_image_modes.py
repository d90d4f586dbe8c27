"""Every image mode a user brings: the channel count follows the data, 16-bit images are scaled (or kept
with --preserve_input_precision), float images are refused, alpha/palette/1-bit/CMYK are converted as PIL shows them,
an embedded ICC profile is applied. Real PNG/TIFF files in temporary folders, read with `load_pixels`."""

from __future__ import annotations

import json
import logging
import math
import struct
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features
from datasets import Image as ImageFeature
from helpers import one_thread
from PIL import Image

from image_data.image_modes import decide_channels
from image_data.pixels import PixelBatches, collate_pixels, images_to_model_input, load_pixels, preprocess_images
from image_data.sources import ImageDataError

REPO = Path(__file__).resolve().parents[1]


def gradient16(offset: int = 0, size: int = 6) -> np.ndarray:
    """A (size, size) uint16 gradient spanning 784..65386, shifted by `offset` (kept in range)."""
    values = np.linspace(784, 65386, size * size).round().astype(np.int64) - offset
    return values.reshape(size, size).astype(np.uint16)


def scaled_to_8_bits(values: np.ndarray) -> np.ndarray:
    return np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def cached(folder: Path, tmp_path: Path, **kwargs) -> torch.Tensor:
    kwargs.setdefault("channels", None)
    pixels, _ = load_pixels(None, None, str(folder), resolution=6, cache_dir=str(tmp_path / "cache"), **kwargs)
    return PixelBatches(pixels).all()


@pytest.fixture
def folder16(tmp_path) -> tuple[Path, list[np.ndarray]]:
    """16-bit gradients as PNG ("I;16"), big-endian TIFF ("I;16B") and 32-bit "I" TIFF, sorted by file name."""
    folder = tmp_path / "sixteen"
    folder.mkdir()
    arrays = [gradient16(offset) for offset in (0, 300, 700)]
    Image.fromarray(arrays[0]).save(folder / "a.png")
    Image.frombytes("I;16B", (6, 6), arrays[1].astype(">u2").tobytes()).save(folder / "b.tiff")
    Image.fromarray(arrays[2].astype(np.int32), mode="I").save(folder / "c.tiff")
    assert [Image.open(folder / name).mode for name in ("a.png", "b.tiff", "c.tiff")] == ["I;16", "I;16B", "I"]
    return folder, arrays


def test_16_bit_images_are_scaled_to_8_bits_not_clipped(folder16, tmp_path):
    folder, arrays = folder16
    pixels = cached(folder, tmp_path)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 1, 6, 6)  # grayscale: one channel, without a flag
    for image, values in zip(pixels, arrays, strict=True):
        np.testing.assert_array_equal(image[0].numpy(), scaled_to_8_bits(values))
    assert pixels[0].min() == 3 and pixels[0].max() == 254  # 784 and 65386, not 255 everywhere


def test_16_bit_images_as_rgb_keep_their_scaled_values(folder16, tmp_path):
    folder, arrays = folder16
    pixels = cached(folder, tmp_path, channels=3)
    assert pixels.shape == (3, 3, 6, 6)
    for image, values in zip(pixels, arrays, strict=True):
        for channel in image:
            np.testing.assert_array_equal(channel.numpy(), scaled_to_8_bits(values))


def test_preserve_input_precision_caches_the_uint16_values(folder16, tmp_path):
    folder, arrays = folder16
    pixels = cached(folder, tmp_path, preserve_input_precision=True)
    assert pixels.dtype == torch.uint16 and pixels.shape == (3, 1, 6, 6)
    for image, values in zip(pixels, arrays, strict=True):
        np.testing.assert_array_equal(image[0].numpy(), values)
    x0 = images_to_model_input(pixels, random_flip=False)
    expected = torch.from_numpy(np.stack(arrays).astype(np.float64) / 32767.5 - 1).float()
    torch.testing.assert_close(x0[:, 0], expected)


def test_preserve_input_precision_maps_8_bit_images_onto_the_16_bit_scale(tmp_path):
    dataset = Dataset.from_dict(
        {"image": [Image.fromarray(np.array([[0, 1], [128, 255]], dtype=np.uint8), mode="L")]},
        Features({"image": ImageFeature()}),
    )
    pixels = preprocess_images(dataset, "image", 2, 1, preserve_input_precision=True)[0]["pixels"]
    assert pixels.dtype == torch.uint16
    np.testing.assert_array_equal(pixels[0].numpy(), [[0, 257], [128 * 257, 65535]])
    x0 = images_to_model_input(pixels[None], random_flip=False)
    assert x0[0, 0, 0, 0] == -1.0 and x0[0, 0, 1, 1] == 1.0


def test_streamed_16_bit_batches_keep_uint16(folder16, tmp_path):
    folder, arrays = folder16
    pixels, _ = load_pixels(
        None, None, str(folder), resolution=6, channels=1, preserve_input_precision=True, streaming=True
    )
    batch = collate_pixels(list(pixels), dtype=torch.uint16)
    assert batch.dtype == torch.uint16
    assert sorted(batch.flatten(1).sum(1).tolist()) == sorted(int(values.sum()) for values in arrays)


def test_float_images_are_refused_naming_the_file_and_mode(tmp_path):
    folder = tmp_path / "float"
    folder.mkdir()
    Image.fromarray(np.full((6, 6), 0.5, dtype=np.float32), mode="F").save(folder / "depth.tiff")
    with pytest.raises(ImageDataError, match=r"depth\.tiff.*mode 'F'"):
        cached(folder, tmp_path, channels=1)


def save_all(folder: Path, images: dict[str, Image.Image | Callable[[Path], None]]) -> Path:
    """Save each image under its name; a callable writes its file itself (what PIL cannot write)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image(folder / name) if callable(image) else image.save(folder / name)
    return folder


def gray(value: int) -> Image.Image:
    return Image.fromarray(np.full((6, 6), value, dtype=np.uint8), mode="L")


def rgb(color: tuple[int, int, int]) -> Image.Image:
    return Image.fromarray(np.tile(np.array(color, dtype=np.uint8), (6, 6, 1)), mode="RGB")


def test_the_channel_count_follows_the_data(tmp_path):
    grays = save_all(tmp_path / "gray", {f"{i}.png": gray(10 * i) for i in range(3)})
    colors = save_all(tmp_path / "rgb", {f"{i}.png": rgb((10 * i, 20, 30)) for i in range(3)})
    pixels = cached(grays, tmp_path)
    assert pixels.shape == (3, 1, 6, 6) and sorted(pixels[:, 0, 0, 0].tolist()) == [0, 10, 20]
    assert cached(colors, tmp_path).shape == (3, 3, 6, 6)
    assert cached(grays, tmp_path, channels=3).shape == (3, 3, 6, 6)  # --num_channels overrides


def test_a_mixed_folder_takes_the_majority_mode_and_says_so(tmp_path, caplog):
    images = {f"g{i}.png": gray(50) for i in range(3)} | {f"c{i}.png": rgb((200, 0, 0)) for i in range(2)}
    folder = save_all(tmp_path / "mixed", images)
    with caplog.at_level(logging.WARNING, logger="image_data.image_modes"):
        pixels = cached(folder, tmp_path)
    assert pixels.shape == (5, 1, 6, 6)
    assert "Mixed image modes" in caplog.text and "3 L" in caplog.text and "2 RGB" in caplog.text
    red_as_gray = round(200 * 299 / 1000)  # PIL's L = R * 299/1000 + G * 587/1000 + B * 114/1000
    assert sorted(pixels[:, 0, 0, 0].tolist()) == [50, 50, 50, red_as_gray, red_as_gray]


def test_the_channel_decision_reads_a_bounded_sample(tmp_path):
    images = {f"{i:02d}.png": gray(1) for i in range(3)} | {f"{i + 3:02d}.png": rgb((1, 2, 3)) for i in range(5)}
    folder = save_all(tmp_path / "many", images)
    from image_data.sources import find_image_column, load_image_dataset

    dataset = load_image_dataset(None, None, str(folder), cache_dir=str(tmp_path / "cache"))
    column = find_image_column(dataset)
    assert decide_channels(dataset, column, sample_size=3)[0] == 1  # the first three are grayscale
    channels, modes = decide_channels(dataset, column)
    assert channels == 3 and modes == {"L": 3, "RGB": 5}


def test_transparency_is_composited_on_white_unless_4_channels(tmp_path):
    rgba = np.zeros((6, 6, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :3, 3] = 0  # left half transparent
    rgba[:, 3:, 3] = 255
    folder = save_all(tmp_path / "rgba", {"icon.png": Image.fromarray(rgba, mode="RGBA")})
    pixels = cached(folder, tmp_path)
    assert pixels.shape == (1, 3, 6, 6)  # RGBA counts as RGB
    assert (pixels[0, :, :, :3] == 255).all()  # transparent: white
    assert pixels[0, :, :, 3:].tolist() == np.broadcast_to([[200], [0], [0]], (3, 6 * 3)).reshape(3, 6, 3).tolist()
    kept = cached(folder, tmp_path, channels=4)
    np.testing.assert_array_equal(kept[0].numpy(), rgba.transpose(2, 0, 1))


def test_palette_1_bit_la_and_cmyk_images_are_converted_by_pil(tmp_path):
    palette = Image.new("P", (6, 6), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (3, 0, 6, 6))
    palette.info["transparency"] = 0  # index 0 (red) transparent: white once composited
    bits = Image.fromarray(np.tile([True, False, True, False, True, False], (6, 1)))  # mode "1"
    assert bits.mode == "1"
    la = Image.merge("LA", [gray(40), Image.fromarray(np.full((6, 6), 0, dtype=np.uint8))])
    cmyk = Image.new("CMYK", (6, 6), (0, 255, 255, 0))  # red in CMYK
    folder = save_all(tmp_path / "kinds", {"a.png": palette, "b.png": bits, "c.png": la, "d.tiff": cmyk})
    assert [Image.open(folder / n).mode for n in ("a.png", "b.png", "c.png", "d.tiff")] == ["P", "1", "LA", "CMYK"]
    pixels = cached(folder, tmp_path, channels=3)
    assert (pixels[0, :, :, :3] == 255).all() and pixels[0, :, 0, 3:].tolist() == [[0] * 3, [0] * 3, [255] * 3]
    assert pixels[1, :, 0, :].tolist() == [[255, 0, 255, 0, 255, 0]] * 3
    assert (pixels[2] == 255).all()  # fully transparent gray: white
    np.testing.assert_array_equal(pixels[3].numpy(), np.asarray(cmyk.convert("RGB")).transpose(2, 0, 1))


def write_16_bit_png(path: Path, values: np.ndarray) -> None:
    """A (H, W, C) uint16 array as a PNG of 16 bits a channel, written by hand (PIL writes no such PNG for 2, 3 or 4
    channels): C 2 is grayscale+alpha (colour type 4), 3 RGB (type 2, 48-bit), 4 RGBA (type 6, 64-bit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, channels = values.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, 16, {2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def write_tiff(
    path: Path, values: np.ndarray, photometric: int, extra_samples: tuple[int, ...] = (), **options
) -> None:
    r"""
    A (H, W, C) uint8 or uint16 array as an uncompressed TIFF, written by hand (PIL writes no TIFF of 16 bits a colour
    channel). `photometric` 1 is grayscale, 2 RGB, 5 CMYK; `extra_samples` the ExtraSamples tag (2: alpha);
    `options` `planar=True` (one plane a channel, PlanarConfiguration 2), `byteorder=">"` (big-endian).
    """
    planar, order = options.get("planar", False), options.get("byteorder", "<")
    height, width, channels = values.shape
    stored = values.astype(values.dtype.newbyteorder(order))
    planes = [stored[..., c].tobytes() for c in range(channels)] if planar else [stored.tobytes()]
    offsets = [8 + sum(len(plane) for plane in planes[:i]) for i in range(len(planes))]
    tags = {256: (4, [width]), 257: (4, [height]), 258: (3, [values.dtype.itemsize * 8] * channels), 259: (3, [1])}
    tags |= {262: (3, [photometric]), 273: (4, offsets), 277: (3, [channels]), 278: (4, [height])}
    tags |= {279: (4, [len(plane) for plane in planes]), 284: (3, [2 if planar else 1])}
    if extra_samples:
        tags[338] = (3, list(extra_samples))
    data = b"".join(planes)
    directory = 8 + len(data)
    outside = directory + 2 + 12 * len(tags) + 4  # where the values longer than 4 bytes go
    entries, values_outside = b"", b""
    for tag, (kind, numbers) in sorted(tags.items()):
        packed = struct.pack(order + {3: "H", 4: "I"}[kind] * len(numbers), *numbers)
        if len(packed) > 4:
            packed, values_outside = struct.pack(order + "I", outside + len(values_outside)), values_outside + packed
        entries += struct.pack(order + "HHI", tag, kind, len(numbers)) + packed.ljust(4, b"\0")
    magic = b"II*\0" if order == "<" else b"MM\0*"
    body = struct.pack(order + "H", len(tags)) + entries + b"\0" * 4 + values_outside
    path.write_bytes(magic + struct.pack(order + "I", directory) + data + body)


def test_48_bit_rgb_is_read_at_8_bits_and_refused_with_preserve_input_precision(tmp_path):
    values = np.linspace(300, 65000, 6 * 6 * 3).round().astype(np.uint16).reshape(6, 6, 3)
    folder = tmp_path / "deep"
    folder.mkdir()
    write_16_bit_png(folder / "a.png", values)
    with Image.open(folder / "a.png") as image:
        assert image.mode == "RGB"  # PIL's own reading: 8 bits a channel
    pixels = cached(folder, tmp_path, channels=3)
    np.testing.assert_array_equal(pixels[0].numpy(), (values >> 8).astype(np.uint8).transpose(2, 0, 1))
    with pytest.raises(ImageDataError, match=r"'.*a.png' \(row 0\) has 16 bits per colour channel \(48-bit RGB\)"):
        cached(folder, tmp_path / "again", channels=3, preserve_input_precision=True)


def sixteen_bit_channels(count: int) -> np.ndarray:
    """(6, 6, count) uint16 values, each channel a different gradient; the last one, as alpha, 0 / 65535 / partial."""
    values = np.stack([gradient16(700 * c) for c in range(count)], axis=-1)
    if count in (2, 4):
        values[:, :2, -1], values[:, 2:4, -1] = 0, 65535
    return values


# Files of 16 bits a channel that PIL opens at 8 (the high byte): file name, writer, channels in the file, PIL's mode,
# `stored_mode`, the channels of the run, and the mode of its 8-bit twin (the high bytes), which caches the same pixels.
DEEP_KINDS = {
    "png-la-32-bit": ("a.png", write_16_bit_png, 2, "RGBA", "LA;16", 1, "LA"),
    "png-rgba-64-bit": ("a.png", write_16_bit_png, 4, "RGBA", "RGBA;16", 3, "RGBA"),
    "tiff-rgb-48-bit": ("a.tif", lambda path, v: write_tiff(path, v, 2), 3, "RGB", "RGB;16", 3, "RGB"),
    "tiff-rgb-48-bit-big-endian": (
        "a.tif",
        lambda path, v: write_tiff(path, v, 2, byteorder=">"),
        3,
        "RGB",
        "RGB;16",
        3,
        "RGB",
    ),
    "tiff-rgba-64-bit": ("a.tif", lambda path, v: write_tiff(path, v, 2, (2,)), 4, "RGBA", "RGBA;16", 3, "RGBA"),
    "tiff-cmyk-64-bit": ("a.tif", lambda path, v: write_tiff(path, v, 5), 4, "CMYK", "CMYK;16", 3, "CMYK"),
}


@pytest.mark.parametrize("kind", list(DEEP_KINDS))
def test_16_bit_files_pil_reads_at_8_bits_count_as_what_they_store(tmp_path, kind):
    from image_data.sources import find_image_column, load_image_dataset

    name, write, count, pil_mode, stored, channels, twin_mode = DEEP_KINDS[kind]
    values = sixteen_bit_channels(count)
    deep, twin = tmp_path / "deep", tmp_path / "twin"
    deep.mkdir()
    write(deep / name, values)
    high_bytes = (values >> 8).astype(np.uint8)
    save_all(twin, {name: Image.fromarray(high_bytes, mode=twin_mode)})
    with Image.open(deep / name) as image:
        assert image.mode == pil_mode
    dataset = load_image_dataset(None, None, str(deep), cache_dir=str(tmp_path / "cache"))
    assert decide_channels(dataset, find_image_column(dataset)) == (channels, {stored: 1})
    pixels = cached(deep, tmp_path)  # channels from the data
    assert pixels.shape == (1, channels, 6, 6) and pixels.dtype == torch.uint8
    np.testing.assert_array_equal(pixels.numpy(), cached(twin, tmp_path, channels=channels).numpy())
    if stored == "LA;16":  # as 8-bit LA: composited on white (transparent: white; opaque: its gray)
        assert (pixels[0, 0, :, :2] == 255).all()
        np.testing.assert_array_equal(pixels[0, 0, :, 2:4].numpy(), high_bytes[:, 2:4, 0])
        what = r"channel of grayscale with alpha \(PNG colour type 4\)"
    else:
        what = rf"colour channel \(\d\d-bit {stored[:-3]}\)"
    with pytest.raises(ImageDataError, match=rf"'.*{name}' \(row 0\) has 16 bits per {what}") as error:
        cached(deep, tmp_path / "again", preserve_input_precision=True)
    assert "\n" not in str(error.value) and ("without alpha" in str(error.value)) == (stored == "LA;16")


def test_a_16_bit_tiff_in_separate_planes_is_refused_not_misread(tmp_path):
    folder = tmp_path / "planar"
    folder.mkdir()
    write_tiff(folder / "scan.tif", sixteen_bit_channels(3), 2, planar=True)
    with Image.open(folder / "scan.tif") as image:  # PIL reads each 16-bit plane as an 8-bit one: other pixels
        assert not np.array_equal(np.asarray(image), (sixteen_bit_channels(3) >> 8).astype(np.uint8))
    for preserve in (False, True):
        with pytest.raises(ImageDataError, match=r"'.*scan\.tif' \(row 0\) is a TIFF of 16 bits per channel stored "):
            cached(folder, tmp_path / str(preserve), channels=3, preserve_input_precision=preserve)
    eight_bit = tmp_path / "planar8"
    eight_bit.mkdir()
    write_tiff(eight_bit / "scan.tif", (sixteen_bit_channels(3) >> 8).astype(np.uint8), 2, planar=True)
    np.testing.assert_array_equal(
        cached(eight_bit, tmp_path)[0].numpy(), (sixteen_bit_channels(3) >> 8).transpose(2, 0, 1)
    )


def test_a_16_bit_grayscale_alpha_tiff_which_pil_cannot_open_is_named(tmp_path):
    folder = tmp_path / "la"
    folder.mkdir()
    write_tiff(folder / "scan.tif", sixteen_bit_channels(2), 1, (2,))
    with pytest.raises(ImageDataError, match=r"Cannot decode the image '.*scan\.tif' \(row 0\): cannot identify"):
        cached(folder, tmp_path, channels=1)


# sRGB's primaries adapted to D50 (the ICC connection space), X, Y, Z each.
SRGB_PRIMARIES = {"r": (0.4361, 0.2225, 0.0139), "g": (0.3851, 0.7169, 0.0971), "b": (0.1431, 0.0606, 0.7141)}


def rgb_matrix_profile(primaries: dict[str, tuple[float, float, float]], gamma: float = 2.2) -> bytes:
    """A minimal ICC v2 RGB display profile (matrix/TRC): the given D50 primaries, one gamma curve per channel."""

    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    def xyz(values) -> bytes:
        return b"XYZ \0\0\0\0" + b"".join(s15(v) for v in values)

    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    text = b"test profile\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 8 + b"\0\0\0" + b"\0" * 67
    white = [sum(primaries[c][i] for c in "rgb") for i in range(3)]
    tags = [(b"desc", desc), (b"wtpt", xyz(white))]
    tags += [(f"{c}XYZ".encode(), xyz(primaries[c])) for c in "rgb"] + [(f"{c}TRC".encode(), curve) for c in "rgb"]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for signature, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = struct.pack(">I4sI4s4s4s", size, b"\0" * 4, 0x02100000, b"mntr", b"RGB ", b"XYZ ") + b"\0" * 12
    header += b"acsp" + b"\0" * 24 + struct.pack(">I", 0) + s15(0.9642) + s15(1.0) + s15(0.8249)
    header += b"\0" * (128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + data


def test_an_embedded_icc_profile_is_applied_to_srgb(tmp_path, caplog):
    # A profile whose red, green and blue are sRGB's green, blue and red: stored (R, G, B) shows as sRGB (B, R, G).
    rotated = rgb_matrix_profile({"r": SRGB_PRIMARIES["g"], "g": SRGB_PRIMARIES["b"], "b": SRGB_PRIMARIES["r"]})
    stored = np.zeros((6, 6, 3), dtype=np.uint8)
    stored[...] = (200, 60, 120)
    rgba = np.dstack([stored, np.full((6, 6), 90, dtype=np.uint8)])
    folder = tmp_path / "icc"
    folder.mkdir()
    Image.fromarray(stored).save(folder / "a.png", icc_profile=rotated)
    Image.fromarray(stored).save(folder / "b.png", icc_profile=rgb_matrix_profile(SRGB_PRIMARIES))
    Image.fromarray(stored).save(folder / "c.png", icc_profile=b"not a profile")
    Image.fromarray(rgba, mode="RGBA").save(folder / "d.png", icc_profile=rotated)
    with caplog.at_level(logging.WARNING):
        pixels = cached(folder, tmp_path, channels=4).numpy().astype(int)
    # Gamma 2.2 against sRGB's curve: within 3 levels of the exact channel rotation.
    assert np.abs(pixels[0, :3] - np.array([120, 200, 60])[:, None, None]).max() <= 3
    assert np.abs(pixels[1, :3] - np.array([200, 60, 120])[:, None, None]).max() <= 3  # sRGB primaries: unchanged
    assert (pixels[2, :3] == np.array([200, 60, 120])[:, None, None]).all()  # unreadable profile: ignored, said
    assert any("c.png" in r.getMessage() and "ICC profile" in r.getMessage() for r in caplog.records)
    assert np.abs(pixels[3, :3] - np.array([120, 200, 60])[:, None, None]).max() <= 3 and (pixels[3, 3] == 90).all()


SMALL_UNET = {
    "_class_name": "UNet2DModel",
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": None,
}


def rgba_icon(alpha: int) -> Image.Image:
    array = np.zeros((6, 6, 4), dtype=np.uint8)
    array[..., 1], array[..., 3] = 180, alpha
    return Image.fromarray(array, mode="RGBA")


def other_kinds() -> dict[str, Image.Image]:
    """A CMYK print, a palette image, an RGB photo with an ICC profile and a 1-bit scan: a 3-channel majority."""
    palette = Image.new("P", (6, 6), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    photo = rgb((200, 60, 120))
    photo.info["icc_profile"] = rgb_matrix_profile(SRGB_PRIMARIES)  # PNG writes the profile of `info`
    bits = Image.fromarray(np.tile([True, False, True, False, True, False], (6, 1)))
    return {"a.tiff": Image.new("CMYK", (6, 6), (0, 255, 255, 0)), "b.png": palette, "c.png": photo, "d.png": bits}


def one_bit(shift: int) -> Image.Image:
    return Image.fromarray(np.roll(np.tile([True, False, True, False, True, False], (6, 1)), shift, axis=1))


RUNS = {
    # name: images of the folder, extra flags, channels of the model, mode of the stock pipeline's samples
    "cmyk-palette-icc-1-bit": (other_kinds(), [], 3, "RGB"),
    "1-bit": ({f"{i}.png": one_bit(i) for i in range(4)}, [], 1, "L"),
    "grayscale": ({f"{i}.png": gray(20 * i) for i in range(4)}, [], 1, "L"),
    # 16-bit grayscale+alpha PNGs, which PIL opens as RGBA: grayscale, as 8-bit LA
    "32-bit-LA": (
        {f"{i}.png": partial(write_16_bit_png, values=sixteen_bit_channels(2)) for i in range(4)},
        [],
        1,
        "L",
    ),
    "rgba-kept": ({f"{i}.png": rgba_icon(60 * i) for i in range(4)}, ["--num_channels", "4"], 4, "RGBA"),
    "mixed": ({"a.png": gray(3), "b.png": gray(9), "c.png": rgb((1, 2, 3))}, [], 1, "L"),
    "16-bit": (
        {f"{i}.png": Image.fromarray(gradient16(100 * i)) for i in range(10)},
        ["--preserve_input_precision", "--eval_steps", "2", "--eval_holdout_images", "5", "--eval_num_images", "5"]
        + ["--eval_bpd_timesteps", "2", "--eval_num_samples", "5", "--eval_feature_extractor", "digits"],
        1,
        "L",
    ),
}


@pytest.mark.slow
@pytest.mark.fresh_process  # train_ddpm.main, in this process, builds an Accelerator
@pytest.mark.parametrize("kind", list(RUNS))
def test_a_folder_trains_a_model_whose_stock_pipeline_samples_its_mode(tmp_path, monkeypatch, caplog, kind):
    from diffusers import DDPMPipeline

    import train_ddpm

    caplog.set_level(logging.INFO)
    images, flags, channels, mode = RUNS[kind]
    folder = save_all(tmp_path / "data", images)
    (tmp_path / "unet.json").write_text(json.dumps(SMALL_UNET))
    monkeypatch.chdir(tmp_path)
    args = ["--cpu", "--train_data_dir", str(folder), "--resolution", "8", "--model_config_name_or_path", "unet.json"]
    args += ["--max_train_steps", "2", "--train_batch_size", "2", "--ddpm_num_steps", "50"]
    args += ["--ddpm_num_inference_steps", "2", "--eval_batch_size", "2", "--output_dir", "out", *flags]
    with one_thread():  # as the script runs (OMP_NUM_THREADS=1)
        train_ddpm.main([*args, "--cache_dir", str(tmp_path / "cache")])
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "out")
    assert pipeline.unet.config.in_channels == channels
    pipeline.set_progress_bar_config(disable=True)
    samples = pipeline(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0)).images
    assert [image.mode for image in samples] == [mode, mode] and samples[0].size == (8, 8)
    card = (tmp_path / "out" / "README.md").read_text()
    assert f'(PIL mode "{mode}" samples) from {16 if "16" in kind else 8}-bit data' in card
    if kind == "16-bit":  # the held-out uint16 images are evaluated (bits/dim over 65,536 levels)
        assert "Evaluation at step 2: bits_per_dim" in caplog.text
    if kind in ("mixed", "cmyk-palette-icc-1-bit"):
        assert "Mixed image modes" in caplog.text


def test_the_feature_networks_compare_the_colour_of_rgba_images():
    from evaluation.features import _to_float_grayscale

    rgba = torch.randint(0, 256, (2, 4, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(_to_float_grayscale(rgba, 8), _to_float_grayscale(rgba[:, :3], 8))


def test_the_decoder_bins_follow_the_bit_depth():
    from schedulers import DDPMPaperScheduler
    from schedulers.scheduling_ddpm_paper import discretized_gaussian_log_likelihood

    levels = torch.tensor([1, 2, 30000, 65533], dtype=torch.float64)  # 16-bit values, away from the open end bins
    x = (levels / 32767.5 - 1).float().view(1, 1, 2, 2)
    log_scales = torch.full_like(x, math.log(0.01))
    normal = torch.distributions.Normal(x.double(), 0.01)
    for bits, half_bin in ((8, 1 / 255), (16, 1 / 65535)):
        expected = torch.log(normal.cdf(x.double() + half_bin) - normal.cdf(x.double() - half_bin))
        got = discretized_gaussian_log_likelihood(x, means=x, log_scales=log_scales, bits=bits)
        assert got.dtype == torch.float32
        inner = x.abs() < (0.999 if bits == 8 else 1)  # 8 bits: 1, 2 and 65533 fall in the open end bins
        torch.testing.assert_close(got.double()[inner], expected[inner], rtol=1e-4, atol=1e-5)
    # x = -1 + 2/65535 is an inner bin for 16 bits; 8 bits treats it (as any x < -0.999) as the open first bin.
    edge = discretized_gaussian_log_likelihood(
        x[..., :1, :1], means=x[..., :1, :1], log_scales=log_scales[..., :1, :1]
    )
    assert edge.item() > math.log(0.5)

    scheduler = DDPMPaperScheduler(num_train_timesteps=10)
    x0 = x[..., 1:, :1]  # 30000: an inner bin for both depths
    t = torch.tensor([0])
    xt = scheduler.add_noise(x0, torch.randn(x0.shape, generator=torch.manual_seed(0)), t)
    eps = torch.zeros_like(x0)
    p = scheduler.p_mean_variance(eps, xt, t)
    bpd8 = scheduler.vlb_terms(eps, x0, xt, t).bpd
    bpd16 = scheduler.vlb_terms(eps, x0, xt, t, bits=16).bpd
    for bits, bpd in ((8, bpd8), (16, bpd16)):
        nll = -discretized_gaussian_log_likelihood(x0, means=p.mean, log_scales=0.5 * p.log_variance, bits=bits)
        torch.testing.assert_close(bpd, nll.flatten(1).mean(1) / math.log(2))
    assert bpd16 - bpd8 > 7  # about log2(65535 / 255) = 8 bits more per dimension: 256 times narrower bins


def test_the_evaluation_counts_16_bit_images_over_65536_levels():
    from diffusers import DDPMScheduler, UNet2DModel

    from evaluation.pipeline_metrics import as_pixels, evaluate
    from pipelines import DDPMPaperPipeline

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    )
    pipeline = DDPMPaperPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=5))
    sixteen = torch.from_numpy(np.stack([np.resize(gradient16(offset, 8), (1, 8, 8)) for offset in (0, 500)]))
    eight = torch.from_numpy(scaled_to_8_bits(sixteen.numpy()))
    assert as_pixels(sixteen, None).dtype == torch.uint16  # not wrapped around into uint8
    kwargs = {"num_images": 2, "bpd_timesteps": 0, "num_samples": 0, "seed": 0}
    with one_thread():  # two threads on a busy 2-core machine are many times slower
        bpd16 = evaluate(pipeline, sixteen, **kwargs)["bits_per_dim"]
        bpd8 = evaluate(pipeline, eight, **kwargs)["bits_per_dim"]
    assert bpd16 - bpd8 > 4  # narrower bins: up to log2(257) = 8 more bits a value, through L_0 alone


def test_a_streamed_grayscale_folder_decides_one_channel(tmp_path):
    folder = save_all(tmp_path / "gray", {f"{i}.png": gray(7 * i) for i in range(3)})
    pixels, _ = load_pixels(None, None, str(folder), resolution=6, channels=None, streaming=True)
    assert pixels.features["pixels"].shape == (1, 6, 6)
    assert sorted(example["pixels"][0, 0, 0].item() for example in pixels) == [0, 7, 14]
