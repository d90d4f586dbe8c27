"""image_data.sources: the embedded digits, local and Hub datasets, the uint8 image cache and per-batch model input."""

import io
import json
import logging
import os
import time
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch
from helpers import FAST, SMALL_UNET, last_line, random_images, run_training
from PIL import Image
from sklearn.datasets import load_digits

import hub_access
from image_data import folder_listing as image_folder
from image_data import pixels as pixel_cache
from image_data import sources as data
from image_data.pixels import collate_pixels, images_to_model_input, load_pixels, preprocess_images
from image_data.sources import (
    DatasetUnavailableError,
    ImageDataError,
    digits_dataset,
    find_image_column,
    load_image_dataset,
)


def banded_image() -> Image.Image:
    """A 24x8 grayscale image of three vertical bands, 0 | 100 | 200, each 8 pixels wide."""
    array = np.zeros((8, 24), dtype=np.uint8)
    array[:, 8:16] = 100
    array[:, 16:] = 200
    return Image.fromarray(array, mode="L")


def write_png(path, value: int, size=(6, 6)) -> None:
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8), mode="RGB").save(path)


def all_pixels(dataset) -> torch.Tensor:
    return collate_pixels(list(dataset))


@pytest.fixture(scope="module")
def digits():
    return digits_dataset()


def test_digits_dataset_is_sklearn_digits_scaled_to_uint8_grayscale(digits):
    assert digits.num_rows == 1797
    assert isinstance(digits.features["image"], datasets.Image)
    assert digits.features["label"].names == [str(i) for i in range(10)]
    first = digits[0]["image"]
    assert (first.mode, first.size) == ("L", (8, 8))

    stored = np.stack([np.asarray(image) for image in digits[:]["image"]])
    expected = np.rint(load_digits().images * 255 / 16)
    np.testing.assert_array_equal(stored, expected)
    assert (stored.min(), stored.max()) == (0, 255)
    assert digits[:]["label"] == load_digits().target.tolist()


def test_no_dataset_given_loads_the_embedded_digits():
    dataset = load_image_dataset()
    assert isinstance(dataset, datasets.Dataset) and dataset.num_rows == 1797
    assert isinstance(load_image_dataset(streaming=True), datasets.IterableDataset)


def test_local_folder_in_hub_layout_loads_by_path_and_caches_pixels_on_disk(tmp_path):
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    values = [10, 120, 250]
    images = [Image.fromarray(np.full((4, 4), v, dtype=np.uint8), mode="L") for v in values]
    table = datasets.Dataset.from_dict(
        {"picture": images, "caption": ["a", "b", "c"]},
        features=datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")}),
    )
    table.to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))

    dataset = load_image_dataset(str(repo), cache_dir=str(tmp_path / "cache"))
    assert dataset.num_rows == 3
    assert find_image_column(dataset) == "picture"

    processed = preprocess_images(dataset, "picture", resolution=4, channels=3)
    assert processed.column_names == ["pixels"]
    assert processed.cache_files, "the uint8 cache should be an Arrow file next to the dataset's own"
    pixels = processed[:]["pixels"]
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 3, 4, 4)
    assert pixels.flatten(1).min(1).values.tolist() == values
    assert pixels.flatten(1).max(1).values.tolist() == values


def test_plain_image_folder_loads_with_train_data_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    write_png(folder / "a.png", 30)
    write_png(folder / "b.png", 60)
    dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    assert dataset.num_rows == 2
    pixels = all_pixels(preprocess_images(dataset, find_image_column(dataset), resolution=4, channels=3))
    assert pixels.shape == (2, 3, 4, 4)
    assert sorted(pixels[:, 0, 0, 0].tolist()) == [30, 60]


def image_paths(dataset) -> list[str]:
    """The paths of a dataset's (or a stream's) images, in order."""
    return [example["image"]["path"] for example in dataset.cast_column("image", datasets.Image(decode=False))]


def imagefolder_paths(folder, cache_dir) -> list[str]:
    """The image paths of the train split that `datasets`' own imagefolder builder loads from `folder`, in order."""
    return image_paths(
        datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(cache_dir))
    )


