"""Errors that say what happened. Each case is a failure a user meets (unusable data, a full disk,
a checkpoint of another model, a flag out of range), and each test pins down how the run ends: the exit status, the
one-line message that names the problem and what to do, and what is left on disk."""

import dataclasses
import errno
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from diffusers import UNet2DModel
from helpers import FAST, REPO, SMALL_UNET, random_images, run_env, run_training
from safetensors.torch import save_file

import evaluate_ddpm
import evaluation.inputs
from checkpoints.checkpointing import verify_checkpoint
from checkpoints.verify import TRAINER_STATE_NAME, TrainerState, model_mismatch, write_manifest
from command_line.fields import POSITIVE, RANGE, flag, flag_ranges
from hub_access.atomic_folder import STAGING_NAME
from hub_access.disk_space import is_disk_full
from image_data.pixels import load_pixels
from image_data.sources import ImageDataError, load_image_dataset
from training.args import TrainingArguments, parse_args

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
    for index, image in enumerate(random_images(count, (8, 8), seed=seed)):
        image.save(folder / f"{index}.png")


def png_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    random_images(1, (8, 8), seed=seed)[0].save(buffer, format="PNG")
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
def test_training_on_a_hub_layout_folder_of_0_rows_exits_1_with_one_line(workdir):
    folder = hub_layout(workdir / "empty-repo", {"train": 0})
    result = run_training(workdir, [*TINY_RUN, "--dataset_name", str(folder), "--output_dir", "empty-repo-out"],
                          processes=0, check=False)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert last_line(result) == (
        f"train_ddpm.py: error: The split 'train' of the dataset {str(folder)!r} has no rows: its data files hold no "
        "examples. Put the images in them (a local folder: data/train-*.parquet with an image column), or choose a "
        "dataset or split that has images."
    )


# 1. A full disk ------------------------------------------------------------------------------------------------
CHECKPOINTED_RUN = [*TINY_RUN, "--checkpointing_steps", "2"]


@pytest.fixture
def small_disk(mount_tmpfs):
    """A real tmpfs of the size asked (`mount_tmpfs` of tests/conftest.py)."""
    return mount_tmpfs


@pytest.fixture(scope="module")
def one_channel_run(workdir) -> Path:
    """Checkpoint-2 of a 1-channel run on the embedded digits."""
    run_training(workdir, [*CHECKPOINTED_RUN, "--max_train_steps", "2", "--output_dir", "one-channel"], processes=0)
    return workdir / "one-channel"


def kilobytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) // 1024


@pytest.fixture(scope="module")
def sizes(one_channel_run) -> tuple[int, int]:
    """The KB of one checkpoint and of one export of these runs (about 870 and 200 with torch 2.13)."""
    return kilobytes(one_channel_run / "checkpoint-2"), kilobytes(one_channel_run / "unet")


def remains(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if ".tmp" in path.name)


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_names_the_disk_the_need_and_the_intact_checkpoint(workdir, small_disk, sizes):
    output = small_disk(int(1.55 * sizes[0]) + 40) / "run"  # room for checkpoint-2 and the logs, not checkpoint-4
    result = run_training(workdir, [*CHECKPOINTED_RUN, "--max_train_steps", "6", "--output_dir", str(output)],
                          processes=0, check=False)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = last_line(result)
    assert line.startswith(f"train_ddpm.py: error: The disk holding '{output}' is full: writing checkpoint-4 failed")
    assert re.search(r"a checkpoint needs about \d+ KB \(the size of checkpoint-2\)", line)
    assert f"{output / 'checkpoint-2'} is the newest intact checkpoint (it verifies)" in line
    assert remains(output) == [] and sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-2"]
    verify_checkpoint(str(output / "checkpoint-2"))


