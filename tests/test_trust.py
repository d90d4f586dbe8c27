"""One run per output folder, credentials that never leak whatever
carried them, published text without local paths, and numeric flags / image columns checked before any work."""

import dataclasses
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from helpers import FAST, REPO, SMALL_UNET, random_images, run_env, run_training
from hub_server import LocalHub

import evaluate_ddpm
import train_ddpm
from hub_access.secrets import mask_logs_and_errors, public_argv, register
from training.args import parse_args, public_config
from training.output_lock import LOCK_FILE_NAME, OutputDirLock

TOKEN = "hf_trustFlagToken0123456789abcdefgh"
ENV_TOKEN = "hf_trustEnvToken0123456789abcdefghi"
SHORT_RUN = ["--model_config_name_or_path", "unet.json", "--max_train_steps", "2", "--checkpointing_steps", "1", *FAST]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trust")
    (folder / "unet.json").write_text(json.dumps(SMALL_UNET))
    return folder


@pytest.fixture(scope="module")
def images_elsewhere(tmp_path_factory) -> Path:
    """An image folder outside the runs' working folder: a card may name it by its base name only."""
    folder = tmp_path_factory.mktemp("elsewhere") / "my-images"
    folder.mkdir()
    for index, image in enumerate(random_images(8, (9, 9), seed=3)):
        image.save(folder / f"{index}.png")
    return folder


@pytest.fixture
def in_process(request, workdir, monkeypatch):
    """Run `train_ddpm.main` here, in `workdir`: in a test marked fresh_process (accelerate's state is process-wide)."""
    assert request.node.get_closest_marker("fresh_process"), "mark the test @pytest.mark.fresh_process"
    monkeypatch.chdir(workdir)
    return lambda *args: train_ddpm.main(["--cpu", "--cache_dir", str(workdir / "in-process-cache"), *args])


def _no_data(*args, **kwargs):
    raise AssertionError("the run reached the data")


def files_holding(folder: Path, *needles: str) -> list[str]:
    """Every file under `folder` (logs, event files, checkpoints, card) whose bytes contain one of `needles`."""
    return [
        f"{path.relative_to(folder)}: {needle}"
        for path in sorted(folder.rglob("*"))
        if path.is_file()
        for needle in needles
        if needle.encode() in path.read_bytes()
    ]


# 3. One run per output folder ------------------------------------------------------------------------------------
PAUSE_BEFORE_DATA = """
import sys, time
sys.path.insert(0, {repo!r})
import train_ddpm


def paused(*args, **kwargs):  # the run holds its output folder and waits here, before reading any data
    open({marker!r}, "w").close()
    time.sleep(600)


train_ddpm.load_pixels = paused
train_ddpm.main()
"""