def test_plain_image_folder_lists_the_images_datasets_imagefolder_loads(tmp_path):
    folder = tmp_path / "images"
    for name in ("sub/deeper", ".cache", "__pycache__", "zeta", "..."):
        (folder / name).mkdir(parents=True)
    for i, name in enumerate(
        ["b.png", "a.png", "C.PNG", "d.jpeg", "__e.png", "f.png.txt", "sub/g.png", "sub/deeper/h.webp", "zeta/i.png"]
        + [".../l.png"]  # a name of dots only is not hidden
        + [".hidden.png", ".cache/j.png", "__pycache__/k.png"]  # hidden or special: skipped
    ):
        Image.fromarray(np.full((6, 6, 3), 10 * i, dtype=np.uint8)).save(folder / name, format="PNG")
    (folder / "notes.txt").write_text("not an image")
    (folder / "README.md").write_text("# ignored")
    (folder / "linked").symlink_to(folder / "sub", target_is_directory=True)  # not followed
    (folder / "link.png").symlink_to(folder / "a.png")  # followed
    os.mkfifo(folder / "pipe.png")  # not a regular file: skipped

    listed = image_folder.plain_image_folder(str(folder))
    expected = imagefolder_paths(folder, tmp_path / "hf-cache")
    assert [path for path, _, _ in listed] == expected
    assert len(expected) == 11
    assert all(size == os.path.getsize(path) for path, size, _ in listed)

    dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    assert "ddpm_imagefolder" in dataset.cache_files[0]["filename"]
    assert dataset.cast_column("image", datasets.Image(decode=False))["image"] == [
        {"bytes": None, "path": path} for path in expected
    ]

    # Streamed, the same examples in the same order as `datasets`' stream of the folder, shuffled or not.
    ours = load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"), streaming=True)
    theirs = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", streaming=True)
    assert image_paths(ours) == image_paths(theirs) == expected
    shuffled = image_paths(ours.shuffle(seed=1, buffer_size=4))
    assert shuffled == image_paths(theirs.shuffle(seed=1, buffer_size=4)) and shuffled != expected


@pytest.mark.parametrize(
    "layout, count",
    [
        (["train/a.png", "train/b.png", "test/c.png"], 2),
        (["a.png", "train_b.png", "c.png"], 1),  # a file name that names the split makes the other files no split's
        (["a.png", "b.png", "metadata.csv"], 2),
        (["a.png", "b.png", "train_notes.txt"], None),  # not an image, but it names a split: no image is in it
        (["a.png", "b.png", "my_test.png"], None),  # the only split is "test"
    ],
)
def test_image_folders_with_splits_or_metadata_are_left_to_datasets(tmp_path, layout, count):
    folder = tmp_path / "images"
    for i, name in enumerate(layout):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".csv"):
            (folder / name).write_text("file_name,caption\na.png,one\nb.png,two\n")
        elif name.endswith(".txt"):
            (folder / name).write_text("notes")
        else:
            write_png(folder / name, 10 * i)
    assert image_folder.plain_image_folder(str(folder)) is None
    if count is None:  # no image is in the train split: the error says how `datasets` splits a folder
        with pytest.raises(ImageDataError, match="has no split 'train'.*Rename such files"):
            load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
        return
    dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    assert "ddpm_imagefolder" not in dataset.cache_files[0]["filename"]
    paths = image_paths(dataset)
    assert paths == imagefolder_paths(folder, tmp_path / "cache")
    assert len(paths) == count


def test_image_folder_pixel_cache_is_reused_until_an_image_changes(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        write_png(folder / f"{i}.png", 40 * i)

    def load():
        dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
        pixels = preprocess_images(dataset, "image", resolution=4, channels=3)
        return pixels.cache_files[0]["filename"], all_pixels(pixels)[:, 0, 0, 0].tolist()

    first_file, first = load()
    written = os.path.getmtime(first_file)
    assert first == [0, 40, 80]
    assert load() == (first_file, first) and os.path.getmtime(first_file) == written  # read back, not rebuilt

    write_png(folder / "1.png", 200)
    os.utime(folder / "1.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    changed_file, changed = load()
    assert changed == [0, 200, 80] and changed_file != first_file
    write_png(folder / "3.png", 250)
    assert load()[1] == [0, 200, 80, 250]


def test_missing_or_empty_image_folder_says_what_is_wrong(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="is not a folder"):
        load_image_dataset(train_data_dir=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageDataError, match="No images found in --train_data_dir"):
        load_image_dataset(train_data_dir=str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))


def test_both_dataset_name_and_train_data_dir_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="pass only one"):
        load_image_dataset("uoft-cs/cifar10", train_data_dir=str(tmp_path))


