"""evaluate_ddpm.py knows the data it scores: the export records a fingerprint of the training images, other images
under the recorded name are refused (unless --allow_other_data), a copy of the same files anywhere is accepted,
metrics.json holds no absolute path, and an error under a two-process launch reaches the user as one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_eval_early import PREFIX, refusal
from test_eval_metadata import RGB_RECORD, SMALL_EVAL, export

import evaluate_ddpm
from image_data.record import data_fingerprint, training_data_record
from image_data.sources import digits_dataset, load_image_dataset

REPO = Path(__file__).resolve().parents[1]
FLAGS = {"dataset_config_name": None, "image_column": "image", "resolution": 8, "channels": 3}
FLAGS |= {"preserve_input_precision": False, "center_crop": True, "random_flip": True}


def images(folder: Path, seed: int = 0, count: int = 4) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


def copy_files(source: Path, target: Path) -> Path:
    """A copy as `cp -r` makes it: the same bytes, new modification times."""
    target.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        (target / path.name).write_bytes(path.read_bytes())
    return target


def trained_on(folder: Path, tmp_path: Path) -> Path:
    """An export whose record is the one training on `folder` writes (train_ddpm.py calls training_data_record)."""
    record = training_data_record(dataset_name=None, train_data_dir=str(folder), **FLAGS, num_images=4)
    assert record == {**RGB_RECORD, "num_images": 4, "fingerprint": record["fingerprint"]}
    assert isinstance(record["fingerprint"], str) and len(record["fingerprint"]) == 32
    return export(tmp_path / "export", channels=3, training_data=record)


@pytest.mark.slow  # two evaluations
@pytest.mark.fresh_process  # evaluate_ddpm.main builds an Accelerator
def test_other_pixels_under_the_same_name_and_count_are_refused_naming_both_fingerprints(tmp_path, monkeypatch):
    pipeline = trained_on(images(tmp_path / "training" / "rgb-images", seed=0), tmp_path)
    recorded = json.loads((pipeline / "training_data.json").read_text())["fingerprint"]
    other = images(tmp_path / "work" / "rgb-images", seed=1)  # same base name, same count, other pixels
    monkeypatch.chdir(tmp_path / "work")
    output = tmp_path / "evaluation"
    message = refusal(["--pipeline", str(pipeline), "--output_dir", str(output), *SMALL_EVAL])
    found = data_fingerprint(load_image_dataset(train_data_dir=str(other)), "image")
    assert found != recorded
    for part in (recorded, found, f"training_data.json of --pipeline {pipeline}", f"'{other}'", "--train_data_dir"):
        assert part in message, part
    assert "--allow_other_data" in message
    assert not output.exists()
    # Given explicitly under the same base name: refused too; --allow_other_data evaluates, and says so.
    argv = ["--pipeline", str(pipeline), "--train_data_dir", str(other), "--output_dir", str(output), *SMALL_EVAL]
    assert found in refusal(argv)
    report = evaluate_ddpm.main([*argv, "--allow_other_data"])
    settings = json.loads((output / "metrics.json").read_text())["settings"]
    assert report["settings"]["allow_other_data"] is True
    assert (settings["data_fingerprint"], settings["training_data_fingerprint"]) == (found, recorded)


@pytest.mark.slow  # two evaluations
@pytest.mark.fresh_process
def test_a_copy_of_the_training_folder_elsewhere_is_accepted_and_metrics_hold_no_absolute_path(tmp_path, monkeypatch):
    original = images(tmp_path / "training" / "rgb-images")
    pipeline = trained_on(original, tmp_path)
    recorded = json.loads((pipeline / "training_data.json").read_text())["fingerprint"]
    copy = copy_files(original, tmp_path / "other-disk" / "work" / "rgb-images")
    # From the record, in another working folder that holds the copy.
    monkeypatch.chdir(tmp_path / "other-disk" / "work")
    report = evaluate_ddpm.main(["--pipeline", str(pipeline), "--output_dir", "evaluation", *SMALL_EVAL])
    assert report["settings"]["data_fingerprint"] == recorded
    # By absolute path, from yet another working folder; every path flag absolute.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    output = tmp_path / "results" / "evaluation"
    argv = ["--pipeline", str(pipeline), "--train_data_dir", str(copy), "--output_dir", str(output)]
    report = evaluate_ddpm.main([*argv, "--cache_dir", str(tmp_path / "cache"), *SMALL_EVAL])
    assert report["settings"]["data_fingerprint"] == recorded
    written = sorted(path for path in output.rglob("*") if path.is_file())
    assert [path.name for path in written] == sorted(["metrics.json", *evaluate_ddpm.PLOT_FILES])
    for path in written:
        for absolute in {str(tmp_path), os.path.realpath(tmp_path)}:
            assert absolute.encode() not in path.read_bytes(), path.name
    settings = json.loads((output / "metrics.json").read_text())["settings"]
    assert (settings["pipeline"], settings["train_data_dir"]) == ("export", "rgb-images")
    assert (settings["output_dir"], settings["cache_dir"]) == ("evaluation", "cache")


@pytest.mark.slow  # an evaluation
@pytest.mark.fresh_process
def test_one_image_changed_is_refused(tmp_path, monkeypatch):
    pipeline = trained_on(images(tmp_path / "training" / "rgb-images"), tmp_path)
    changed = copy_files(tmp_path / "training" / "rgb-images", tmp_path / "work" / "rgb-images")
    pixels = np.array(Image.open(changed / "2.png"))
    pixels[0, 0, 0] ^= 1  # one value of one pixel
    Image.fromarray(pixels).save(changed / "2.png")
    monkeypatch.chdir(tmp_path / "work")
    message = refusal(["--pipeline", str(pipeline), "--output_dir", str(tmp_path / "out"), *SMALL_EVAL])
    assert "other images under the name 'rgb-images'" in message and "--allow_other_data" in message


@pytest.mark.slow  # an evaluation
@pytest.mark.fresh_process
def test_the_embedded_digits_default_is_accepted_and_a_wrong_digits_fingerprint_refused(tmp_path):
    flags = {**FLAGS, "channels": 1, "center_crop": False, "random_flip": False}
    record = training_data_record(dataset_name=None, train_data_dir=None, **flags, num_images=1797)
    assert record["fingerprint"] == digits_dataset()._fingerprint
    pipeline = export(tmp_path / "export", channels=1, training_data=record)
    argv = ["--pipeline", str(pipeline), *SMALL_EVAL]
    report = evaluate_ddpm.main([*argv, "--output_dir", str(tmp_path / "evaluation")])
    assert report["settings"]["data_fingerprint"] == record["fingerprint"]
    wrong = export(tmp_path / "wrong", channels=1, training_data={**record, "fingerprint": "0" * 32})
    message = refusal(["--pipeline", str(wrong), "--output_dir", str(tmp_path / "refused"), *SMALL_EVAL])
    assert "0" * 32 in message and record["fingerprint"] in message and "embedded digits" in message


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
LAUNCH += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


@pytest.mark.slow  # accelerate launch of two processes
def test_a_two_process_launch_without_device_cpu_ends_in_one_line_from_the_main_process(tmp_path):
    pipeline = export(tmp_path / "export", channels=1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # no GPU: each process runs alone
    command = [*LAUNCH, str(REPO / "evaluate_ddpm.py"), "--pipeline", str(pipeline), "--output_dir", "out"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).splitlines()
    # What the processes print comes before the launcher's own report (its log lines, then its ChildFailedError).
    launcher = next(i for i, line in enumerate(lines) if line[:1] in "WEI" and line[1:5].isdigit())
    ours = [line for line in lines[:launcher] if "no training_data.json" not in line]  # the main one's warning
    assert len(ours) == 1, "\n".join(lines[:launcher])
    assert ours[0].startswith(PREFIX) and "2 processes were launched" in ours[0] and "--device cpu" in ours[0]
    assert len(lines[:launcher]) <= 2 and not any(line.startswith("[rank") for line in lines)
    # Both processes ended with status 1 (the other one quietly), none by a signal.
    statuses = [line.partition(":")[2].split("(")[0].strip() for line in lines if line.strip().startswith("exitcode")]
    assert statuses == ["1", "1"]
    assert not (tmp_path / "out").exists()