@pytest.mark.slow
def test_a_second_run_into_a_held_folder_fails_at_once_on_every_process_and_a_killed_run_leaves_no_lock(workdir):
    output = workdir / "held"
    marker = workdir / "holding"
    script = workdir / "pause_before_data.py"
    script.write_text(PAUSE_BEFORE_DATA.format(repo=str(REPO), marker=str(marker)))
    first = subprocess.Popen(
        [sys.executable, str(script), *SHORT_RUN, "--cpu", "--output_dir", "held"],
        cwd=workdir,
        env=run_env(workdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the first run never reached its data"
            time.sleep(0.2)
        assert (output / LOCK_FILE_NAME).is_file()

        # A second run of two processes: the main one is refused the lock, and the other one learns it (no hang).
        start = time.monotonic()
        second = run_training(workdir, [*SHORT_RUN, "--cpu", "--output_dir", "held"], processes=2, check=False)
        elapsed = time.monotonic() - start
        assert second.returncode == 1, second.stderr[-3000:]
        assert "train_ddpm.py: error: Another training run holds the output folder 'held'" in second.stderr
        assert f"PID {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "Data:" not in second.stderr  # it stopped before the data
        assert elapsed < 150, elapsed  # launcher and two imports of torch on a busy machine; no timeout waited out
        assert first.poll() is None  # the first run is untouched
        assert sorted(path.name for path in output.iterdir()) == [LOCK_FILE_NAME]
    finally:
        first.send_signal(signal.SIGKILL)  # the OS releases the lock; the file stays, the lock does not
        first.wait(timeout=30)
    assert (output / LOCK_FILE_NAME).is_file()

    run_training(workdir, [*SHORT_RUN, "--output_dir", "held"], processes=0)
    assert (output / "model_index.json").is_file() and (output / "checkpoint-2").is_dir()
    assert not (output / LOCK_FILE_NAME).exists()  # a run that ends removes its lock file: never exported


@pytest.mark.fresh_process
def test_a_run_into_a_folder_another_process_holds_names_it_and_leaves_it_alone(workdir, in_process, monkeypatch):
    output = workdir / "held-in-process"
    monkeypatch.setattr(train_ddpm, "load_pixels", _no_data)
    with OutputDirLock(str(output)):  # another open file description: flock refuses it even in this process
        before = sorted(output.rglob("*"))
        message = rf"error: Another training run holds the output folder .*PID {os.getpid()} on host "
        with pytest.raises(SystemExit, match=message + re.escape(socket.gethostname())):
            in_process(*SHORT_RUN, "--output_dir", str(output), "--overwrite_output_dir")
        assert sorted(output.rglob("*")) == before
    assert not output.exists()  # the holder created the folder and removed it, empty, on release


@pytest.mark.slow
# 4. Credentials and local paths ----------------------------------------------------------------------------------
def test_abbreviated_token_flag_is_refused_without_showing_the_token(workdir):
    for argv in (["--hub_tok", TOKEN], [f"--hub_tok={TOKEN}"], ["--hub_to", TOKEN]):
        result = run_training(workdir, [*SHORT_RUN, "--output_dir", "abbreviated", *argv], processes=0, check=False)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "--hub_tok" in result.stderr and "did you mean --hub_token" in result.stderr
        assert TOKEN not in result.stdout + result.stderr
    assert not (workdir / "abbreviated").exists()
    with pytest.raises(SystemExit) as exit_info:
        evaluate_ddpm.parse_args(["--pipeline", "p", "--num_samp", "3"])
    assert exit_info.value.code == 2


def test_full_flags_work_in_both_forms():
    assert parse_args(["--hub_token", TOKEN]).hub_token == TOKEN
    assert parse_args([f"--hub_token={TOKEN}"]).hub_token == TOKEN
    assert parse_args(["--learning_rate=3e-4", "--adam_beta1", "0.9"]).learning_rate == 3e-4
    assert evaluate_ddpm.parse_args(["--pipeline=p", "--batch_size=8"]).batch_size == 8


@pytest.fixture(scope="module")
def token_runs(workdir, images_elsewhere) -> dict[str, tuple[Path, dict]]:
    """Three real runs: the token by `--hub_token TOKEN` (an image folder outside the working folder, absolute
    --output_dir, pushed to a loopback Hub), by `--hub_token=TOKEN`, and by HF_TOKEN (pushed)."""
    runs = {}
    with LocalHub(token=TOKEN) as hub:
        output = workdir / "by-flag"
        args = [
            *SHORT_RUN,
            "--train_data_dir",
            str(images_elsewhere),
            "--resolution",
            "8",
            "--output_dir",
            str(output),
        ]
        args += ["--push_to_hub", "--hub_model_id", "me/by-flag", "--hub_token", TOKEN]
        result = run_training(workdir, args, env={**hub.env(), "HF_TOKEN": ""}, processes=0)
        runs["flag"] = (output, hub.repos["me/by-flag"]["files"], result)
    output = workdir / "by-equals"
    result = run_training(workdir, [*SHORT_RUN, f"--hub_token={TOKEN}", "--output_dir", str(output)], processes=0)
    runs["equals"] = (output, {}, result)
    with LocalHub(token=ENV_TOKEN) as hub:
        output = workdir / "by-env"
        args = [*SHORT_RUN, "--output_dir", str(output), "--push_to_hub", "--hub_model_id", "me/by-env"]
        result = run_training(workdir, args, env={**hub.env(), "HF_TOKEN": ENV_TOKEN}, processes=0)
        runs["env"] = (output, hub.repos["me/by-env"]["files"], result)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("carrier", ["flag", "equals", "env"])
def test_no_token_and_no_absolute_path_in_any_file_written_or_published(
    token_runs, workdir, images_elsewhere, carrier
):
    output, published, result = token_runs[carrier]
    secrets = [TOKEN, ENV_TOKEN, str(workdir), str(images_elsewhere.parent)]
    assert files_holding(output, *secrets) == []
    assert list((output / "logs").rglob("events.out.tfevents.*")) and (output / "checkpoint-2").is_dir()
    assert not any(secret in result.stdout + result.stderr for secret in secrets[:2])
    card = (output / "README.md").read_text()
    assert f"--output_dir by-{carrier}" in card
    if published:
        assert {"README.md", "model_index.json"} <= set(published)
        assert not any(LOCK_FILE_NAME in name for name in published)
        assert [name for name, content in published.items() if any(s.encode() in content for s in secrets)] == []
    if carrier == "flag":
        assert "--hub_token '***'" in card or "--hub_token ***" in card
        assert "--train_data_dir my-images" in card  # outside the working folder: its base name only
        state = json.loads((output / "checkpoint-2" / "trainer_state.json").read_text())["training_args"]
        assert (state["train_data_dir"], state["output_dir"]) == ("my-images", "by-flag")


@pytest.mark.fresh_process
def test_tokens_are_masked_by_value_in_logs_errors_and_public_configs(workdir, in_process, monkeypatch):
    register(TOKEN)
    mask_logs_and_errors()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    library = logging.getLogger("some.library")
    library.addHandler(handler)
    try:
        library.warning("request with %s failed", TOKEN)
        try:
            raise RuntimeError(f"bad token {TOKEN}")
        except RuntimeError:
            library.exception("failed")
    finally:
        library.removeHandler(handler)
    assert TOKEN not in stream.getvalue() and "request with *** failed" in stream.getvalue()
    assert "bad token ***" in stream.getvalue()

    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", ENV_TOKEN)
    # A token in another flag is refused (tests/test_preflight.py); public configs mask one anyway.
    args = dataclasses.replace(parse_args(["--output_dir", str(workdir / "x")]), hub_model_id=f"me/{ENV_TOKEN}")
    assert ENV_TOKEN not in json.dumps(public_config(args)) and public_config(args)["output_dir"] == "x"
    assert public_argv([f"--hub-token={TOKEN}", "--seed", "1", f"--x={ENV_TOKEN}"], [TOKEN, ENV_TOKEN]) == [
        "--hub-token=***",
        "--seed",
        "1",
        "--x=***",
    ]
    # A token in a flag that is published (here a dataset name) is refused, naming the flag without the token.
    with pytest.raises(SystemExit) as exit_info:
        in_process("--hub_token", TOKEN, "--dataset_name", f"nobody/{TOKEN}", "--model_preset", "tiny")
    assert exit_info.value.code == 2


# 5. Numeric flags and the image column ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning_rate", "-1"], "--learning_rate -1.0 is out of range: it must be > 0."),
        (["--adam_beta1", "1.5"], "--adam_beta1 1.5 is out of range: it must be in [0, 1)."),
        (["--adam_beta2=1"], "--adam_beta2 1.0 is out of range: it must be in [0, 1)."),
        (["--adam_epsilon", "0"], "--adam_epsilon 0.0 is out of range: it must be > 0."),
        (["--adam_weight_decay", "-0.1"], "--adam_weight_decay -0.1 is out of range: it must be >= 0."),
        (["--max_grad_norm", "nan"], "--max_grad_norm nan is out of range: it must be >= 0."),
        (["--ema_max_decay", "2"], "--ema_max_decay 2.0 is out of range: it must be in [0, 1]."),
        (["--ema_power", "0"], "--ema_power 0.0 is out of range: it must be > 0."),
        (["--ema_inv_gamma", "-1"], "--ema_inv_gamma -1.0 is out of range: it must be > 0."),
        (["--seed", "-1"], "--seed -1 is out of range: it must be in [0, 4294967295]."),
    ],
)
def test_numeric_flags_out_of_range_are_refused_with_flag_value_and_range(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert f"train_ddpm.py: error: {message}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_negative_learning_rate_stops_before_any_work(workdir):
    result = run_training(
        workdir, [*SHORT_RUN, "--learning_rate", "-1", "--output_dir", "negative"], processes=0, check=False
    )
    assert result.returncode == 2
    assert "train_ddpm.py: error: --learning_rate -1.0 is out of range: it must be > 0." in result.stderr
    assert "Traceback" not in result.stderr and not (workdir / "negative").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch_size", "0"], "--batch_size 0 is out of range: it must be > 0."),
        (["--num_images=-1"], "--num_images -1 is out of range: it must be >= 0."),
        (["--num_inference_steps", "0"], "--num_inference_steps 0 is out of range: it must be > 0."),
        (["--interpolation_timesteps", "10", "-5"], "--interpolation_timesteps -5 is out of range: it must be >= 0."),
        (["--seed", "-2"], "--seed -2 is out of range: it must be in [0, 4294967295]."),
    ],
)
def test_evaluation_flags_out_of_range_are_refused_before_loading_anything(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_ddpm.main(["--pipeline", str(tmp_path / "missing"), *argv])
    assert exit_info.value.code == 2
    assert f"evaluate_ddpm.py: error: {message}" in capsys.readouterr().err


@pytest.mark.fresh_process
def test_an_image_column_of_numbers_is_refused_naming_the_image_columns(workdir, in_process, monkeypatch):
    folder = workdir / "labelled" / "data"
    folder.mkdir(parents=True)
    features = Features({"img": ImageFeature(), "label": Value("int64")})
    dataset = Dataset.from_dict({"img": random_images(4, (8, 8), seed=4), "label": [0, 1, 2, 3]}, features)
    dataset.to_parquet(str(folder / "train-00000-of-00001.parquet"))
    message = r"--image_column 'label' holds values of type int64, not images; its image columns are \['img'\]"
    with pytest.raises(SystemExit, match=message):
        in_process("--dataset_name", str(folder.parent), "--image_column", "label", *SHORT_RUN, "--resolution", "8")