def test_find_image_column_auto_detects_and_errors_list_the_columns(digits):
    assert find_image_column(digits) == "image"
    assert find_image_column(digits, "image") == "image"
    with pytest.raises(ImageDataError, match=r"'img' is not a column.*\['image', 'label'\]"):
        find_image_column(digits, "img")
    no_images = datasets.Dataset.from_dict({"x": [1], "y": ["a"]})
    with pytest.raises(ImageDataError, match=r"\['x', 'y'\].*--image_column"):
        find_image_column(no_images)


def test_corrupt_png_in_image_folder_is_named(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    write_png(folder / "good.png", 80)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ImageDataError, match=r"broken\.png.*Remove or fix that file"):
        preprocess_images(dataset, "image", resolution=4, channels=3)


def test_corrupt_image_without_a_path_is_named_by_row():
    dataset = datasets.Dataset.from_dict(
        {"image": [banded_image(), {"bytes": b"garbage", "path": None}]},
        features=datasets.Features({"image": datasets.Image()}),
    )
    with pytest.raises(ImageDataError, match="at row 1"):
        preprocess_images(dataset, "image", resolution=4, channels=1)


def test_uncached_hub_dataset_offline_fails_fast_naming_it(monkeypatch, connections):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DatasetUnavailableError) as error:
        load_image_dataset("some-user/not-cached")
    assert connections == []  # fast: not one connection attempted, so none retried
    message = str(error.value)
    assert "'some-user/not-cached'" in message
    assert "--train_data_dir" in message and "network" in message


def test_unreachable_hub_forces_offline_mode_and_restores_it(monkeypatch, connections):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    probes = []
    monkeypatch.setattr(hub_access, "hub_is_reachable", lambda: probes.append(1) or False)

    with pytest.raises(DatasetUnavailableError, match="cannot be reached"):
        load_image_dataset("some-user/not-cached")
    assert probes == [1]  # fast: one probe, then offline: not one connection attempted, so none retried
    assert connections == []
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False


def test_preprocess_gives_uint8_channels_first_at_the_requested_size(digits):
    processed = preprocess_images(digits, "image", resolution=8, channels=1)
    pixels = processed[:]["pixels"]
    assert pixels.dtype == torch.uint8 and pixels.shape == (1797, 1, 8, 8)
    np.testing.assert_array_equal(pixels[:, 0].numpy(), np.rint(load_digits().images * 255 / 16))

    rgb = preprocess_images(digits.select(range(4)), "image", resolution=4, channels=3)[:]["pixels"]
    assert rgb.shape == (4, 3, 4, 4)
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 0], rgb[:, 2])


def test_non_square_image_is_resized_on_the_short_side_then_center_cropped():
    dataset = datasets.Dataset.from_dict(
        {"image": [banded_image()]}, features=datasets.Features({"image": datasets.Image()})
    )
    pixels = preprocess_images(dataset, "image", resolution=4, channels=1)[0]["pixels"]
    # 24x8 -> 12x4 (bilinear, antialiased: 0 0 0 13 88 100 100 113 188 200 200 200), center crop = columns 4..7.
    assert pixels.shape == (1, 4, 4)
    assert pixels[0].tolist() == [[88, 100, 100, 113]] * 4


def test_random_crop_is_chosen_once_per_image_from_the_seed():
    dataset = datasets.Dataset.from_dict(
        {"image": [banded_image()] * 8}, features=datasets.Features({"image": datasets.Image()})
    )
    resized = [0, 0, 0, 13, 88, 100, 100, 113, 188, 200, 200, 200]
    windows = {tuple(resized[left : left + 4]) for left in range(9)}
    first = preprocess_images(dataset, "image", resolution=4, channels=1, center_crop=False, seed=3)[:]["pixels"]
    again = preprocess_images(dataset, "image", resolution=4, channels=1, center_crop=False, seed=3)[:]["pixels"]
    assert torch.equal(first, again)
    rows = {tuple(image[0, 0].tolist()) for image in first}
    assert rows <= windows and len(rows) > 1, "crops should be valid windows that vary from image to image"
    assert all((image[0] == image[0, :1]).all() for image in first), "every row of a crop is the same"