@pytest.mark.slow
def test_a_full_disk_under_the_datasets_cache_names_it_and_its_free_space(workdir, small_disk):
    cache = small_disk(128)  # 300 images of 3x16x16 need 230 KB in the pixel cache
    save_images(workdir / "many", count=300, seed=3)
    output = workdir / "cache-full-out"
    result = run_training(workdir, [*TINY_RUN, "--resolution", "16", "--train_data_dir", "many", "--output_dir",
                                    str(output)], processes=0, check=False, env={"HF_DATASETS_CACHE": str(cache)})  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = last_line(result)
    assert line.startswith("train_ddpm.py: error: A disk is full: OSError: [Errno 28] No space left on device")
    assert f"Free now: the datasets cache '{cache}' 0 bytes, --output_dir '{output}' " in line
    assert line.endswith(f"No intact checkpoint is in '{output}': the run must start again.")
    # The image listing, complete (written to a staging folder, then renamed); no half-written pixel cache: the failed
    # `.map` left its temporary file (`tmp` and 8 characters), which is removed.
    left = sorted(str(path.relative_to(cache)) for path in cache.rglob("*") if path.is_file())
    assert [re.sub(r"/[0-9a-f]{32}/", "/LISTING/", path) for path in left] == [
        f"ddpm_imagefolder/LISTING/{name}" for name in ("data-00000-of-00001.arrow", "dataset_info.json", "state.json")
    ]


@pytest.mark.fresh_process  # evaluate_ddpm.main builds an Accelerator
def test_a_full_disk_under_the_evaluation_output_names_it(tmp_path, small_disk, monkeypatch):
    from test_eval_metadata import SMALL_EVAL, export

    pipeline = export(tmp_path / "export", channels=1)
    output = small_disk(16) / "evaluation"  # the plots need more than 16 KB
    monkeypatch.setattr(evaluation.inputs, "OUTPUT_MIN_BYTES", 0)  # past the early check (tests/test_eval_early.py)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_ddpm.main(["--pipeline", str(pipeline), "--output_dir", str(output), *SMALL_EVAL])
    message = str(exit_info.value)
    assert message.startswith("evaluate_ddpm.py: error: A disk is full: ") and "No space left on device" in message
    assert f"Free now: --output_dir '{output}' " in message and message.endswith("Free space there, then run again.")


@pytest.mark.slow
def test_a_full_disk_at_the_first_checkpoint_estimates_the_need_and_says_none_is_intact(workdir, small_disk, sizes):
    output = small_disk(sizes[0] // 2) / "run"
    result = run_training(workdir, [*CHECKPOINTED_RUN, "--max_train_steps", "2", "--output_dir", str(output)],
                          processes=0, check=False)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = last_line(result)
    assert "is full: writing checkpoint-2 failed" in line
    assert re.search(r"needs about \d+ KB \(the model, optimizer and EMA states it holds\)", line)
    assert line.endswith(f"No intact checkpoint is in '{output}': the run must start again.")
    assert remains(output) == [] and list(output.glob("checkpoint-*")) == []


@pytest.mark.slow
def test_a_full_disk_at_the_export_keeps_the_checkpoint_and_leaves_no_partial_export(workdir, small_disk, sizes):
    output = small_disk(sizes[0] + sizes[1] // 2 + 60) / "run"  # room for checkpoint-2 and a grid, not the export
    result = run_training(workdir, [*CHECKPOINTED_RUN, "--max_train_steps", "2", "--output_dir", str(output)],
                          processes=0, check=False)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = last_line(result)
    assert line.startswith(f"train_ddpm.py: error: The disk holding '{output}' is full: exporting the pipeline failed")
    assert "an export needs about" in line and "There was no export there before." in line
    assert f"{output / 'checkpoint-2'} is the newest intact checkpoint (it verifies)" in line
    assert not (output / STAGING_NAME).exists() and not (output / "model_index.json").exists()
    verify_checkpoint(str(output / "checkpoint-2"))


def test_torchs_short_write_counts_as_a_full_disk_only_when_the_disk_lacks_room(tmp_path):
    short_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 319104 vs 318996")
    assert not is_disk_full(short_write, tmp_path, needed=1)
    assert is_disk_full(short_write, tmp_path, needed=10**18)
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(
        RuntimeError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )
    )
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path, needed=10**18)


# 4. Resuming a checkpoint of another model -------------------------------------------------------------------------
def small_unet(channels: int, widths=(8, 16)) -> UNet2DModel:
    config = {key: value for key, value in SMALL_UNET.items() if key != "_class_name"}
    return UNet2DModel(**{**config, "block_out_channels": list(widths)}, sample_size=8, in_channels=channels,
                       out_channels=channels)  # fmt: skip


