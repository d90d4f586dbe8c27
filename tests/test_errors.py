"""Issue 13, item 5: errors that say what happened. Each case is a failure a user meets (unusable data, a full disk,
a checkpoint of another model, a flag out of range), and each test pins down how the run ends: the exit status, the
one-line message that names the problem and what to do, and what is left on disk."""

import io
import json
import os
from pathlib import Path

import pytest
from test_train import FAST, SMALL_UNET, _random_images, run_training

from training.data import ImageDataError, load_image_dataset
from training.pixels import load_pixels

TINY_RUN = ["--model_config_name_or_path", "unet.json", "--resolution", "8", "--train_batch_size", "4", *FAST]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("errors")
    (folder / "unet.json").write_text(json.dumps(SMALL_UNET))
    return folder


def last_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def save_images(folder: Path, count: int = 3, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(_random_images(count, (8, 8), seed=seed)):
        image.save(folder / f"{index}.png")


def png_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    _random_images(1, (8, 8), seed=seed)[0].save(buffer, format="PNG")
    return buffer.getvalue()


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