def test_streaming_yields_the_same_pixels_as_the_cached_dataset(digits):
    cached = preprocess_images(digits, "image", resolution=8, channels=1)[:]["pixels"]
    streamed = preprocess_images(load_image_dataset(streaming=True), "image", resolution=8, channels=1)
    assert isinstance(streamed, datasets.IterableDataset)
    batch = all_pixels(streamed)
    assert batch.dtype == torch.uint8
    assert torch.equal(batch, cached)


def test_model_input_maps_0_to_minus_1_and_255_to_1():
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    images = images_to_model_input(pixels, random_flip=False)
    assert images.dtype == torch.float32
    torch.testing.assert_close(images.flatten(), torch.tensor([-1.0, 51 / 127.5 - 1, 1.0]))


def test_random_flip_flips_exactly_the_examples_the_generator_picks():
    pixels = torch.arange(16 * 2 * 3 * 5, dtype=torch.int64).remainder(256).to(torch.uint8).view(16, 2, 3, 5)
    images = images_to_model_input(pixels, random_flip=True, generator=torch.Generator().manual_seed(7))
    coins = torch.rand(16, generator=torch.Generator().manual_seed(7)) < 0.5
    assert 0 < coins.sum() < 16
    unflipped = pixels.float() / 127.5 - 1
    for image, original, flipped in zip(images, unflipped, coins, strict=True):
        torch.testing.assert_close(image, original.flip(-1) if flipped else original, rtol=0, atol=0)


def test_pixel_batches_serve_the_same_pixels_as_datasets_formatting(digits, tmp_path):
    cached = preprocess_images(digits, "image", 8, 1)
    rgb_folder = tmp_path / "rgb"
    rgb_folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(rgb_folder / f"{i}.png")
    rgb_dataset = data.load_image_dataset(train_data_dir=str(rgb_folder), cache_dir=str(tmp_path / "cache"))
    rgb = preprocess_images(rgb_dataset, "image", 8, 3)
    for dataset in (cached, cached.shuffle(seed=3), cached.select(range(500, 700)), rgb):
        batches = pixel_cache.PixelBatches(dataset)
        indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:33].tolist()
        batch = batches.__getitems__(indices)
        assert batch.dtype == torch.uint8 and batch.shape == (33, *dataset[0]["pixels"].shape)
        assert torch.equal(batch, dataset[indices]["pixels"])
        assert torch.equal(batches[7], dataset[7]["pixels"])
    loader = torch.utils.data.DataLoader(
        pixel_cache.PixelBatches(cached), batch_size=64, shuffle=False, collate_fn=pixel_cache.collate_pixel_batch
    )
    first = next(iter(loader))
    assert torch.equal(first, cached[:64]["pixels"])


TINY_RUN = ["--model_config_name_or_path", "unet.json", "--resolution", "8", "--train_batch_size", "4", *FAST]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("errors")
    (folder / "unet.json").write_text(json.dumps(SMALL_UNET))
    return folder


def save_images(folder: Path, count: int = 3, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(random_images(count, (8, 8), seed=seed)):
        image.save(folder / f"{index}.png")


def png_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    random_images(1, (8, 8), seed=seed)[0].save(buffer, format="PNG")
    return buffer.getvalue()


def hub_layout(folder: Path, rows: dict[str, int]) -> Path:
    """A local folder laid out like a Hub dataset repository: data/{split}-00000-of-00001.parquet with `rows` images."""
    import datasets

    (folder / "data").mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image()})
    for split, count in rows.items():
        images = random_images(count, (8, 8), seed=0) if count else []
        table = datasets.Dataset.from_dict({"image": images}, features=features)
        table.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


