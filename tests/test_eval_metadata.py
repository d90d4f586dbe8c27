"""Evaluation sees what training saw: the export records its training data (`training_data.json`, the card's
`training_data:`), evaluate_ddpm.py takes its data flags from that record, refuses data the model cannot have been
trained on, says what to pass for a checkpoint or a missing folder, and draws its figures large enough to see."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMPipeline, UNet2DModel
from PIL import Image

import evaluate_ddpm
from image_data.record import data_fingerprint, training_data_record
from image_data.sources import load_image_dataset
from pipelines import DDPMPaperPipeline, ModelCardInfo
from schedulers import DDPMPaperScheduler

REPO = Path(__file__).resolve().parents[1]
T = 20
SMALL_EVAL = ["--num_images", "2", "--bpd_timesteps", "2", "--num_samples", "0", "--rate_distortion_images", "2"]
SMALL_EVAL += ["--batch_size", "8", "--device", "cpu"]
RGB_RECORD = {
    "source": "image-folder",
    "dataset_name": None,
    "dataset_config_name": None,
    "train_data_dir": "rgb-images",
    "image_column": "image",
    "split": "train",
    "resolution": 8,
    "channels": 3,
    "bit_depth": 8,
    "center_crop": True,
    "random_flip": True,
}


def export(folder: Path, channels: int = 1, training_data: dict | None = None) -> Path:
    """A tiny 8x8 model exported as train_ddpm.py exports it (a stock DDPMPipeline folder), with `training_data`."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(4, 8),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    pipeline = DDPMPaperPipeline(unet=unet, scheduler=DDPMPaperScheduler(num_train_timesteps=T))
    samples = [Image.new("RGB" if channels == 3 else "L", (8, 8))]
    record = {} if training_data is None else {"training_data": training_data}  # as an export from before the record
    pipeline.save_pretrained(folder, card=ModelCardInfo(sample_images=samples, **record))
    return folder


def rgb_folder(folder: Path, count: int = 4) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


# 1. The record --------------------------------------------------------------------------------------------------------
def test_record_names_local_folders_by_base_name_and_keeps_hub_ids(tmp_path):
    flags = {"dataset_config_name": None, "image_column": "image", "resolution": 32, "channels": 3}
    flags |= {"preserve_input_precision": False, "center_crop": False, "random_flip": True}
    folder = rgb_folder(tmp_path / "secret-place" / "my-images", count=12)
    record = training_data_record(dataset_name=None, train_data_dir=str(folder), **flags, num_images=12)
    assert isinstance(record["fingerprint"], str) and len(record["fingerprint"]) == 32  # of the images' bytes
    assert record == {
        "fingerprint": record["fingerprint"],
        "source": "image-folder",
        "dataset_name": None,
        "dataset_config_name": None,
        "train_data_dir": "my-images",
        "image_column": "image",
        "split": "train",
        "num_images": 12,
        "resolution": 32,
        "channels": 3,
        "bit_depth": 8,
        "center_crop": False,
        "random_flip": True,
    }
    assert str(tmp_path) not in json.dumps(record)
    local = training_data_record(dataset_name=str(folder) + os.sep, train_data_dir=None, **flags)
    assert (local["source"], local["dataset_name"]) == ("local-dataset", "my-images")
    hub = training_data_record(dataset_name="uoft-cs/cifar10", train_data_dir=None, **flags)
    assert (hub["source"], hub["dataset_name"], hub["num_images"]) == ("hub-dataset", "uoft-cs/cifar10", None)
    assert hub["fingerprint"] is None  # a split streamed (no count): not read twice
    digits = training_data_record(
        dataset_name=None, train_data_dir=None, **{**flags, "channels": 1, "preserve_input_precision": True}
    )
    assert (digits["source"], digits["channels"], digits["bit_depth"]) == ("embedded-digits", 1, 16)