def test_a_model_of_other_shapes_is_named_by_the_flag_that_differs_from_the_header_alone(tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    save_file(small_unet(1).state_dict(), str(checkpoint / "model.safetensors"))
    saved_args = {"num_channels": None, "model_preset": None, "model_config_name_or_path": "unet.json"}
    TrainerState(global_step=2, training_args=saved_args).save(str(checkpoint / TRAINER_STATE_NAME))
    write_manifest(str(checkpoint))
    verified = verify_checkpoint(str(checkpoint))  # the shapes come from the header, read when verifying
    assert model_mismatch(verified, small_unet(1).state_dict(), saved_args) is None
    message = model_mismatch(verified, small_unet(3).state_dict(), {**saved_args, "num_channels": 3})
    assert message == (
        f"{checkpoint} holds a model of another shape than this run's: it was written with --num_channels 1 (this "
        "run: --num_channels 3). Resume with the flags of the run that wrote it, or train this model in a new "
        "--output_dir (or start over with --overwrite_output_dir)."
    )
    # The same flags, another model: the config file changed in place; the parameters are named instead.
    message = model_mismatch(verified, small_unet(1, (8, 24)).state_dict(), saved_args)
    assert "its parameters differ: " in message and " is [16] there, [24] here" in message
    assert "(has unet.json changed since?)" in message


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, named",
    [
        (["--num_channels", "3"], "--num_channels 1 (this run: --num_channels 3)"),
        (["--variance_type", "learned_range"], "--variance_type fixed_small (this run: --variance_type learned_range)"),
        (["--model_config_name_or_path", "wide.json"], "--model_config_name_or_path unet.json (this run: "
         "--model_config_name_or_path wide.json)"),
    ],
)  # fmt: skip
def test_resuming_a_checkpoint_of_another_model_names_the_flag_and_loads_nothing(
    workdir, one_channel_run, flags, named
):
    (workdir / "wide.json").write_text(json.dumps({**SMALL_UNET, "block_out_channels": [8, 24]}))
    before = {path: path.read_bytes() for path in (one_channel_run / "checkpoint-2").iterdir()}
    args = [*CHECKPOINTED_RUN, "--max_train_steps", "4", "--output_dir", str(one_channel_run)]
    result = run_training(workdir, [*args, "--resume_from_checkpoint", "latest", *flags], processes=0, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "Data:" not in result.stderr  # refused from the header before the data cache is built
    assert last_line(result) == (
        f"train_ddpm.py: error: {one_channel_run / 'checkpoint-2'} holds a model of another shape than this run's: it "
        f"was written with {named}. Resume with the flags of the run that wrote it, or train this model in a new "
        "--output_dir (or start over with --overwrite_output_dir)."
    )
    assert {path: path.read_bytes() for path in (one_channel_run / "checkpoint-2").iterdir()} == before
    assert sorted(path.name for path in one_channel_run.glob("checkpoint-*")) == ["checkpoint-2"]


# 2. Numeric flags out of range ---------------------------------------------------------------------------------------
ARGUMENTS = {"train_ddpm.py": TrainingArguments, "evaluate_ddpm.py": evaluate_ddpm.EvaluationArguments}


def number_type(hint) -> type | None:
    """`int` or `float` for a field that holds numbers (`int`, `float | None`, `list[int] | None`), else `None`."""
    if hint in (int, float):
        return hint
    return next(filter(None, map(number_type, typing.get_args(hint))), None)


def numeric_fields(arguments) -> dict[str, type]:
    hints = typing.get_type_hints(arguments)
    found = {item.name: number_type(hints[item.name]) for item in dataclasses.fields(arguments)}
    return {name: kind for name, kind in found.items() if kind is not None}


def unbounded_numeric_fields(arguments) -> list[str]:
    """The numeric fields of `arguments` that declare neither a range nor choices."""
    bounded = {item.name for item in dataclasses.fields(arguments) if {RANGE, "choices"} & set(item.metadata)}
    return [name for name in numeric_fields(arguments) if name not in bounded]


@pytest.mark.parametrize("script", list(ARGUMENTS))
def test_every_numeric_flag_of_both_scripts_declares_its_bounds(script):
    arguments = ARGUMENTS[script]
    assert len(numeric_fields(arguments)) >= (30 if script == "train_ddpm.py" else 8)  # the enumeration sees them
    assert unbounded_numeric_fields(arguments) == []
    assert sorted(set(flag_ranges(arguments)) - set(numeric_fields(arguments))) == []  # a range bounds a number


def test_the_bounds_check_sees_a_numeric_field_without_a_range():
    @dataclasses.dataclass
    class Flags:
        steps: int = flag(1, help="bounded", range=POSITIVE)
        rate: float | None = flag(help="unbounded")
        sizes: list[int] | None = flag(help="unbounded list")
        channels: int = flag(3, help="bounded by its choices", choices=[1, 3])
        name: str = flag("x", help="no number")
        switch: bool = flag(False, help="no number")

    assert unbounded_numeric_fields(Flags) == ["rate", "sizes"]


def out_of_bounds_values(item: dataclasses.Field) -> list[float]:
    low, high, _, _ = item.metadata.get(RANGE) or (min(item.metadata["choices"]), max(item.metadata["choices"]), 1, 1)
    return [
        value for value in (None if low is None else low - 1, None if high is None else high + 1) if value is not None
    ]


def out_of_bounds_cases(arguments) -> list[tuple[str, float, type]]:
    kinds = numeric_fields(arguments)
    return [
        (item.name, value, kinds[item.name])
        for item in dataclasses.fields(arguments)
        if item.name in kinds
        for value in out_of_bounds_values(item)
    ]


TRAIN_CASES = out_of_bounds_cases(TrainingArguments)
EVALUATION_CASES = out_of_bounds_cases(evaluate_ddpm.EvaluationArguments)


@pytest.mark.parametrize("name, value, kind", TRAIN_CASES, ids=[f"{case[0]}={case[1]}" for case in TRAIN_CASES])
def test_each_numeric_training_flag_out_of_range_exits_2_naming_it(name, value, kind, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([f"--{name}", str(kind(value))])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"train_ddpm.py: error: --{name} ") or error.startswith(
        f"train_ddpm.py: error: argument --{name}"
    )


@pytest.mark.parametrize(
    "name, value, kind", EVALUATION_CASES, ids=[f"{case[0]}={case[1]}" for case in EVALUATION_CASES]
)
def test_each_numeric_evaluation_flag_out_of_range_exits_2_naming_it(name, value, kind, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_ddpm.parse_args(["--pipeline", "ddpm-output", f"--{name}", str(kind(value))])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"evaluate_ddpm.py: error: --{name} ") or error.startswith(
        f"evaluate_ddpm.py: error: argument --{name}"
    )


def test_a_channel_count_out_of_the_choices_in_a_config_file_is_refused(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("num_channels: 2\n")  # a file's keys are parsed as flags: argparse checks the choices
    for script, parse in (("train_ddpm.py", parse_args), ("evaluate_ddpm.py", evaluate_ddpm.parse_args)):
        with pytest.raises(SystemExit) as exit_info:
            parse([str(config)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"{script}: error: {config}: argument --num_channels/--num-channels: invalid choice: 2 (choose from 1, "
            "3, 4)"
        )
        config.write_text("pipeline: ddpm-output\nnum_channels: 2\n")


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, flags, message",
    [
        ("train_ddpm.py", ["--train_batch_size", "0"], "--train_batch_size 0 is out of range: it must be > 0."),
        ("train_ddpm.py", ["--adam_beta1", "1.5"], "--adam_beta1 1.5 is out of range: it must be in [0, 1)."),
        ("train_ddpm.py", ["--ddpm_num_steps", "0"], "--ddpm_num_steps 0 is out of range: it must be > 0."),
        ("train_ddpm.py", ["--preprocessing_num_workers", "0"], "--preprocessing_num_workers 0 is out of range: it must be > 0."),
        ("evaluate_ddpm.py", ["--pipeline", "missing", "--batch_size", "0"], "--batch_size 0 is out of range: it must be > 0."),
    ],
)  # fmt: skip
def test_a_flag_out_of_range_stops_the_script_at_once_with_one_line(workdir, script, flags, message):
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / script), *flags, "--output_dir", "never"], cwd=workdir,
                            env=run_env(workdir), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last_line(result) == f"{script}: error: {message}"
    assert time.monotonic() - started < 60 and not (workdir / "never").exists()