EMPTY_OR_MISSING_SPLITS = {
    # the splits' rows, the split asked for, how the message starts, what it says to do
    "empty-train": (
        {"train": 0},
        "train",
        "The split 'train' of the dataset {!r} has no rows: its data",
        "data/train-*",
    ),
    "empty-test": ({"train": 2, "test": 0}, "test", "The split 'test' of the dataset {!r} has no rows", "data/test-*"),
    "no-test": ({"train": 2}, "test", "The dataset {!r} has no split 'test' (", "with --eval_split"),
    "no-train": ({"test": 2}, "train", "The dataset {!r} has no split 'train' (", "data/train-*.parquet (training"),
}


# 3. Data that cannot be used -------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [{}, {"notes.txt": "x", "more/readme.md": "y"}], ids=["empty", "only-text"])
def test_a_folder_without_images_says_no_images_and_the_extensions_accepted(tmp_path, content):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, text in content.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    with pytest.raises(ImageDataError) as error:
        load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    assert str(error.value).startswith(f"No images found in --train_data_dir {str(folder)!r}")
    assert ".png, .jpg, .jpeg" in str(error.value) and "split" not in str(error.value)


def test_a_folder_without_images_whose_names_look_like_splits_says_no_images(tmp_path):
    folder = tmp_path / "data"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "notes.txt").write_text("x")
    with pytest.raises(ImageDataError, match="^No images found in --train_data_dir"):
        load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))


def test_an_image_whose_name_is_not_utf8_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "data"
    save_images(folder)
    descriptor = os.open(os.fsencode(folder) + b"/bad\xff.png", os.O_WRONLY | os.O_CREAT)
    os.write(descriptor, png_bytes())
    os.close(descriptor)
    with pytest.raises(ImageDataError) as error:
        load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    assert str(error.value).startswith(r"The image b'bad\xff.png' in --train_data_dir")
    assert "not valid UTF-8" in str(error.value) and "Rename it" in str(error.value)


@pytest.mark.parametrize("kind", ["missing-target", "loop", "in-a-split-folder"])
def test_an_image_that_is_a_broken_link_is_refused_naming_the_link_and_its_target(tmp_path, kind):
    folder = tmp_path / "data"
    save_images(folder / "train" if kind == "in-a-split-folder" else folder)  # split folders: `datasets`' listing
    link = folder / ("train/gone.png" if kind == "in-a-split-folder" else "gone.png")
    if kind == "loop":
        (folder / "other.png").symlink_to("gone.png")
        link.symlink_to("other.png")
        target, why = "other.png", "is a loop of links"
    else:
        link.symlink_to("/nonexistent/x.png")
        target, why = "/nonexistent/x.png", "does not exist"
    name = os.path.relpath(link, folder)
    more = " (and 1 more)" if kind == "loop" else ""  # other.png is a link of the loop too
    with pytest.raises(ImageDataError) as error:
        load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    assert str(error.value) == (
        f"The image {name!r}{more} in --train_data_dir {str(folder)!r} is a link to {target!r}, which {why}. Remove "
        "the link or fix its target, then run again."
    )
    assert not (tmp_path / "cache" / "ddpm_imagefolder").exists()  # refused before anything is cached
    link.unlink()
    (folder / "other.png").unlink(missing_ok=True)
    assert len(load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))) == 3


def test_a_link_to_a_folder_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    folder, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    save_images(folder)
    save_images(elsewhere)
    (folder / "more").symlink_to(elsewhere, target_is_directory=True)
    (folder / "loop").symlink_to(".", target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="image_data.folder_listing"):
        dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 3  # as `datasets` loads it: the linked folders' images are not trained on
    warnings = sorted(record.getMessage() for record in caplog.records)
    assert warnings == [
        f"Skipping {name!r} in --train_data_dir {str(folder)!r}: it is a link to the folder {target!r}, which "
        "`datasets` does not follow. Move or copy the images there into the folder (or link each image) to train on "
        "them."
        for name, target in (("loop", "."), ("more", str(elsewhere)))
    ]


