"""evaluate_ddpm.py checks what it can before the long work (the output folder, the flags that depend on the model's T,
the training record and its bit depth), says when it uses fewer images than asked, and refuses other data behind the
base name its training record names."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_eval_metadata import RGB_RECORD, SMALL_EVAL, T, export, rgb_folder

import evaluate_ddpm
import evaluation.inputs

REPO = Path(__file__).resolve().parents[1]
PREFIX = "evaluate_ddpm.py: error: "


@pytest.fixture
def before_any_work(monkeypatch):
    """The evaluation fails if it gets as far as the Accelerator (the feature network, the data and the bound come
    after it): a check that passes here ran before any long work."""

    def too_late(*args, **kwargs):
        raise AssertionError("the evaluation got past its checks: the Accelerator was built")

    monkeypatch.setattr(evaluate_ddpm, "Accelerator", too_late)


def refusal(argv: list[str]) -> str:
    """The one-line message evaluate_ddpm.main ends with (exit status 1: SystemExit with a message)."""
    with pytest.raises(SystemExit) as exit_info:
        evaluate_ddpm.main(argv)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith(PREFIX) and "\n" not in message, message
    return message.removeprefix(PREFIX)


# 1. --output_dir -------------------------------------------------------------------------------------------------------
def test_an_output_dir_that_is_a_file_or_under_one_is_refused_before_any_work(tmp_path, before_any_work):
    pipeline = export(tmp_path / "export")
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    message = refusal(["--pipeline", str(pipeline), "--output_dir", str(afile), *SMALL_EVAL])
    assert message == f"--output_dir '{afile}' is a file, not a folder: pass a folder's path (it is created)."
    message = refusal(["--pipeline", str(pipeline), "--output_dir", str(afile / "sub"), *SMALL_EVAL])
    assert message == (  # the same check and words as training's preflight (hub_access.disk_space)
        f"--output_dir '{afile / 'sub'}' lies under '{os.path.realpath(afile)}', which is a file, not a folder: pass "
        "a folder's path (it is created)."
    )
    assert afile.read_text() == "keep me\n"


def test_a_full_or_read_only_disk_under_output_dir_is_refused_before_any_work_and_creates_nothing(
    tmp_path, before_any_work, mount_tmpfs
):
    pipeline = export(tmp_path / "export")
    small = mount_tmpfs(16)  # room for the probe, not for the plots (more than 100 KB)
    message = refusal(["--pipeline", str(pipeline), "--output_dir", str(small / "evaluation"), *SMALL_EVAL])
    assert message.startswith(f"--output_dir '{small / 'evaluation'}': its disk has ")
    assert message.endswith(
        "free, but metrics.json and the plots take more than 102 KB. Free space there, or pass another --output_dir."
    )
    read_only = mount_tmpfs(1024, ",ro")
    message = refusal(["--pipeline", str(pipeline), "--output_dir", str(read_only / "a" / "b"), *SMALL_EVAL])
    assert message == (
        f"--output_dir '{read_only / 'a' / 'b'}' cannot be written: '{os.path.realpath(read_only)}' is on a read-only "
        "file system. Make it writable, or pass a folder you can write."
    )
    assert list(small.iterdir()) == [] and list(read_only.iterdir()) == []  # no folder, no probe left


@pytest.mark.fresh_process  # evaluate_ddpm.main builds an Accelerator
def test_a_disk_that_fills_while_writing_removes_the_folder_the_run_created(tmp_path, mount_tmpfs, monkeypatch):
    pipeline = export(tmp_path / "export")
    small = mount_tmpfs(16)
    monkeypatch.setattr(evaluation.inputs, "OUTPUT_MIN_BYTES", 0)  # the early check lets it through: the plots fill it
    output = small / "new" / "evaluation"
    message = refusal(["--pipeline", str(pipeline), "--output_dir", str(output), *SMALL_EVAL])
    assert message.startswith("A disk is full: ") and "No space left on device" in message
    assert list(small.iterdir()) == []  # neither new/ nor new/evaluation/ stays, nor any half-written plot


# 2. Flags that depend on the model's T ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, expected",
    [
        (
            ["--num_inference_steps", str(T + 1)],
            f"--num_inference_steps {T + 1} is more than the T = {T} diffusion steps of the model (--pipeline {{}}): "
            f"pass 1 to {T}, or leave it out (all {T}).",
        ),
        (
            ["--interpolation_timesteps", "3", "9999"],
            f"--interpolation_timesteps 9999 is not a timestep of the model (--pipeline {{}}), which has T = {T}: pass "
            f"0-based timesteps from 0 to {T - 1}, or leave the flag out (T/20, T/4 and T/2, minus 1).",
        ),
        (
            ["--interpolation_timesteps", str(T)],
            f"--interpolation_timesteps {T} is not a timestep of the model (--pipeline {{}}), which has T = {T}: pass "
            f"0-based timesteps from 0 to {T - 1}, or leave the flag out (T/20, T/4 and T/2, minus 1).",
        ),
        (
            ["--bpd_timesteps", str(T + 1)],
            f"--bpd_timesteps {T + 1} is more than the T = {T} terms of the bound of the model (--pipeline {{}}): pass "
            f"at most {T}, or 0 for all {T} terms.",
        ),
    ],
    ids=["num_inference_steps", "interpolation_timesteps", "interpolation_timestep_T", "bpd_timesteps"],
)
def test_a_flag_beyond_the_models_T_is_refused_before_any_work(tmp_path, before_any_work, flags, expected):
    pipeline = export(tmp_path / "export")
    output = tmp_path / "evaluation"
    message = refusal(["--pipeline", str(pipeline), "--output_dir", str(output), *SMALL_EVAL, *flags])
    assert message == expected.format(pipeline)
    assert not output.exists()


def test_flags_at_the_models_T_pass_the_checks(tmp_path, before_any_work):
    pipeline = export(tmp_path / "export")
    flags = ["--num_inference_steps", str(T), "--interpolation_timesteps", "0", str(T - 1), "--bpd_timesteps", str(T)]
    with pytest.raises(AssertionError, match="the Accelerator was built"):
        evaluate_ddpm.main(["--pipeline", str(pipeline), "--output_dir", str(tmp_path / "out"), *SMALL_EVAL, *flags])
    assert not (tmp_path / "out").exists()  # the checks create nothing


# 3. The training record ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, problem",
    [
        ('{"source": "image-folder",', "is not valid JSON (Expecting property name enclosed in double quotes"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"channels": "three"}', "'channels' is \"three\", not one of 1, 3, 4"),
        ('{"resolution": 8.5}', "'resolution' is 8.5, not int"),
        ('{"center_crop": "yes"}', "'center_crop' is \"yes\", not bool"),
        ('{"bit_depth": 12}', "'bit_depth' is 12, not one of 8, 16"),
        ('{"num_images": -3}', "'num_images' is -3, not a count (0 or more)"),
    ],
    ids=["invalid-json", "list", "channels-word", "resolution-float", "crop-string", "bit-depth", "negative-count"],
)
def test_a_corrupt_training_record_is_one_line_naming_it_and_what_to_do(tmp_path, before_any_work, text, problem):
    pipeline = export(tmp_path / "export", channels=3, training_data=RGB_RECORD)
    record = pipeline / "training_data.json"
    record.write_text(text)
    message = refusal(["--pipeline", str(pipeline), "--output_dir", str(tmp_path / "evaluation"), *SMALL_EVAL])
    assert message.startswith(f"{record}") and problem in message, message
    assert message.endswith(
        ": Delete it and pass the data flags (--dataset_name or --train_data_dir, --num_channels, ...) explicitly, or "
        "export the model again with train_ddpm.py."
    )
    assert not (tmp_path / "evaluation").exists()


@pytest.mark.slow  # a new Python process
def test_a_corrupt_training_record_exits_1_without_a_traceback(tmp_path):
    pipeline = export(tmp_path / "export", channels=3, training_data=RGB_RECORD)
    (pipeline / "training_data.json").write_text("{bad")
    result = subprocess.run(
        [sys.executable, str(REPO / "evaluate_ddpm.py"), "--pipeline", str(pipeline), *SMALL_EVAL],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"{PREFIX}{pipeline / 'training_data.json'} is not valid JSON")
    assert not (tmp_path / "ddpm-evaluation").exists()


@pytest.mark.parametrize(
    "bit_depth, flag", [(8, "--preserve_input_precision"), (16, "--preserve_input_precision=false")]
)
def test_a_bit_depth_other_than_the_records_is_refused_before_any_work(
    tmp_path, monkeypatch, before_any_work, bit_depth, flag
):
    rgb_folder(tmp_path / "rgb-images")
    monkeypatch.chdir(tmp_path)
    pipeline = export(tmp_path / "export", channels=3, training_data={**RGB_RECORD, "bit_depth": bit_depth})
    asked, given = (16, True) if bit_depth == 8 else (8, False)
    message = refusal(["--pipeline", str(pipeline), "--output_dir", str(tmp_path / "out"), *SMALL_EVAL, flag])
    assert message == (
        f"--preserve_input_precision {given} asks for {asked}-bit evaluation images, but the model was trained on "
        f"{bit_depth}-bit ones (training_data.json of --pipeline {pipeline}): its bits/dim would count levels it "
        "never saw. Leave --preserve_input_precision out."
    )


@pytest.mark.fresh_process
def test_other_data_behind_the_recorded_base_name_is_refused_naming_both_counts(tmp_path, monkeypatch):
    rgb_folder(tmp_path / "rgb-images", count=6)
    pipeline = export(tmp_path / "export", channels=3, training_data={**RGB_RECORD, "num_images": 4})
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "evaluation"
    with monkeypatch.context() as patch:  # refused from the listing, before any image is decoded
        patch.setattr(evaluate_ddpm, "load_pixels", lambda *args, **kwargs: pytest.fail("decoded the images"))
        message = refusal(["--pipeline", str(pipeline), "--output_dir", str(output), *SMALL_EVAL])
    assert message == (
        f"The model was trained on 4 images of split 'train' of 'rgb-images' (training_data.json of --pipeline "
        f"{pipeline}), but '{tmp_path / 'rgb-images'}' has 6: other data of the same name. Pass the folder it was "
        "trained on with --train_data_dir (a dataset with --dataset_name)."
    )
    assert not output.exists()
    # The folder given explicitly is the user's choice, and the count of the record says nothing of it.
    report = evaluate_ddpm.main(
        ["--pipeline", str(pipeline), "--train_data_dir", "rgb-images", "--output_dir", str(output), *SMALL_EVAL]
    )
    assert report["settings"]["train_data_dir"] == "rgb-images"


# 4. Fewer images than asked --------------------------------------------------------------------------------------------
@pytest.mark.fresh_process
def test_counts_larger_than_the_data_are_logged_and_the_counts_used_recorded(
    tmp_path, monkeypatch, caplog, digits_cache
):
    rgb_folder(tmp_path / "rgb-images", count=5)
    pipeline = export(tmp_path / "export", channels=3, training_data={**RGB_RECORD, "num_images": 5})
    monkeypatch.chdir(tmp_path)
    flags = ["--bpd_timesteps", "2", "--batch_size", "8", "--device", "cpu", "--feature_extractor", "digits"]
    flags += ["--num_samples", "4", "--num_inference_steps", "2", "--output_dir", "evaluation"]
    given = ["--num_images", "256", "--num_reference_images", "10", "--rate_distortion_images", "7"]
    caplog.set_level(logging.INFO, logger="evaluate_ddpm")
    evaluate_ddpm.main(["--pipeline", str(pipeline), *flags, *given])
    warnings = [r.getMessage() for r in caplog.records if r.name == "evaluate_ddpm" and r.levelno == logging.WARNING]
    data = "--train_data_dir rgb-images"
    assert warnings == [
        f"--num_images asks for 256 images, but {data} has 5: using 5.",
        f"--num_reference_images asks for 10 images, but {data} has 5: using 5.",
        f"--rate_distortion_images asks for 7 images, but {data} has 5: using 5.",
    ]
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert metrics["num_images"] == 5
    settings = metrics["settings"]
    assert (settings["num_images"], settings["num_reference_images"], settings["rate_distortion_images"]) == (
        256,
        10,
        7,
    )
    assert (settings["num_images_used"], settings["num_reference_images_used"]) == (5, 5)
    assert settings["rate_distortion_images_used"] == 5

    # The defaults (256 and 16 images) on a small dataset: a note, no warning; the settings hold the defaults.
    caplog.clear()
    report = evaluate_ddpm.main(["--pipeline", str(pipeline), *flags])
    records = [r for r in caplog.records if r.name == "evaluate_ddpm" and "images, but" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.INFO, f"--num_images defaults to 256 images, but {data} has 5: using 5."),
        (logging.INFO, f"--rate_distortion_images defaults to 16 images, but {data} has 5: using 5."),
    ]
    settings = report["settings"]
    assert (settings["num_images"], settings["rate_distortion_images"], settings["num_reference_images"]) == (
        256,
        16,
        None,
    )
    assert (settings["num_images_used"], settings["rate_distortion_images_used"]) == (5, 5)
    assert settings["num_reference_images_used"] == 5


def test_too_few_samples_for_precision_and_recall_are_refused_before_any_work(tmp_path, before_any_work):
    pipeline = export(tmp_path / "export")
    argv = ["--pipeline", str(pipeline), "--output_dir", str(tmp_path / "out"), *SMALL_EVAL, "--num_samples", "3"]
    assert refusal(argv) == (
        "--num_samples 3 generated samples are too few for the sample metrics (precision and recall compare each "
        "image with its 3 nearest neighbours): they need at least 4. Pass more, or --num_samples 0 to skip FID, KID, "
        "precision and recall."
    )


@pytest.mark.fresh_process
def test_too_few_images_to_compare_samples_with_are_refused_before_sampling(tmp_path):
    images = rgb_folder(tmp_path / "rgb-images", count=5)
    pipeline = export(tmp_path / "export", channels=3)
    argv = ["--pipeline", str(pipeline), "--train_data_dir", str(images), "--output_dir", str(tmp_path / "out")]
    argv += [*SMALL_EVAL, "--num_samples", "4", "--num_reference_images", "3", "--feature_extractor", "digits"]
    assert refusal(argv) == (
        f"--train_data_dir {images} has 5 images; 3 of them are too few for the sample metrics (precision and recall "
        "compare each image with its 3 nearest neighbours): they need at least 4. Pass more, or --num_samples 0 to "
        "skip FID, KID, precision and recall."
    )
    assert not (tmp_path / "out").exists()