def test_export_writes_the_record_beside_model_index_and_in_the_card_and_stock_diffusers_loads_it(tmp_path):
    folder = export(tmp_path / "export", channels=3, training_data=RGB_RECORD)
    assert json.loads((folder / "training_data.json").read_text()) == RGB_RECORD
    assert (folder / "model_index.json").is_file()
    metadata = yaml.safe_load((folder / "README.md").read_text().split("---\n", 2)[1])
    assert metadata["training_data"] == RGB_RECORD
    stock = DDPMPipeline.from_pretrained(folder)  # the extra top-level file is no component
    assert type(stock).__name__ == "DDPMPipeline" and stock.unet.config.in_channels == 3
    # An export without a record removes the one an earlier export left: it would describe other data.
    export(folder, channels=3)
    assert not (folder / "training_data.json").exists()


@pytest.mark.slow  # a whole (tiny) training run
@pytest.mark.fresh_process  # train_ddpm.main builds an Accelerator
def test_training_run_records_its_image_folder_by_base_name(tmp_path, monkeypatch):
    import train_ddpm

    images = rgb_folder(tmp_path / "elsewhere" / "rgb-images", count=6)
    (tmp_path / "unet.json").write_text(
        json.dumps(
            {
                "_class_name": "UNet2DModel",
                "block_out_channels": [4, 8],
                "down_block_types": ["DownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "UpBlock2D"],
                "layers_per_block": 1,
                "norm_num_groups": 4,
            }
        )
    )
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    train_ddpm.main(
        [
            *("--cpu", "--train_data_dir", str(images), "--resolution", "8", "--center_crop", "--random_flip"),
            *("--model_config_name_or_path", str(tmp_path / "unet.json"), "--max_train_steps", "1"),
            *("--train_batch_size", "2", "--ddpm_num_steps", "10", "--ddpm_num_inference_steps", "2"),
            *("--eval_batch_size", "1", "--output_dir", "run", "--cache_dir", str(tmp_path / "cache")),
        ]
    )
    record = json.loads((work / "run" / "training_data.json").read_text())
    assert record == {**RGB_RECORD, "num_images": 6, "fingerprint": record["fingerprint"]}  # for evaluate_ddpm.py
    assert record["fingerprint"] == data_fingerprint(load_image_dataset(train_data_dir=str(images)), "image")
    metadata = yaml.safe_load((work / "run" / "README.md").read_text().split("---\n", 2)[1])
    assert metadata["training_data"] == record


# 2. evaluate_ddpm.py takes its data flags from the record -----------------------------------------------------------
@pytest.mark.fresh_process  # evaluate_ddpm.main builds an Accelerator
def test_evaluation_defaults_its_data_flags_to_the_training_record(tmp_path, monkeypatch):
    rgb_folder(tmp_path / "rgb-images")
    pipeline = export(tmp_path / "export", channels=3, training_data=RGB_RECORD)
    monkeypatch.chdir(tmp_path)  # the record names the folder by its base name, relative to the working folder
    output_dir = tmp_path / "evaluation"
    evaluate_ddpm.main(["--pipeline", str(pipeline), "--output_dir", str(output_dir), *SMALL_EVAL])
    settings = json.loads((output_dir / "metrics.json").read_text())["settings"]
    assert settings["data_flags_from_export"] == sorted(
        ["dataset_name", "dataset_config_name", "train_data_dir", "image_column", "split", "num_channels"]
        + ["resolution", "center_crop", "preserve_input_precision"]
    )
    assert (settings["train_data_dir"], settings["num_channels"], settings["resolution"]) == ("rgb-images", 3, 8)
    assert (settings["center_crop"], settings["split"], settings["preserve_input_precision"]) == (True, "train", False)
    assert settings["feature_extractor"] == "inception"  # the default for a folder, not the digits'


@pytest.mark.fresh_process
def test_flags_given_win_over_the_record_and_another_dataset_takes_nothing_of_its_source(tmp_path, monkeypatch):
    rgb_folder(tmp_path / "other-images")
    pipeline = export(tmp_path / "export", channels=3, training_data=RGB_RECORD)
    monkeypatch.chdir(tmp_path)
    output_dir = tmp_path / "evaluation"
    argv = ["--pipeline", str(pipeline), "--train_data_dir", "other-images", "--center_crop", "false"]
    evaluate_ddpm.main([*argv, "--output_dir", str(output_dir), *SMALL_EVAL])
    settings = json.loads((output_dir / "metrics.json").read_text())["settings"]
    assert settings["data_flags_from_export"] == ["preserve_input_precision", "resolution"]
    assert (settings["train_data_dir"], settings["center_crop"], settings["image_column"]) == (
        "other-images",
        False,
        None,
    )


@pytest.mark.fresh_process
def test_an_export_without_a_record_falls_back_to_the_previous_defaults(tmp_path):
    pipeline = export(tmp_path / "export", channels=1)
    output_dir = tmp_path / "evaluation"
    evaluate_ddpm.main(["--pipeline", str(pipeline), "--output_dir", str(output_dir), *SMALL_EVAL])
    settings = json.loads((output_dir / "metrics.json").read_text())["settings"]
    assert settings["data_flags_from_export"] == []
    assert (settings["dataset_name"], settings["train_data_dir"], settings["split"]) == (None, None, "train")
    assert (settings["center_crop"], settings["resolution"]) == (False, 8)


@pytest.mark.fresh_process
def test_a_recorded_folder_missing_from_the_working_folder_says_to_pass_train_data_dir(tmp_path, monkeypatch):
    pipeline = export(tmp_path / "export", channels=3, training_data=RGB_RECORD)
    monkeypatch.chdir(tmp_path)  # no rgb-images/ here
    with pytest.raises(SystemExit, match=r"trained on the folder 'rgb-images'.*pass --train_data_dir with its path"):
        evaluate_ddpm.main(["--pipeline", str(pipeline), "--output_dir", str(tmp_path / "evaluation"), *SMALL_EVAL])
    assert not (tmp_path / "evaluation").exists()


# 3. Data the model cannot have been trained on -----------------------------------------------------------------------
@pytest.mark.fresh_process
def test_a_resolution_other_than_the_models_is_an_error_naming_both(tmp_path):
    pipeline = export(tmp_path / "export", channels=1)
    message = r"the model samples 8x8 images with 1 channel, but --resolution 16 asks for 16x16 evaluation images"
    with pytest.raises(SystemExit, match=message):
        evaluate_ddpm.main(
            ["--pipeline", str(pipeline), "--resolution", "16", "--output_dir", str(tmp_path), *SMALL_EVAL]
        )


@pytest.mark.fresh_process
def test_an_rgb_model_without_a_record_is_not_scored_against_the_grayscale_digits(tmp_path):
    pipeline = export(tmp_path / "export", channels=3)  # an export from before the record
    message = (
        r"the model samples 8x8 images with 3 channels, but the evaluation data, the embedded digits .*, has 1 "
        r"channel: pass the data it was trained on \(--dataset_name or --train_data_dir\)"
    )
    with pytest.raises(SystemExit, match=message):
        evaluate_ddpm.main(["--pipeline", str(pipeline), "--output_dir", str(tmp_path / "evaluation"), *SMALL_EVAL])
    assert not (tmp_path / "evaluation").exists()


@pytest.mark.fresh_process
def test_an_rgb_folder_given_to_a_grayscale_model_is_an_error_unless_converted(tmp_path):
    images = rgb_folder(tmp_path / "rgb-images")
    pipeline = export(tmp_path / "export", channels=1)
    argv = ["--pipeline", str(pipeline), "--train_data_dir", str(images), *SMALL_EVAL]
    with pytest.raises(SystemExit, match=r"1 channel, but the evaluation data, --train_data_dir .* has 3 channels"):
        evaluate_ddpm.main([*argv, "--output_dir", str(tmp_path / "refused")])
    report = evaluate_ddpm.main([*argv, "--num_channels", "1", "--output_dir", str(tmp_path / "converted")])
    assert report["settings"]["num_channels"] == 1


@pytest.mark.fresh_process
def test_the_channels_of_the_data_are_read_from_the_split_evaluated(tmp_path):
    data = tmp_path / "data"
    rgb_folder(data / "test")
    (data / "train").mkdir()
    for index in range(4):
        Image.new("L", (10, 10), 40 * index).save(data / "train" / f"{index}.png")
    pipeline = export(tmp_path / "export", channels=3)
    argv = ["--pipeline", str(pipeline), "--train_data_dir", str(data), "--split", "test", *SMALL_EVAL]
    report = evaluate_ddpm.main([*argv, "--output_dir", str(tmp_path / "evaluation")])
    assert report["settings"]["split"] == "test" and math.isfinite(report["bits_per_dim"])


# 4. Checkpoints and missing folders -----------------------------------------------------------------------------------
def test_a_checkpoint_folder_names_the_export_to_pass(tmp_path):
    run = export(tmp_path / "run")
    (run / "checkpoint-4").mkdir()
    with pytest.raises(SystemExit) as error:
        evaluate_ddpm.main(["--pipeline", str(run / "checkpoint-4")])
    assert str(error.value) == (
        f"evaluate_ddpm.py: error: --pipeline {run / 'checkpoint-4'} is a training checkpoint, not an exported "
        f"pipeline: pass --pipeline {run}, the export of its run."
    )


def test_a_run_with_checkpoints_but_no_export_says_to_finish_training_first(tmp_path):
    run = tmp_path / "unfinished"
    (run / "checkpoint-2").mkdir(parents=True)
    for pipeline in (run, run / "checkpoint-2"):
        message = (
            rf"no export yet.*let train_ddpm.py finish \(its flags with --output_dir {run} --resume_from_checkpoint"
        )
        with pytest.raises(SystemExit, match=message):
            evaluate_ddpm.main(["--pipeline", str(pipeline)])


def test_the_export_knows_checkpoint_folders_by_the_names_training_gives_them(tmp_path):
    """pipelines/ cannot import checkpoints/: its own pattern must match the folders `checkpoint_path` names."""
    from checkpoints.checkpointing import checkpoint_path
    from pipelines.export import CHECKPOINT_NAME

    names = [os.path.basename(checkpoint_path(str(tmp_path), step)) for step in (0, 7, 150000)]
    assert names == ["checkpoint-0", "checkpoint-7", "checkpoint-150000"]
    assert all(CHECKPOINT_NAME.fullmatch(name) for name in names)
    assert not any(CHECKPOINT_NAME.fullmatch(name) for name in ("checkpoint-4.tmp", "checkpoint-", "checkpoints"))


@pytest.mark.slow  # a new Python process
def test_a_missing_pipeline_folder_is_one_sentence_and_exit_status_1(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "evaluate_ddpm.py"), "--pipeline", "ddpm-outptu"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "evaluate_ddpm.py: error: --pipeline ddpm-outptu: no such folder (a Hub model id has the form user/name)."
    )


# 5. Figures of small images --------------------------------------------------------------------------------------------
def test_figures_of_8x8_images_are_upscaled_to_at_least_256_px_a_side(tmp_path):
    pipeline = DDPMPaperPipeline.from_pretrained(export(tmp_path / "export", channels=1))
    pipeline.set_progress_bar_config(disable=True)
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    evaluate_ddpm.write_plots(pipeline, images, tmp_path, rate_distortion_images=3, batch_size=8)
    sizes = {name: Image.open(tmp_path / name).size for name in ["progressive.png", "interpolation.png"]}
    # progressive: 4 chains (rows) of 11 snapshots, 88x32 px -> 8x; interpolation: 3 rows of 13, 104x24 -> 11x.
    assert sizes == {"progressive.png": (88 * 8, 32 * 8), "interpolation.png": (104 * 11, 24 * 11)}
    assert math.ceil(256 / 32) == 8 and math.ceil(256 / 24) == 11
    for name in ["bpd_terms.png", "rate_distortion.png"]:
        assert min(Image.open(tmp_path / name).size) >= 256, name