@pytest.mark.parametrize("content", [os.urandom(64), png_bytes()[:60]], ids=["random-bytes", "truncated"])
def test_a_broken_image_is_refused_naming_the_file(tmp_path, content):
    folder = tmp_path / "data"
    save_images(folder)
    (folder / "zz-broken.png").write_bytes(content)
    with pytest.raises(ImageDataError, match=r"^Cannot decode the image '.*zz-broken\.png' \(row 3\)"):
        load_pixels(None, None, str(folder), resolution=8, channels=3, cache_dir=str(tmp_path / "cache"))


def test_a_class_label_column_given_as_image_column_names_its_type_and_the_image_columns(tmp_path):
    folder = tmp_path / "data"
    save_images(folder / "train" / "cat", seed=1)  # a split folder: `datasets` loads it, with a `label` column
    save_images(folder / "train" / "dog", seed=2)
    with pytest.raises(
        ImageDataError, match=r"'label' holds class labels, not images; its image columns are \['image'\]"
    ):
        load_pixels(None, None, str(folder), resolution=8, channels=3, image_column="label",
                    cache_dir=str(tmp_path / "cache"))  # fmt: skip


@pytest.mark.slow
def test_training_on_a_folder_with_a_non_utf8_name_exits_1_with_one_line(workdir):
    folder = workdir / "bad-name"
    save_images(folder)
    (folder / "bad\udcff.png").write_bytes(png_bytes())  # Python's name for the bytes b"bad\xff.png"
    result = run_training(workdir, [*TINY_RUN, "--train_data_dir", str(folder), "--output_dir", "bad-name-out"],
                          processes=0, check=False)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert last_line(result).startswith(r"train_ddpm.py: error: The image b'bad\xff.png' in --train_data_dir")


@pytest.mark.parametrize("streaming", [False, True], ids=["cached", "streamed"])
@pytest.mark.parametrize("kind", list(EMPTY_OR_MISSING_SPLITS))
def test_a_hub_layout_folder_whose_split_is_empty_or_missing_says_so_naming_the_folder(tmp_path, kind, streaming):
    rows, split, expected, hint = EMPTY_OR_MISSING_SPLITS[kind]
    folder = hub_layout(tmp_path / "repo", rows)
    with pytest.raises(ImageDataError) as error:
        load_image_dataset(str(folder), split=split, cache_dir=str(tmp_path / "cache"), streaming=streaming)
    message = str(error.value)
    assert message.startswith(expected.format(str(folder))) and hint in message and "\n" not in message


def test_parquet_files_written_without_datasets_metadata_or_damaged_are_one_line(tmp_path):
    """A 0-row parquet written by pyarrow alone (no `datasets` features) ended in an ArrowInvalid traceback
    ("BatchSize must be greater than 0"); a file that is no parquet at all in a DatasetGenerationError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "repo"
    (folder / "data").mkdir(parents=True)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([], type=image)}), folder / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(ImageDataError, match=f"^The split 'train' of the dataset '{folder}' has no rows"):
        load_image_dataset(str(folder), cache_dir=str(tmp_path / "cache"))
    (folder / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1" + os.urandom(64) + b"PAR1")
    with pytest.raises(
        ImageDataError, match=f"^`datasets` cannot read the data files of '{folder}' \\(split 'train'\\)"
    ):
        load_image_dataset(str(folder), cache_dir=str(tmp_path / "cache2"))


@pytest.mark.slow
@pytest.mark.fresh_process  # train_ddpm.main builds an Accelerator
def test_training_on_a_hub_layout_folder_of_0_rows_exits_1_with_one_line(workdir, monkeypatch):
    """`train_ddpm.main` in the fresh process: a SystemExit whose message is the one line (exit status 1, as the
    script run of the test above pins)."""
    import train_ddpm

    folder = hub_layout(workdir / "empty-repo", {"train": 0})
    monkeypatch.chdir(workdir)
    args = ["--cpu", "--cache_dir", str(workdir / "cache"), *TINY_RUN, "--dataset_name", str(folder)]
    with pytest.raises(SystemExit) as exited:
        train_ddpm.main([*args, "--output_dir", "empty-repo-out"])
    assert exited.value.code == (
        f"train_ddpm.py: error: The split 'train' of the dataset {str(folder)!r} has no rows: its data files hold no "
        "examples. Put the images in them (a local folder: data/train-*.parquet with an image column), or choose a "
        "dataset or split that has images."
    )
